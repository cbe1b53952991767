"""Where should an MoE router go: NorMuon (a matrix) or AdamW (like a head)? An experiment.

A router (Mixtral's ``mlp.gate``, an (E, d) weight with one row per expert) is a 2-D matrix, so
a plain "2-D weights to the matrix algorithm" rule would orthogonalize it. Its few rows are not
hidden neurons, and an orthogonalized update moves every expert's logit row by the same amount,
so the alternative is AdamW, where ``normuon.param_groups`` sends routers since this experiment
(docs/moe-router.md). This trains a
tiny transformers Mixtral on the embedded Shakespeare corpus (bytes) both ways with the same
seeds, batches and schedule, and reports the final validation loss per seed, the mean
difference with a 95% confidence interval, and how evenly the tokens spread over the experts.

    python examples/moe_router.py [--steps 300] [--seeds 3] [--out docs/moe-router.md] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from normuon import NorMuon, param_groups
from normuon.harness.data import get_batch, load_data, validation_batches

#: two-sided 95% Student t quantiles by degrees of freedom (1..9)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def build_model(seed: int, d: int, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=256, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
        output_router_logits=False,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def expert_balance(model, tokens: torch.Tensor) -> float:
    """Entropy of the top-1 expert histogram over ``tokens`` / log(E): 1 is perfectly even."""
    counts = None
    hooks = []

    def record(module, inputs, output):
        nonlocal counts
        logits = output[0] if isinstance(output, tuple) else output
        top = logits.argmax(dim=-1).flatten()
        hist = torch.bincount(top, minlength=logits.shape[-1]).double()
        counts = hist if counts is None else counts + hist

    for layer in model.model.layers:
        hooks.append(layer.mlp.gate.register_forward_hook(record))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return entropy / math.log(len(p))


def groups_for(model, router: str, args) -> list[dict]:
    """``param_groups``' routing (routers to AdamW), or with the routers moved to a matrix
    group of their own (``router="normuon"``: what a plain 2-D rule would do)."""
    groups = param_groups(model, lr=args.lr, adamw_lr=args.adamw_lr)
    routers = [layer.mlp.gate.weight for layer in model.model.layers]
    ids = {id(p) for p in routers}
    adamw = next(g for g in groups if g.get("algorithm") == "adamw")
    assert ids <= {id(p) for p in adamw["params"]}, "param_groups no longer routes routers"
    if router == "normuon":
        adamw["params"] = [p for p in adamw["params"] if id(p) not in ids]
        groups.append({"params": routers, "lr": args.lr})
    return groups


def train(router: str, seed: int, args, data) -> tuple[float, float]:
    model = build_model(seed, args.d, args.experts)
    opt = NorMuon(groups_for(model, router, args), ns_dtype=torch.float32)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * max(0.0, 1 - t / args.steps)
    )
    for step in range(args.steps):
        x, y = get_batch(data.train, args.batch, args.seq, seed, step)
        loss = model(x, labels=None).logits.flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(loss, y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    val = validation_batches(data.val, args.batch, args.seq, 4)
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
            for x, y in val
        ]
    return statistics.fmean(losses), expert_balance(model, val[0][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="2 seeds x 8 steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.d = 8, 2, 16
    torch.set_num_threads(args.threads)
    data = load_data()
    started = time.time()
    results = {"normuon": [], "adamw": []}
    for seed in range(args.seeds):
        for router in results:
            results[router].append(train(router, seed, args, data))
            print(f"seed {seed} router {router}: val loss {results[router][-1][0]:.4f}")
    diffs = [a[0] - n[0] for n, a in zip(results["normuon"], results["adamw"])]
    mean = statistics.fmean(diffs)
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    lines = [
        f"# MoE router: NorMuon or AdamW ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python examples/moe_router.py --steps {args.steps} --seeds {args.seeds}`; "
        f"tiny transformers Mixtral (d={args.d}, 2 layers, {args.experts} experts, top-2), "
        f"embedded Shakespeare bytes, batch {args.batch} x {args.seq}, NorMuon lr {args.lr} "
        f"(hidden matrices, experts included), AdamW lr {args.adamw_lr}, warmup then linear "
        f"decay; torch {torch.__version__}, {args.threads} threads, "
        f"{time.time() - started:.0f} s.",
        "",
        "| seed | router on NorMuon: val loss | router on AdamW: val loss | AdamW - NorMuon | "
        "expert balance (NorMuon / AdamW) |",
        "|---|---|---|---|---|",
    ]
    for seed, (n, a) in enumerate(zip(results["normuon"], results["adamw"])):
        lines.append(f"| {seed} | {n[0]:.4f} | {a[0]:.4f} | {a[0] - n[0]:+.4f} | "
                     f"{n[1]:.3f} / {a[1]:.3f} |")  # fmt: skip
    lines += [
        "",
        f"Mean difference (AdamW - NorMuon): {mean:+.4f} ± {half:.4f} (95% CI, paired over "
        f"{len(diffs)} seeds). Expert balance: entropy of the top-1 expert histogram on a "
        f"validation batch / log(E) (1 = even).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
