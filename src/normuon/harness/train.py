"""One training run: a GPT, one optimizer, one seed, metrics as JSON lines, resumable.

Layering: this module uses only the public API of the library (``NorMuon``, ``Muon``,
``param_groups``); the comparison (``compare.py``) calls :func:`train_run` once per
(optimizer, seed).

Files written into the run directory (rank 0 only):

- ``config.json``: the resolved :class:`~normuon.harness.config.RunConfig` plus run identity;
- ``metrics.jsonl``: one JSON object per line, ``{"kind": "train" | "val", "step": ...}``;
- ``checkpoint.pt``: model, optimizer, scheduler, RNG states and data position (atomic writes);
- ``result.json``: the summary (final validation loss, timings, optimizer state bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normuon import Muon, NorMuon, param_groups

from .config import OPTIMIZERS, SCHEDULES, OptimizerConfig, RunConfig, TrainConfig
from .data import TokenData, get_batch, validation_batches
from .model import GPT

__all__ = ["RunResult", "train_run", "build_optimizer", "LRSchedule", "optimizer_state_bytes"]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class RunResult:
    """Summary of one run (also written as ``result.json``)."""

    optimizer: str
    seed: int
    steps: int
    """Steps completed (less than the config's when stopped early with ``stop_at_step``)."""
    final_val_loss: float
    val_steps: list[int]
    val_losses: list[float]
    val_times: list[float]
    """Training wall time (seconds, evaluation excluded) at each validation point."""
    train_time_s: float
    optimizer_time_s: float
    optimizer_share: float
    """Fraction of training wall time spent in ``optimizer.step()``."""
    optimizer_state_bytes: int
    tokens_per_s: float
    n_params: int
    device: str
    out_dir: str


class LRSchedule:
    """Multiplier of the peak lr at a step, for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object rather than a closure, so that LambdaLR's state_dict holds only its
    (primitive) attributes and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
        self.kind = cfg.schedule
        self.steps = cfg.steps
        self.warmup = cfg.warmup_steps
        self.cooldown = int(round(cfg.cooldown_frac * cfg.steps))
        self.floor = cfg.min_lr_frac

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_start = self.steps - self.cooldown
            if step < decay_start or self.cooldown == 0:
                return 1.0
            frac = (step - decay_start) / self.cooldown  # 0 -> 1 over the cooldown
        else:
            frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        frac = min(max(frac, 0.0), 1.0)
        if self.kind == "cosine":
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.floor + (1.0 - self.floor) * (1.0 - frac)  # wsd cooldown and "linear"


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bfloat16 Newton-Schulz as the authors on GPUs; CPUs without bf16 matmul units run
        # float32 faster (and exactly), so the CPU presets use it.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_optimizer(
    name: str, model: nn.Module, ocfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (adamw, muon, normuon) over ``model`` with ``ocfg``'s settings.

    All three use the same split from :func:`normuon.param_groups`: hidden matrices get weight
    decay (AdamW) or Muon/NorMuon; embeddings, head and vectors get AdamW without decay.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        groups = param_groups(model)
        hidden = [p for g in groups if g.get("algorithm") != "adamw" for p in g["params"]]
        rest = [p for g in groups if g.get("algorithm") == "adamw" for p in g["params"]]
        return torch.optim.AdamW(
            [{"params": hidden, "weight_decay": ocfg.weight_decay},
             {"params": rest, "weight_decay": 0.0}],
            lr=ocfg.lr, betas=ocfg.betas, eps=1e-8,
        )  # fmt: skip
    groups = param_groups(
        model, lr=ocfg.lr, weight_decay=ocfg.weight_decay, adamw_lr=ocfg.adamw_lr,
        adamw_betas=ocfg.betas, adamw_weight_decay=0.0,
    )  # fmt: skip
    common: dict[str, Any] = dict(
        momentum=ocfg.momentum,
        update_scale=ocfg.update_scale,
        ns_dtype=_ns_dtype(ocfg.ns_dtype, device),
    )
    if name == "muon":
        return Muon(groups, **common)
    return NorMuon(groups, beta2=ocfg.beta2, **common)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor in ``optimizer.state`` (this rank's share)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


# ------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: str | None) -> tuple[_Dist, torch.device]:
    """Process group under torchrun (WORLD_SIZE > 1), and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_arg in (None, "auto", "cuda")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local)
            return _Dist(rank, world, local), torch.device("cuda", local)
        return _Dist(rank, world, local), torch.device("cpu")
    if device_arg in (None, "auto"):
        return _Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return _Dist(), torch.device(device_arg)
    except RuntimeError as exc:
        raise ValueError(f"invalid --device {device_arg!r}: {exc}") from None


def _wrap_model(model: nn.Module, cfg: TrainConfig, d: _Dist, device: torch.device) -> nn.Module:
    """The module the training loop calls: DDP or FSDP2 under torchrun, optionally compiled.

    FSDP2 (``parallel="fsdp2"``) shards every block and then the root with
    ``torch.distributed.fsdp.fully_shard`` on a 1-D mesh; the parameters become DTensors in
    place, so the optimizer built afterwards on ``model`` takes NorMuon's DTensor path.
    """
    if d.world > 1:
        if cfg.parallel == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (d.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
    if cfg.compile:
        model = torch.compile(model)
    return model


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_state(model: nn.Module, opt: torch.optim.Optimizer, d: _Dist) -> tuple[Any, Any]:
    """Model and optimizer state with whole tensors on the CPU, whatever the parallelism.

    A collective under torchrun (call it on every rank). Sharded (FSDP2) models go through
    torch.distributed.checkpoint.state_dict, which keys the optimizer state by parameter name.
    """
    if d.world > 1 and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=options)
    # NorMuon/Muon's state_dict() gathers the owners' shares under replicated DDP (a
    # collective, hence called on every rank), so it is whole here too.
    return model.state_dict(), opt.state_dict()


def _load_full_state(
    model: nn.Module, opt: torch.optim.Optimizer, model_sd: Any, opt_sd: Any, d: _Dist
) -> None:
    """Inverse of :func:`_full_state`: every rank passes the whole saved state."""
    if d.world > 1 and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd,
                       options=options)  # fmt: skip
        return
    model.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace (atomic rename)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------- the loop


def _progress(total: int, initial: int, enabled: bool | None, desc: str):
    """A tqdm bar, or None when disabled (not a TTY, CI=true, or asked)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: the library itself does not depend on tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)


def train_run(
    cfg: RunConfig,
    optimizer: str,
    data: TokenData,
    *,
    seed: int = 0,
    out_dir: str | Path,
    device: str | None = None,
    resume: bool = False,
    stop_at_step: int | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Train ``cfg``'s GPT on ``data`` with ``optimizer`` and return the run's summary.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` and reproduces exactly the curve of
    an uninterrupted run. ``stop_at_step`` checkpoints and returns after that many steps (to
    split a run into sessions, and for tests).
    """
    if optimizer not in cfg.optimizers:
        raise ValueError(
            f"optimizer {optimizer!r} has no settings in preset {cfg.preset!r} "
            f"(has: {', '.join(cfg.optimizers)})"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    cfg.model.vocab_size = data.vocab_size  # the data decides the vocabulary
    cfg.validate()
    tcfg, ocfg = cfg.train, cfg.optimizers[optimizer]
    d, dev = _init_distributed(device)
    local_batch, rem = divmod(tcfg.batch_size, d.world * tcfg.grad_accum)
    if rem:
        raise ValueError(
            f"batch_size={tcfg.batch_size} is not divisible by world size x grad_accum = "
            f"{d.world} x {tcfg.grad_accum}"
        )
    out = Path(out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    run_identity = {"optimizer": optimizer, "seed": seed, "data": data.source,
                    "world_size": d.world, "config": cfg.to_dict()}  # fmt: skip

    torch.manual_seed(seed)  # model init depends on the seed only, not on the optimizer
    raw_model = GPT(cfg.model).to(dev)
    n_params = sum(p.numel() for p in raw_model.parameters())
    model = _wrap_model(raw_model, tcfg, d, dev)
    opt = build_optimizer(optimizer, raw_model, ocfg, dev)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(tcfg))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and tcfg.autocast_bf16
        else contextlib.nullcontext()
    )
    val_set = validation_batches(data.val, tcfg.batch_size, tcfg.seq_len, tcfg.val_batches)

    step, train_time, opt_time = 0, 0.0, 0.0
    metrics_path, ckpt_path = out / "metrics.jsonl", out / CHECKPOINT_NAME
    history: list[dict[str, Any]] = []
    if resume:
        if not ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = json.loads(ckpt["run_json"])
        if saved != json.loads(json.dumps(run_identity)):
            raise ValueError(
                f"--resume: {ckpt_path} was written by a different run (config, optimizer, seed, "
                f"data or world size differ); start a fresh run in another --out folder"
            )
        _load_full_state(raw_model, opt, ckpt["model"], ckpt["optimizer"], d)
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if dev.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], dev)
        step, train_time, opt_time = ckpt["step"], ckpt["train_time"], ckpt["opt_time"]
        if metrics_path.exists():
            # Lines written after the checkpoint (a crash) are dropped: they will be redone.
            lines = metrics_path.read_text().splitlines()
            history = [r for r in map(json.loads, lines) if r["step"] <= step]
    if d.main:
        _write_json(out / "config.json", run_identity)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if d.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def shard(x: torch.Tensor) -> list[torch.Tensor]:
        # Global batch (B, T) -> this rank's rows -> grad_accum micro-batches on the device.
        mine = x[d.rank * tcfg.batch_size // d.world : (d.rank + 1) * tcfg.batch_size // d.world]
        return list(mine.to(dev, non_blocking=True).chunk(tcfg.grad_accum))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=dev, dtype=torch.float64)
        for x, y in val_set:
            for xm, ym in zip(shard(x), shard(y), strict=True):
                with autocast:
                    total += model(xm, ym).double()
        model.train()
        if d.world > 1:
            dist.all_reduce(total)
        return float(total) / (len(val_set) * tcfg.grad_accum * d.world)

    def save_checkpoint() -> None:
        model_state, opt_state = _full_state(raw_model, opt, d)  # collective under torchrun
        if not d.main:
            return
        _atomic_save(
            {
                "step": step,  # also the data position: batch s depends only on (seed, s)
                "model": model_state,
                "optimizer": opt_state,
                "scheduler": sched.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "train_time": train_time,
                "opt_time": opt_time,
                # Train-loss accumulator since the last log line, so logged losses match too.
                "loss_sum": loss_sum.detach().cpu(),
                "loss_count": loss_count,
                "run_json": json.dumps(run_identity),
            },
            ckpt_path,
        )

    loss_sum = torch.zeros((), device=dev)
    loss_count = 0
    if resume:
        loss_sum.copy_(ckpt["loss_sum"])
        loss_count = ckpt["loss_count"]
    if step == 0:
        log({"kind": "val", "step": 0, "val_loss": evaluate(), "time": 0.0})
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    end = tcfg.steps if stop_at_step is None else min(tcfg.steps, stop_at_step)
    bar = _progress(tcfg.steps, step, progress if d.main else False, f"{optimizer} seed {seed}")
    model.train()
    while step < end:
        _sync(dev)
        t0 = time.perf_counter()
        x, y = get_batch(data.train, tcfg.batch_size, tcfg.seq_len, seed, step)  # (B, T) each
        for i, (xm, ym) in enumerate(zip(shard(x), shard(y), strict=True)):
            last = i == tcfg.grad_accum - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync_ctx = model.no_sync() if (d.world > 1 and not last and hasattr(model, "no_sync")) \
                else contextlib.nullcontext()  # fmt: skip
            with sync_ctx, autocast:
                loss = model(xm, ym) / tcfg.grad_accum
            with sync_ctx:
                loss.backward()
            loss_sum += loss.detach()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
        lr_now = opt.param_groups[0]["lr"]
        _sync(dev)
        t1 = time.perf_counter()
        opt.step()
        _sync(dev)
        t2 = time.perf_counter()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_count += 1
        train_time += time.perf_counter() - t0
        opt_time += t2 - t1
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            train_loss = float(loss_sum) / loss_count
            loss_sum.zero_()
            loss_count = 0
            tok_s = step * tokens_per_step / max(train_time, 1e-9)
            log({"kind": "train", "step": step, "train_loss": train_loss, "lr": lr_now,
                 "time": train_time, "tokens_per_s": tok_s})  # fmt: skip
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % tcfg.val_every == 0 or step == tcfg.steps:
            val = evaluate()
            log({"kind": "val", "step": step, "val_loss": val, "time": train_time})
            if not math.isfinite(val):
                if bar is not None:
                    bar.close()
                raise FloatingPointError(
                    f"{optimizer} (seed {seed}) diverged: validation loss {val} at step {step}; "
                    f"lower the learning rate"
                )
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
            save_checkpoint()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    save_checkpoint()

    vals = [r for r in history if r["kind"] == "val"]
    result = RunResult(
        optimizer=optimizer,
        seed=seed,
        steps=step,
        final_val_loss=vals[-1]["val_loss"],
        val_steps=[r["step"] for r in vals],
        val_losses=[r["val_loss"] for r in vals],
        val_times=[r["time"] for r in vals],
        train_time_s=train_time,
        optimizer_time_s=opt_time,
        optimizer_share=opt_time / train_time if train_time > 0 else 0.0,
        optimizer_state_bytes=optimizer_state_bytes(opt),
        tokens_per_s=step * tokens_per_step / train_time if train_time > 0 else 0.0,
        n_params=n_params,
        device=str(dev),
        out_dir=str(out),
    )
    if d.main:
        _write_json(out / "result.json", dataclasses.asdict(result))
    return result
