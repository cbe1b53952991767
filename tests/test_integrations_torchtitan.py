"""NorMuon inside torchtitan 0.3.0 (normuon.integrations.torchtitan).

In-process: the override and its config, routing by FQN on torchtitan's own debug models (Llama 3
and the DeepSeek-V3 MoE), the fused/foreach group keys, torchtitan's init_optim_state, the
flattened FQN-keyed state dict, one optimizer per model part and torchtitan's LR scheduler.

Under torchrun (tests/torchtitan_cpu.py runs torchtitan's own trainer on CPU with gloo):
torchtitan + NorMuon on FSDP2 x2 equals NorMuon outside torchtitan (same model, same seed
weights, same batches) to float32 rounding; its DCP checkpoint saved at world size 2 resumes at
world size 1 to the uninterrupted result; tensor parallel 2 and FSDP 2 x TP 2 equal it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip(
    "torchtitan",
    reason="torchtitan is not installed (bash scripts/install.sh --dev installs 0.3.0 with "
    "--no-deps, keeping torch)",
)

import torchtitan_cpu  # noqa: E402  (tests/, on the path through conftest.py)

torchtitan_cpu.stub_triton_kernels()  # the debug models' import chain imports triton kernels

from torchtitan.components.optimizer import (  # noqa: E402
    LRSchedulersContainer,
    OptimizersContainer,
    default_adamw,
)
from torchtitan.components.optimizer.utils import init_optim_state  # noqa: E402
from torchtitan.config import Configurable  # noqa: E402
from torchtitan.config.override import (  # noqa: E402
    OverrideConfig,
    apply_overrides,
    parse_cli_imports,
)

from normuon import Muon, NorMuon, param_groups  # noqa: E402
from normuon.integrations.torchtitan import (  # noqa: E402
    NorMuonOptimizersContainer,
    from_config,
    torchtitan_param_groups,
)
from normuon.integrations.torchtitan_data import corpus_rows, debug_model_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "torchtitan_cpu.py"
Config = NorMuonOptimizersContainer.Config


def _debug_model(name: str = "llama3", device: str = "cpu") -> nn.Module:
    """torchtitan's debug model as its trainer builds it: on meta, then materialized and
    initialized by its own init_weights (``device="meta"``: not materialized)."""
    spec = debug_model_spec(name)
    with torch.device("meta"):
        model = spec.model.build()
    if device != "meta":
        model.to_empty(device=device)
        model.init_weights(buffer_device=None)
    return model


def _by_algorithm(optimizer) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for group in optimizer.param_groups:
        out.setdefault(group["algorithm"], []).extend(group["param_names"])
    return out


# ------------------------------------------------------------------ the override and its config


@dataclass(kw_only=True, slots=True)
class _Root(Configurable.Config):
    """The part of a Trainer.Config an optimizer override sees (Trainer.Config itself imports
    torchtitan's Hugging Face dataset loaders)."""

    optimizer: OptimizersContainer.Config = field(default_factory=lambda: default_adamw(lr=8e-4))


def _override(cli_token: str) -> Config:
    root = _Root()
    apply_overrides(OverrideConfig(imports=parse_cli_imports([cli_token])), root)
    return root.optimizer


def test_override_from_the_command_line_keeps_the_adamw_baseline():
    """``--override.imports 'normuon.integrations.torchtitan.normuon={...}'``, as documented:
    the matrix options come from the JSON, the AdamW settings from the replaced config's
    AdamW group (default_adamw: lr 8e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1), other
    options go to the optimizer."""
    config = _override('normuon.integrations.torchtitan.normuon={"lr": 0.01, "ns_steps": 4, '
                       '"comm_dtype": "bfloat16", "adamw_eps": 1e-7}')  # fmt: skip
    assert type(config) is Config and config.algorithm == "normuon"
    assert (config.lr, config.weight_decay) == (0.01, 0.0)
    assert (config.adamw_lr, config.adamw_betas, config.adamw_weight_decay) == (
        8e-4, (0.9, 0.95), 0.1)  # fmt: skip
    assert config.adamw_eps == 1e-7  # given: wins over the replaced config
    assert config.options == {"ns_steps": 4, "comm_dtype": "bfloat16"}
    assert config.implementation == "fused"  # torchtitan's default, kept
    options = config.optimizer_options()
    assert options["comm_dtype"] is torch.bfloat16 and options["ns_steps"] == 4
    # The shape rule's kernels (a resumed process runs what the first one ran) unless given.
    assert options["ns_kernel"] == "shape"
    assert Config(options={"ns_kernel": "auto"}).optimizer_options()["ns_kernel"] == "auto"
    muon = _override("normuon.integrations.torchtitan.muon")
    assert muon.algorithm == "muon" and muon.lr == 0.02 and muon.adamw_lr == 8e-4


def test_an_override_of_a_normuon_config_keeps_its_settings():
    """A config function already set NorMuonOptimizersContainer.Config: the override changes
    what it is given (and the algorithm), nothing else."""
    base = Config(lr=0.03, adamw_lr=1e-3, extra_adamw=["layers.0."], options={"ns_steps": 4})
    config = from_config(base, "muon", weight_decay=0.1, update_scale="adam_rms")
    assert (config.algorithm, config.lr, config.weight_decay, config.adamw_lr) == (
        "muon", 0.03, 0.1, 1e-3)  # fmt: skip
    assert config.extra_adamw == ["layers.0."]
    assert config.options == {"ns_steps": 4, "update_scale": "adam_rms"}
    assert base.options == {"ns_steps": 4}  # not shared with the new config


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ns_step": 4}, TypeError, r"unexpected keyword argument\(s\) \['ns_step'\]"),
        ({"lr": -1.0}, ValueError, r"^lr must be >= 0.0, got -1.0"),
        ({"options": {"lr": 0.1}}, ValueError, r"options repeats \['lr'\]"),
        ({"comm_dtype": "float33"}, ValueError, r"comm_dtype must be .* got 'float33'"),
        ({"implementation": "fused_opt_states_bf16"}, ValueError, r"state_dtype"),
        ({"extra_adamw": "router"}, TypeError, r"got the string 'router'"),
        ({"split_qkv": 1}, TypeError, r"split_qkv must be True or False, got 1"),
    ],
)
def test_invalid_settings_fail_when_the_config_is_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        from_config(default_adamw(), **kwargs)


def test_regex_routing_fields_are_refused():
    with pytest.raises(ValueError, match=r"param_groups must be empty, got 1 entries"):
        Config(param_groups=default_adamw().param_groups)
    with pytest.raises(ValueError, match=r"optimizer_factory_kwargs_by_name is not used"):
        Config(optimizer_factory_kwargs_by_name={"AdamW": {}})
    with pytest.raises(ValueError, match=r"algorithm must be one of \['muon', 'normuon'\]"):
        Config(algorithm="adamw")


# ------------------------------------------------------------------ routing by FQN


def test_debug_llama_routed_by_fqn_with_fused_and_foreach_in_every_group():
    """The trainer's call, Config.build(model_parts=[...]), on torchtitan's Llama 3 debug
    model: hidden matrices to NorMuon; embedding, norms and the output head to AdamW; FQNs as
    torchtitan's checkpoints name them; torchtitan's fused/foreach keys in every group."""
    model = _debug_model()
    container = Config(implementation="foreach").build(model_parts=[model])
    assert len(container) == 1 and type(container.optimizers[0]) is NorMuon
    muon = Config(algorithm="muon").build(model_parts=[_debug_model()])
    assert type(muon.optimizers[0]) is Muon and _by_algorithm(muon.optimizers[0]).keys() == {
        "muon", "adamw"}  # fmt: skip
    routed = _by_algorithm(container.optimizers[0])
    hidden = {f"layers.{i}.{m}.weight" for i in range(6) for m in (
        "attention.qkv_linear.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3")}  # fmt: skip
    assert set(routed["normuon"]) == hidden
    vectors = {f"layers.{i}.{n}_norm.weight" for i in range(6) for n in ("attention", "ffn")}
    assert set(routed["adamw"]) == {"tok_embeddings.weight", "norm.weight", "lm_head.weight"} | (
        vectors)  # fmt: skip
    for group in container.optimizers[0].param_groups:
        assert (group["fused"], group["foreach"]) == (False, True)
    # The container is a torch Optimizer over every parameter (hooks, e.g. MoE balancing).
    assert {id(p) for p in container.param_groups[0]["params"]} == {
        id(p) for p in model.parameters()}  # fmt: skip


def test_fqns_are_canonical_and_extra_adamw_matches_them():
    """Activation checkpointing inserts ``_checkpoint_wrapped_module`` into the module names;
    torchtitan's checkpoints and logs use the names without it, and so do ``param_names`` and
    ``extra_adamw``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _debug_model()
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    groups = torchtitan_param_groups(model, extra_adamw=["layers.5.feed_forward.", "wo.weight"])
    names = {g.get("algorithm", "matrix"): set(g["param_names"]) for g in groups}
    assert not any("_checkpoint" in n for ns in names.values() for n in ns)
    moved = {f"layers.5.feed_forward.w{i}.weight" for i in (1, 2, 3)} | {
        f"layers.{i}.attention.wo.weight" for i in range(6)}  # fmt: skip
    assert moved <= names["adamw"] and not moved & names["matrix"]
    assert "layers.4.feed_forward.w1.weight" in names["matrix"]
    with pytest.raises(ValueError, match=r"extra_adamw: no parameter FQN contains \['wq\.'\]"):
        torchtitan_param_groups(model, extra_adamw=["wq."])


def test_split_qkv_refuses_torchtitans_interleaved_wqkv():
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.qkv_linear\.wqkv .* interleave"):
        torchtitan_param_groups(_debug_model(device="meta"), split_qkv=True)


def test_deepseek_moe_experts_are_stacks_and_routers_adamw():
    """torchtitan's MoE (DeepSeek-V3 debug model): the routed experts are (E, F, D) and
    (E, D, F) stacks used as x @ W[e].T, so each is E matrices with their outputs on dim 1
    (one NorMuon neuron per row of each expert); the router's gate (inside the router module)
    goes to AdamW, the shared experts are plain matrices."""
    from normuon.grouping import describe_groups

    model = _debug_model("deepseek_v3", device="meta")
    groups = torchtitan_param_groups(model)
    rows = {r.name: r for r in describe_groups(model, groups).rows}
    experts = rows["layers.1.moe.routed_experts.inner_experts.w1_EFD"]
    assert experts.algorithm == "matrix" and experts.layout == "auto"
    e, f, d = experts.shape
    assert experts.neurons == e * f
    assert rows["layers.1.moe.routed_experts.inner_experts.w2_EDF"].neurons == e * d
    assert rows["layers.1.moe.router.gate.weight"].algorithm == "adamw"
    assert rows["layers.1.moe.shared_experts.w1.weight"].algorithm == "matrix"
    assert rows["lm_head.weight"].algorithm == "adamw"


# ------------------------------------------------------------------ init_optim_state


def test_init_optim_state_changes_nothing_in_the_container():
    """torchtitan calls init_optim_state (a zero-gradient step at lr 0) before saving and
    loading. The container creates its state when built (zeros, AdamW step 0), so that call
    finds state and returns: weights and state stay as they are, and the first real step is the
    first step (AdamW's bias correction of step 1), bit for bit a fresh optimizer's."""
    torch.manual_seed(0)
    model = _debug_model()
    reference = _debug_model()
    reference.load_state_dict(model.state_dict())
    container = Config(options={"ns_dtype": "float32"}).build(model_parts=[model])
    optimizer = container.optimizers[0]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_optim_state(optimizer)
    container.state_dict()  # what torchtitan's checkpointer calls before the first step
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for p, state in optimizer.state.items():
        for key, value in state.items():
            assert not value.any(), (key, tuple(p.shape))  # zeros, AdamW step 0 included
    assert all(p.grad is None for p in model.parameters())
    fresh = NorMuon(param_groups(reference), **Config(options={"ns_dtype": "float32"})
                    .optimizer_options())  # fmt: skip
    # The same options, hence the same Newton-Schulz kernels (another kernel rounds otherwise).
    assert fresh.ns_kernel == optimizer.ns_kernel == "shape"
    grads = [torch.randn_like(p) for p in model.parameters()]
    for opt, net in ((optimizer, model), (fresh, reference)):
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    assert all(s["step"].item() == 1 for s in optimizer.state.values() if "step" in s)


@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_a_bare_optimizer_under_torchtitans_dummy_step(cls):
    """torchtitan's init_optim_state run on a NorMuon that has no state yet: weights, momentum,
    second moment and AdamW's moments stay zero-changed, lr is restored, and AdamW counts the
    step exactly as torch.optim.AdamW does under the same call (step 1: a zero gradient at lr
    0 is a step). The container never runs it (previous test)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = cls([{"params": [("w", w)]}, {"params": [("b", b)], "algorithm": "adamw"}], lr=0.02,
              weight_decay=0.1, adamw_lr=1e-3, adamw_weight_decay=0.1)  # fmt: skip
    init_optim_state(opt)
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-3]
    assert w.grad is None and b.grad is None
    assert not opt.state[w]["momentum_buffer"].any()
    if cls is NorMuon:
        assert not opt.state[w]["neuron_second_moment"].any()
    assert not opt.state[b]["exp_avg"].any() and not opt.state[b]["exp_avg_sq"].any()
    torch_b = nn.Parameter(b0.clone())
    torch_adamw = torch.optim.AdamW([torch_b], lr=1e-3, weight_decay=0.1)
    init_optim_state(torch_adamw)
    assert opt.state[b]["step"].item() == torch_adamw.state[torch_b]["step"].item() == 1


# ------------------------------------------------------------------ state dict, parts, schedulers


class _Part(nn.Module):
    def __init__(self, head: bool):
        super().__init__()
        self.layers = nn.ModuleDict({"0": nn.Linear(16, 32), "1": nn.Linear(32, 16)})
        self.lm_head = nn.Linear(16, 24, bias=False) if head else None


def test_flat_fqn_state_dict_round_trip_and_one_optimizer_per_model_part():
    """Two model parts (pipeline stages), one holding no hidden matrix: one optimizer each;
    the flat state dict (``state.{fqn}.{key}``, ``param_groups.{fqn}.{key}``) saved after
    some steps loads into a new container, which then steps exactly as the original."""
    torch.manual_seed(0)

    def parts():
        torch.manual_seed(1)
        embed_only = nn.ModuleDict({"tok_embeddings": nn.Embedding(24, 16),
                                    "norm": nn.LayerNorm(16)})  # fmt: skip
        return [embed_only, _Part(head=True)]

    a_parts, b_parts = parts(), parts()
    config = Config(options={"ns_dtype": "float32"}, weight_decay=0.01)
    a = config.build(model_parts=a_parts)
    assert len(a) == 2 and [len(o.param_groups) for o in a] == [1, 2]
    assert [g["algorithm"] for g in a.optimizers[0].param_groups] == ["adamw"]
    params = [p for part in a_parts for p in part.parameters()]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]

    def step(container, model_parts, g):
        for p, gi in zip((p for m in model_parts for p in m.parameters()), g):
            p.grad = gi.clone()
        container.step()
        container.zero_grad()

    for g in grads[:2]:
        step(a, a_parts, g)
    flat = a.state_dict()
    assert "state.1.layers.0.weight.momentum_buffer" not in flat  # FQNs of the part itself
    assert flat["state.layers.0.weight.momentum_buffer"].shape == (32, 16)
    assert flat["state.layers.0.weight.neuron_second_moment"].shape == (32,)
    assert flat["state.tok_embeddings.weight.step"].item() == 2
    assert flat["param_groups.layers.0.weight.fused"] is True
    assert flat["param_groups.lm_head.weight.algorithm"] == "adamw"
    b = config.build(model_parts=b_parts)
    for pa, pb in zip((p for m in a_parts for p in m.parameters()),
                      (p for m in b_parts for p in m.parameters())):  # fmt: skip
        pb.data.copy_(pa.data)
    b.load_state_dict(flat)
    for g in grads[2:]:
        step(a, a_parts, g)
        step(b, b_parts, g)
    for pa, pb in zip((p for m in a_parts for p in m.parameters()),
                      (p for m in b_parts for p in m.parameters())):  # fmt: skip
        assert torch.equal(pa, pb)


def test_torchtitans_lr_scheduler_scales_every_group_of_every_part():
    """LRSchedulersContainer (one LambdaLR per optimizer) scales the matrix groups and the AdamW
    group alike, each from its own initial lr."""
    model_parts = [_Part(head=False), _Part(head=True)]
    container = Config(lr=0.02, adamw_lr=1e-3).build(model_parts=model_parts)
    schedulers = LRSchedulersContainer.Config(warmup_steps=4, decay_type="linear").build(
        optimizers=container, training_steps=10)  # fmt: skip
    seen = 0
    for step in range(1, 7):
        for p in container.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        container.step()
        schedulers.step()
        factor = schedulers.schedulers[0].lr_lambdas[0](step)
        for optimizer in container:
            for group in optimizer.param_groups:
                base = 0.02 if group["algorithm"] == "normuon" else 1e-3
                assert group["initial_lr"] == base
                assert group["lr"] == pytest.approx(base * factor)
                seen += 1
    assert seen == 6 * 4 and factor not in (0.0, 1.0)


# ------------------------------------------------------------------ torchtitan's trainer


def _torchrun(world: int, folder: Path, *args: str, metrics: Path | None = None,
              config: str = "llama3_debugmodel_cpu", module: str = "torchtitan_cpu") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    if metrics is not None:
        env["NORMUON_TT_METRICS"] = str(metrics)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), str(LAUNCHER), "--module", module,
           "--config", config, "--dump_folder", str(folder), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


#: Every run: the same seed weights, data, LR schedule (6 steps: warmup 2, stable, linear decay
#: to 0.25) and NorMuon options (float32 Newton-Schulz, so the only differences left are the
#: order of float32 sums); torchtitan's default AdamW (lr 8e-4, weight decay 0.1) for the rest.
STEPS, GLOBAL_BATCH, SEQ_LEN = 6, 4, 64
OVERRIDE = 'normuon.integrations.torchtitan.normuon={"lr": 0.02, "ns_dtype": "float32"}'
COMMON = ("--checkpoint.enable", "--checkpoint.interval", "3", "--training.steps", str(STEPS),
          "--training.seq_len", str(SEQ_LEN), "--override.imports", OVERRIDE)  # fmt: skip


@pytest.mark.distributed
def test_the_packaged_debug_config_is_found_by_its_dotted_module_path(tmp_path):
    """The config of the documented CUDA command (``--module normuon.integrations.torchtitan_data
    --config llama3_debugmodel``), found by torchtitan's own lookup of a dotted module path and
    trained with NorMuon by its trainer at 2 ranks (here through the CPU launcher, in float32 and
    on short sequences: the config is otherwise the one CUDA runs)."""
    args = ("--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size",
            "2", "--training.mixed_precision_param", "float32", "--override.imports", OVERRIDE)
    _torchrun(2, tmp_path / "run", *args, metrics=tmp_path / "metrics.jsonl",
              module="normuon.integrations.torchtitan_data", config="llama3_debugmodel")
    losses = _losses(tmp_path / "metrics.jsonl")
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)


def _checkpoint(path: Path) -> dict:
    """A DCP checkpoint folder as one dict (model weights under their names, the optimizer's
    flat FQN-keyed state under "optimizer"), DTensors as whole tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:  # not beside a seed other workers read
        dcp_to_torch_save(path, Path(tmp) / "checkpoint.pt")
        return torch.load(Path(tmp) / "checkpoint.pt", weights_only=False)


def _start_from(seed: Path, folder: Path, step: str = "step-0") -> Path:
    """A run folder whose checkpoint folder holds ``step``: torchtitan loads it at start (step 0:
    the model only)."""
    (folder / "checkpoint").mkdir(parents=True)
    shutil.copytree(seed / step, folder / "checkpoint" / step)
    return folder


def _shared_seed(tmp_path_factory, config: str) -> Path:
    """torchtitan's seed checkpoint of ``config`` (one process), made once per session for all
    its xdist workers (whose base folders share a parent); returns its checkpoint folder."""
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent
    shared = session / f"torchtitan-seed-{config}"
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "checkpoint" / "step-0").exists():
            shutil.rmtree(shared, ignore_errors=True)
            _torchrun(1, shared, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                      "--override.imports", OVERRIDE, config=config)  # fmt: skip
        fcntl.flock(lock, fcntl.LOCK_UN)
    return shared / "checkpoint"


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """torchtitan's seed checkpoint (one process), and NorMuon outside torchtitan trained from
    it: the same model class and weights, plain torch forward and cross-entropy, NorMuon over
    normuon.param_groups, torchtitan's LR function, gradient clipping at 1."""
    from normuon.harness.data import load_data

    root = tmp_path_factory.mktemp("torchtitan")
    seed = _shared_seed(tmp_path_factory, "llama3_debugmodel_cpu")
    model = _debug_model()
    names = set(model.state_dict())
    model.load_state_dict({k: v for k, v in _checkpoint(seed / "step-0").items() if k in names})
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    adamw = {"adamw_lr": 8e-4, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8,
             "adamw_weight_decay": 0.1}  # torchtitan's default_adamw(lr=8e-4)
    optimizer = NorMuon(param_groups(model), lr=0.02, ns_dtype="float32", **adamw)
    schedule = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8).build(
        optimizers=[optimizer], training_steps=STEPS)  # fmt: skip
    tokens, losses = load_data().train, []
    for step in range(STEPS):
        inputs, labels = corpus_rows(tokens, step * GLOBAL_BATCH, GLOBAL_BATCH, SEQ_LEN, seed=0)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                           reduction="sum") / labels.numel()  # fmt: skip
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"root": root, "seed": seed, "initial": initial, "weights": model.state_dict(),
            "losses": losses}  # fmt: skip


def _losses(path: Path, rank: int = 0) -> list[float]:
    """The losses rank ``rank`` logged, by step (pipeline parallelism: a last-stage rank)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if r["rank"] == rank]


def _assert_weights_match(weights: dict, expected: dict, initial: dict, tol: float = 2e-3) -> None:
    """Every weight within ``tol`` of the expected one, measured against what training changed:
    |W - W_expected| <= tol |W_expected - W_initial| (Frobenius). Float32 rounding (FSDP's
    reduce-scatter, the chunked loss) leaves about 2e-4 here after 6 steps."""
    for name, value in expected.items():
        change = (value - initial[name]).norm()
        assert change > 0, name
        error = (weights[name] - value).norm() / change
        assert error <= tol, (name, error)


@pytest.mark.distributed
def test_fsdp2_equals_normuon_outside_torchtitan_and_resumes_at_another_world_size(seed_run):
    """torchtitan's trainer, FSDP2 on 2 ranks (each rank half of the global batch), NorMuon by
    the override: the same losses and weights as NorMuon outside torchtitan, to float32
    rounding. Its checkpoint of step 3 (DCP, flat FQN-keyed optimizer state, DTensor momentum
    sharded over 2 ranks) resumed in one process continues to the same step 6: weights,
    momentum, second moments, AdamW moments and step counters, and the scheduled lr."""
    root = seed_run["root"]
    fsdp = _start_from(seed_run["seed"], root / "fsdp")
    _torchrun(2, fsdp, *COMMON, "--training.local_batch_size", str(GLOBAL_BATCH // 2),
              metrics=root / "fsdp.jsonl")  # fmt: skip
    assert _losses(root / "fsdp.jsonl") == pytest.approx(seed_run["losses"], rel=1e-5)
    final = _checkpoint(fsdp / "checkpoint" / f"step-{STEPS}")
    _assert_weights_match(final, seed_run["weights"], seed_run["initial"])

    resumed = _start_from(fsdp / "checkpoint", root / "resumed", "step-3")
    _torchrun(1, resumed, *COMMON, "--training.local_batch_size", str(GLOBAL_BATCH),
              metrics=root / "resumed.jsonl")  # fmt: skip
    assert _losses(root / "resumed.jsonl") == pytest.approx(
        _losses(root / "fsdp.jsonl")[3:], rel=1e-5)  # fmt: skip
    again = _checkpoint(resumed / "checkpoint" / f"step-{STEPS}")
    _assert_weights_match(again, {k: final[k] for k in seed_run["weights"]},
                          seed_run["initial"])  # fmt: skip
    state, state_again = final["optimizer"], again["optimizer"]
    assert set(state) == set(state_again)
    kinds = {key.rsplit(".", 1)[-1] for key in state if key.startswith("state.")}
    assert kinds == {"momentum_buffer", "neuron_second_moment", "exp_avg", "exp_avg_sq", "step"}
    for key, value in state.items():
        if key.endswith(".step"):
            assert value.item() == state_again[key].item() == STEPS, key
        elif isinstance(value, torch.Tensor):
            assert value.norm() > 0, key  # trained state, not zeros
            assert (state_again[key] - value).norm() <= 1e-3 * value.norm(), key
        else:  # group keys: lr (scheduled), fused, foreach, algorithm, ...
            assert state_again[key] == value, key
    assert state["param_groups.layers.0.feed_forward.w1.weight.fused"] is True


_LAYOUTS = {
    "tp2": (2, ("--parallelism.tensor_parallel_degree", "2"), 0),
    "fsdp2xtp2": (4, ("--parallelism.tensor_parallel_degree", "2",
                      "--parallelism.data_parallel_shard_degree", "2"), 0),
    # Interleaved 1F1B: 4 stages, 2 model parts (2 optimizers) per rank, 4 microbatches; the
    # last stage, which logs the loss, is on rank 1.
    "pp2": (2, ("--parallelism.pipeline_parallel_degree", "2"), 1),
}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_tp_fsdp_x_tp_and_pipeline_parallel_equal_normuon_outside_torchtitan(seed_run, layout):
    """Tensor parallel 2 (Colwise/Rowwise shards of every Linear), FSDP 2 x TP 2 on a 2-D mesh
    and pipeline parallel 2 (one NorMuon per model part): the same losses and weights as NorMuon
    outside torchtitan."""
    world, args, loss_rank = _LAYOUTS[layout]
    root = seed_run["root"]
    run = _start_from(seed_run["seed"], root / layout)
    dp = 2 if layout == "fsdp2xtp2" else 1
    _torchrun(world, run, *COMMON, *args, "--training.local_batch_size", str(GLOBAL_BATCH // dp),
              metrics=root / f"{layout}.jsonl")  # fmt: skip
    losses = _losses(root / f"{layout}.jsonl", rank=loss_rank)
    assert losses == pytest.approx(seed_run["losses"], rel=1e-5)
    final = _checkpoint(run / "checkpoint" / f"step-{STEPS}")
    _assert_weights_match(final, seed_run["weights"], seed_run["initial"])


def _replay_last_step(before: dict, after: dict, fqn: str) -> torch.Tensor:
    """The weight ``fqn`` of checkpoint ``after`` recomputed by a one-process NorMuon from
    checkpoint ``before`` (weight, every state entry and the group's options, lr included) and
    the gradient the two first moments imply: M' = beta M + (1 - beta) G (a matrix's momentum
    with beta = momentum, AdamW's exp_avg with beta = betas[0])."""
    prefix = f"param_groups.{fqn}."
    options = {k[len(prefix):]: v for k, v in before["optimizer"].items()
               if k.startswith(prefix) and "." not in k[len(prefix):]}  # fmt: skip
    param = nn.Parameter(before[fqn].clone())
    optimizer = NorMuon([{"params": [param], **options}])
    optimizer.init_state()
    state = optimizer.state[param]
    for key in state:
        state[key].copy_(before["optimizer"][f"state.{fqn}.{key}"])
    adamw = options["algorithm"] == "adamw"
    first, beta = ("exp_avg", options["betas"][0]) if adamw else ("momentum_buffer",
                                                                  options["momentum"])
    moment, new = (c["optimizer"][f"state.{fqn}.{first}"] for c in (before, after))
    param.grad = (new - beta * moment) / (1 - beta)
    optimizer.step()
    return param.detach()


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_moe_equals_one_process(tmp_path_factory, tmp_path):
    """torchtitan's expert parallelism (DeepSeek-V3 debug model cut to a dense and an MoE layer,
    EP 2 borrowed from FSDP 2: each rank holds 4 of the 8 experts of each (E, F, D) stack and
    NorMuon orthogonalizes them where they live), against the same model trained by torchtitan
    in one process from the same seed weights; the router (AdamW) and the expert-bias load
    balancing (the container's step pre-hook) run in both.

    torchtitan computes the experts with bf16 grouped GEMMs whose rounding depends on the token
    layout, which EP changes, so the experts' gradients differ at bf16 precision (their momenta
    by ~1e-3) and NorMuon amplifies that in their updates. So does the router's: its gradient
    is a sum of products with the experts' bf16 outputs, and AdamW's first steps normalize
    each entry's gradient by its own size, so entries near zero move by up to the lr whatever
    their rounding (seen: the router 0.6e-3 to 9.8e-3 of its change away from the one-process
    run, varying with the seed weights). The experts' and the router's last steps are
    therefore checked on the EP run's own gradients: recomputed by a one-process NorMuon from
    the checkpoints before and after them, they give the same weights; the router is also
    within 5% of its change of the one-process run. Everything else equals the one-process
    run to float32 rounding."""
    config = "deepseek_v3_debugmodel_cpu"
    seed = _shared_seed(tmp_path_factory, config)
    args = ("--checkpoint.enable", "--checkpoint.interval", "1", "--training.steps", "3",
            "--override.imports", OVERRIDE)  # fmt: skip
    one = _start_from(seed, tmp_path / "one")
    _torchrun(1, one, *args, metrics=tmp_path / "one.jsonl", config=config)
    ep = _start_from(seed, tmp_path / "ep")
    _torchrun(2, ep, *args, "--parallelism.expert_parallel_degree", "2",
              "--training.local_batch_size", "2", metrics=tmp_path / "ep.jsonl", config=config)
    assert _losses(tmp_path / "ep.jsonl") == pytest.approx(_losses(tmp_path / "one.jsonl"),
                                                           rel=1e-4)  # fmt: skip
    initial = _checkpoint(seed / "step-0")
    expected = _checkpoint(one / "checkpoint" / "step-3")
    got, before = (_checkpoint(ep / "checkpoint" / f"step-{s}") for s in (3, 2))
    experts = [f"layers.1.moe.routed_experts.inner_experts.{w}" for w in
               ("w1_EFD", "w2_EDF", "w3_EFD")]  # fmt: skip
    router = "layers.1.moe.router.gate.weight"
    weights = {k: v for k, v in expected.items() if k in initial and k not in experts
               and isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    assert router in weights and "lm_head.weight" in weights
    _assert_weights_match(got, {k: v for k, v in weights.items() if k != router}, initial)
    _assert_weights_match(got, {router: weights[router]}, initial, tol=5e-2)
    for fqn in experts:
        assert got[fqn].shape == (8, 256, 256)
    for fqn in (*experts, router):
        replayed = _replay_last_step(before, got, fqn)
        change = (got[fqn] - before[fqn]).norm()
        assert change > 0 and (replayed - got[fqn]).norm() <= 1e-4 * change, fqn
    state = got["optimizer"]
    assert state[f"state.{experts[0]}.neuron_second_moment"].shape == (8, 256)  # E x F neurons
    assert "state.layers.1.moe.router.gate.weight.exp_avg" in state  # the router: AdamW
