"""Speed and accuracy of the Newton-Schulz modes against the SVD polar factor.

    python benchmarks/ns_quality.py [--reps N] [--quick] [--out benchmarks/results]

Modes: "muon" 5 steps, "polar_express" 4 and 5 steps, and the Gram-matrix loop
(F.newton_schulz_gram) of each, computed in float32 and in native bfloat16. Inputs: random
low-rank-plus-noise matrices, and gradient / Nesterov-momentum matrices taken from a few
AdamW steps of a small GPT-like model on a synthetic next-token task.

Errors, for an input U = P diag(s) Q^T (float64 SVD) and an output O:
- sigma error: max_i |p_i^T O q_i - 1| over the directions with s_i / ||U||_F >= --threshold,
  i.e. how far NS moved each significant singular value from 1 (Muon's quintic is designed to
  stop in about [0.7, 1.2]: it trades accuracy for slope at 0);
- polar distance: ||O - P Q^T||_F / ||P Q^T||_F over all directions (small singular values,
  which no 4-5 step NS lifts to 1, count here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, md_table, median, timed, today  # noqa: E402

from normuon import newton_schulz as F  # noqa: E402

MODES = [
    ("muon 5", "muon", 5, False),
    ("polar_express 4", "polar_express", 4, False),
    ("polar_express 5", "polar_express", 5, False),
    ("gram muon 5", "muon", 5, True),
    ("gram polar_express 4", "polar_express", 4, True),
    ("gram polar_express 5", "polar_express", 5, True),
]


def run_mode(u: torch.Tensor, spec: str, steps: int, gram: bool, compute: torch.dtype):
    coeffs = F.resolve_ns_coefficients(spec, steps)
    fn = F.newton_schulz_gram if gram else F.newton_schulz
    return fn(u, coeffs, compute, compute_dtype=compute)


def errors(u: torch.Tensor, o: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(max sigma error over significant directions, relative Frobenius distance to P Q^T)."""
    u64, o64 = u.double(), o.double()
    p, s, qh = torch.linalg.svd(u64, full_matrices=False)
    polar = p @ qh
    mapped = torch.einsum("bik,bij,bkj->bk", p, o64, qh)  # p_i^T O q_i
    keep = s / torch.linalg.vector_norm(u64, dim=(-2, -1)).unsqueeze(-1) >= threshold
    sig = (mapped - 1).abs()[keep].max().item() if keep.any() else float("nan")
    dist = (torch.linalg.vector_norm(o64 - polar, dim=(-2, -1))
            / torch.linalg.vector_norm(polar, dim=(-2, -1))).max().item()  # fmt: skip
    return sig, dist


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threshold", type=float, default=1e-3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

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
        f"Threshold for the sigma error: s_i / ||U||_F >= {args.threshold:g}. 'bf16' = native "
        "bfloat16 iteration (compute_dtype=torch.bfloat16); 'fp32' = float32 iteration.",
        "",
    ]
    rows = []
    for name, u in inputs.items():
        log(f"  quality: {name}")
        for label, spec, steps, gram in MODES:
            cells = [name, label]
            for dt in (torch.float32, torch.bfloat16):
                sig, dist = errors(u, run_mode(u, spec, steps, gram, dt), args.threshold)
                cells += [f"{sig:.3f}", f"{dist:.3f}"]
            rows.append(cells)
    lines += ["## Accuracy against the SVD polar factor", ""]
    lines += md_table(
        ["input", "mode", "fp32 max abs(sigma-1)", "fp32 polar dist", "bf16 max abs(sigma-1)",
         "bf16 polar dist"],  # fmt: skip
        rows,
    )
    lines.append("")

    # Speed: the gpt-small buckets (d = 384), float32 iteration (what bf16 requests get on a
    # CPU without native bf16 GEMMs), interleaved repetitions.
    log("  speed")
    dd = 64 if args.quick else 384
    buckets = [(24, dd, dd), (6, 4 * dd, dd), (6, dd, 4 * dd)]
    us = [torch.randn(b, m, n) for b, m, n in buckets]
    dtype = F.ns_compute_dtype(torch.bfloat16, "cpu")
    times = {label: [] for label, *_ in MODES}
    for _label, spec, steps, gram in MODES:
        for u in us:
            run_mode(u, spec, steps, gram, dtype)
    for _ in range(args.reps):
        for label, spec, steps, gram in MODES:
            times[label].append(
                sum(timed(lambda u=u, a=(spec, steps, gram): run_mode(u, *a, dtype)) for u in us)
            )
    base = median(times["muon 5"])
    srows = [
        [label, f"{median(times[label]) * 1e3:.1f}", f"{median(times[label]) / base:.3f}"]
        for label, *_ in MODES
    ]
    lines += [
        f"## Speed: all gpt-small buckets {buckets} per call, {dtype} iteration, "
        f"median of {args.reps} interleaved reps",
        "",
    ]
    lines += md_table(["mode", "ms", "vs muon 5"], srows)
    lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ns_quality-{today()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
