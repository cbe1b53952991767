"""Speed and accuracy of the Newton-Schulz methods against the float64 SVD polar factor.

    python benchmarks/ns_quality.py [--reps N] [--quick] [--threads N] [--out benchmarks/results]

Coefficients: Muon's quintic (5 steps, the optimizers' default), Polar Express 5 and 4 steps,
and the fast mode (normuon.newton_schulz.fast_ns_coefficients: 4 Polar Express steps designed
for singular values in [1e-2, 1]). Methods: the standard loop, the Gram-matrix iteration
with its default restarts (normuon.newton_schulz.gram_restarts: bf16 before steps 2 and 3,
fp16 before step 2, none in fp32) and without restarts. Iteration dtypes: float32, bfloat16
and float16 (the half types iterate natively, ``compute_dtype``; on a CPU without native
half GEMMs that is a slow scalar path, timed only where native). Inputs: random
low-rank-plus-noise matrices, and gradient / Nesterov-momentum matrices taken from AdamW steps
of a small GPT-like model on a synthetic next-token task.

Errors, for an input U = P diag(s) Q^T (float64 SVD) and an output O:
- sigma error: max_i |p_i^T O q_i - 1| over the directions with s_i / ||U||_F >= --threshold,
  i.e. how far NS moved each significant singular value from 1 (Muon's quintic is designed to
  stop in about [0.7, 1.2]: it trades accuracy for slope at 0);
- polar distance: ||O - P Q^T||_F / ||P Q^T||_F over all directions (small singular values,
  which no 4-5 step NS lifts to 1, count here).
The sigma error is also reported over the directions with s_i / ||U||_F >= 10 x --threshold.
A method "holds quality" at a dtype when each of its worst errors over the inputs is within
0.02 of the standard loop's at the same dtype and coefficients.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SHAPE_SETS,
    layer_shapes,
    machine_lines,
    md_table,
    median,
    timed,
    today,
    write_report,
)

from normuon import newton_schulz as F  # noqa: E402

#: (label, ns_coefficients, steps): the default, Polar Express, and the fast mode.
COEFFICIENTS = [
    ("muon 5", "muon", 5),
    ("polar_express 5", "polar_express", 5),
    ("polar_express 4", "polar_express", 4),
    ("fast 4", list(F.fast_ns_coefficients()), F.FAST_NS_STEPS),
]
#: (label, newton_schulz method, restarts option of the Gram iteration)
METHODS = [("standard", "standard", None), ("gram", "gram", None),
           ("gram, no restart", "gram", ())]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Slack of "holds quality": worst errors within this of the standard loop's.
QUALITY_SLACK = 0.02


def run_method(u: torch.Tensor, coeffs, method: str, restarts, dtype: torch.dtype):
    return F.newton_schulz(u, coeffs, dtype, compute_dtype=dtype, method=method,
                           restarts=restarts)  # fmt: skip


def errors(
    u: torch.Tensor, o: torch.Tensor, threshold: float
) -> tuple[float, float, float]:
    """(max sigma error over the directions with s_i / ||U||_F >= threshold, the same over
    s_i / ||U||_F >= 10 x threshold, relative Frobenius distance to P Q^T)."""
    u64, o64 = u.double(), o.double()
    p, s, qh = torch.linalg.svd(u64, full_matrices=False)
    polar = p @ qh
    mapped = torch.einsum("bik,bij,bkj->bk", p, o64, qh)  # p_i^T O q_i
    relative = s / torch.linalg.vector_norm(u64, dim=(-2, -1)).unsqueeze(-1)
    sigs = []
    for t in (threshold, 10 * threshold):
        keep = relative >= t
        sigs.append((mapped - 1).abs()[keep].max().item() if keep.any() else float("nan"))
    dist = (torch.linalg.vector_norm(o64 - polar, dim=(-2, -1))
            / torch.linalg.vector_norm(polar, dim=(-2, -1))).max().item()  # fmt: skip
    return sigs[0], sigs[1], dist


def low_rank_plus_noise(b: int, m: int, n: int, rank: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, rank)  # signal singular values spread over two decades
    left = torch.randn(b, m, rank, generator=gen)
    right = torch.randn(b, rank, n, generator=gen)
    signal = left * decay @ right / (m * n) ** 0.25
    return signal + noise * torch.randn(b, m, n, generator=gen) * signal.std()


def model_matrices(d: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Gradients and Nesterov momenta of a 2-block GPT-like MLP/attention-ish model."""
    torch.manual_seed(seed)
    vocab, seq, batch = 64, 32, 16

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
            self.proj = torch.nn.Linear(d, d, bias=False)
            self.up = torch.nn.Linear(d, 4 * d, bias=False)
            self.down = torch.nn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(torch.nn.functional.rms_norm(x, (d,))).chunk(3, dim=-1)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att)
            return x + self.down(torch.relu(self.up(torch.nn.functional.rms_norm(x, (d,)))))

    emb = torch.nn.Embedding(vocab, d)
    blocks = torch.nn.ModuleList([Block() for _ in range(2)])
    head = torch.nn.Linear(d, vocab, bias=False)
    params = [*emb.parameters(), *blocks.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    # A learnable synthetic language: next token = (a * token + b) mod vocab with noise.
    gen = torch.Generator().manual_seed(seed)
    mats = {n: p for n, p in blocks[1].named_parameters()}
    momenta = {n: torch.zeros_like(p) for n, p in mats.items()}
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        seqs = (start * 5 + 3 * torch.arange(seq + 1)) % vocab
        flip = torch.rand(seqs.shape, generator=gen) < 0.1
        seqs = torch.where(flip, torch.randint(0, vocab, seqs.shape, generator=gen), seqs)
        x = emb(seqs[:, :-1])
        for blk in blocks:
            x = blk(x)
        loss = torch.nn.functional.cross_entropy(head(x).flatten(0, 1), seqs[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for n, p in mats.items():
            momenta[n].lerp_(p.grad, 0.05)
        opt.step()
    out = {}
    for n, p in mats.items():
        out[f"grad {n} {tuple(p.shape)}"] = p.grad.detach().clone()
        out[f"nesterov momentum {n} {tuple(p.shape)}"] = p.grad.lerp(momenta[n], 0.95).detach()
    return out


def quality(inputs: dict[str, torch.Tensor], threshold: float, log):
    """{(coefficients label, method label, dtype name): {input name: (sigma err, polar dist)}}."""
    out: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for name, u in inputs.items():
        log(f"  quality: {name}")
        for clabel, spec, steps in COEFFICIENTS:
            coeffs = F.resolve_ns_coefficients(spec, steps)
            for mlabel, method, restarts in METHODS:
                for dname, dtype in DTYPES.items():
                    o = run_method(u, coeffs, method, restarts, dtype)
                    out.setdefault((clabel, mlabel, dname), {})[name] = errors(u, o, threshold)
    return out


def quality_lines(results, inputs: dict[str, torch.Tensor], threshold: float) -> list[str]:
    groups = {
        "model": [n for n in inputs if not n.startswith("low-rank")],
        "low-rank": [n for n in inputs if n.startswith("low-rank")],
    }
    rows = []
    for clabel, _, _ in COEFFICIENTS:
        for dname in DTYPES:
            for mlabel, _, _ in METHODS:
                cells = [clabel, dname, mlabel]
                holds = True
                for names in groups.values():
                    worst = [max(results[(clabel, mlabel, dname)][n][i] for n in names)
                             for i in range(3)]  # fmt: skip
                    base = [max(results[(clabel, "standard", dname)][n][i] for n in names)
                            for i in range(3)]  # fmt: skip
                    holds &= all(w <= b + QUALITY_SLACK for w, b in zip(worst, base))
                    cells += [f"{w:.3f}" for w in worst]
                cells.append("-" if mlabel == "standard" else ("yes" if holds else "no"))
                rows.append(cells)
    header = ["coefficients", "dtype", "method"]
    for group in groups:
        header += [
            f"{group}: sigma err (>= {threshold:g})",
            f"{group}: sigma err (>= {10 * threshold:g})",
            f"{group}: polar dist",
        ]
    header.append("holds quality")
    lines = [
        "## Accuracy against the SVD polar factor (worst over the inputs)",
        "",
        "'model': the gradients and Nesterov momenta of the model below; 'low-rank': the "
        "low-rank + noise matrices. sigma err (>= t): max |sigma_i - 1| over the directions "
        "with s_i / ||U||_F >= t.",
        "",
    ]
    lines += md_table(header, rows)
    lines += ["", "### Per input: Muon 5 steps (the default coefficients)", ""]
    lines += ["Cells: sigma err (>= threshold) / polar dist.", ""]
    prow = []
    for name in inputs:
        cells = [name]
        for dname in DTYPES:
            for mlabel in ("standard", "gram"):
                sig, _, dist = results[("muon 5", mlabel, dname)][name]
                cells.append(f"{sig:.3f} / {dist:.3f}")
        prow.append(cells)
    lines += md_table(
        ["input"] + [f"{d} {m}" for d in DTYPES for m in ("standard", "gram")], prow
    )
    lines.append("")
    return lines


def speed_lines(reps: int, quick: bool, log) -> list[str]:
    """Time of every (coefficients, method) on the gpt-small buckets in each dtype with native
    GEMMs on this CPU; interleaved repetitions, min and median."""
    d, layers = SHAPE_SETS["tiny" if quick else "gpt-small"]
    counts: dict[tuple[int, int], int] = {}
    for shape in layer_shapes(d, layers):
        counts[shape] = counts.get(shape, 0) + 1
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn(c, m, n, generator=gen) for (m, n), c in counts.items()]
    methods = [("standard", "standard"), ("auto (default)", "auto")]
    native = {name: dt for name, dt in DTYPES.items() if F.native_half_matmul("cpu", dt)}
    cases = []
    for dname, dtype in native.items():
        for clabel, spec, steps in COEFFICIENTS:
            coeffs = F.resolve_ns_coefficients(spec, steps)
            for mlabel, method in methods:
                for u in stacks:
                    cases.append(((dname, clabel, mlabel), u, coeffs, method, dtype))
    for _, u, coeffs, method, dtype in cases:  # warm-up
        F.newton_schulz(u, coeffs, dtype, compute_dtype=dtype, method=method)
    totals: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(reps):
        per: dict[tuple[str, str, str], float] = {}
        for key, u, coeffs, method, dtype in cases:
            per[key] = per.get(key, 0.0) + timed(
                lambda u=u, c=coeffs, me=method, dt=dtype: F.newton_schulz(
                    u, c, dt, compute_dtype=dt, method=me
                )
            )
        for key, t in per.items():
            totals.setdefault(key, []).append(t)
        log(f"  speed rep {rep + 1}/{reps}")
    rows = []
    # Other processes only ever add time: the minimum over the reps is the steadiest figure on
    # a shared machine, and the ratios use it; the median is shown beside it.
    base = {k[0]: min(v) for k, v in totals.items() if k[1:] == ("muon 5", "standard")}
    for (dname, clabel, mlabel), ts in totals.items():
        rows.append([dname, clabel, mlabel, f"{min(ts) * 1e3:.1f}", f"{median(ts) * 1e3:.1f}",
                     f"{min(ts) / base[dname]:.3f}"])  # fmt: skip
    buckets = ", ".join(f"{c} x {shape}" for shape, c in counts.items())
    skipped = [name for name in DTYPES if name not in native]
    lines = [
        f"## Speed: all buckets of one step of `{'tiny' if quick else 'gpt-small'}` "
        f"({buckets}) per call, {reps} interleaved reps",
        "",
        "'auto (default)' is what the optimizers use: the Gram iteration (with its default "
        "restarts) for aspect >= 2, the standard loop for the square matrices. Ratios of the "
        "minimum times, against Muon 5 steps, standard loop, same dtype."
        + (f" Not timed (no native GEMMs on this CPU): {', '.join(skipped)}." if skipped else ""),
        "",
    ]
    lines += md_table(
        ["dtype", "coefficients", "method", "min ms", "median ms", "min vs muon 5 standard"], rows
    )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small inputs (smoke test)")
    ap.add_argument("--threshold", type=float, default=1e-3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    d = 32 if args.quick else 128
    inputs: dict[str, torch.Tensor] = {}
    for m, n in [(2 * d, 2 * d), (8 * d, 2 * d), (2 * d, 8 * d)]:
        inputs[f"low-rank(16)+noise ({m}, {n})"] = low_rank_plus_noise(2, m, n, 16, 0.3, m + n)
    log("collecting model gradients")
    for name, t in model_matrices(d, 3 if args.quick else 20, 0).items():
        inputs[name] = t.unsqueeze(0)

    lines = [f"# Newton-Schulz quality and speed, {today()}", "", *machine_lines(), ""]
    lines += [
        "Command: `python benchmarks/ns_quality.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        "Every dtype is the iteration dtype itself (`compute_dtype`). 'holds quality': each "
        f"worst error within {QUALITY_SLACK} of the standard loop's at the same dtype and "
        "coefficients, on both input groups.",
        "",
    ]
    lines += quality_lines(quality(inputs, args.threshold, log), inputs, args.threshold)
    log("  speed")
    lines += speed_lines(args.reps, args.quick, log)
    path = write_report(args.out, "ns_quality", lines)
    print("\n".join(lines))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
