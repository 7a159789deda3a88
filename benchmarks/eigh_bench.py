"""Forward+backward time of the gap-aware eigh / SVD vs torch's, as ratios measured in one run.

    python benchmarks/eigh_bench.py                      # eigh B=32 144x144, SVD B=32 144x144 and 144x16, complex64
    python benchmarks/eigh_bench.py --device cuda --repeats 50
    python benchmarks/eigh_bench.py --cases svd-square --threads 1

Inputs are random batches (simple spectra, so torch's backward is finite and both sides do the same
work). The eigh loss uses eigenvalues and a top-K projector (the pipeline's eigengap and subspace terms);
the SVD loss uses the singular values and the top-K left and right projectors. In each case the two
variants run interleaved, repeat by repeat, so drifts in machine load hit both alike; the figure is
median(ours) / median(torch), with the gradient agreement of the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Run as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ris_stability.spectral import eigh_gap_aware, svd_gap_aware  # noqa: E402

DTYPES = {"complex64": torch.complex64, "complex128": torch.complex128, "float32": torch.float32, "float64": torch.float64}
# name -> (op, rows, cols)
CASES = {"eigh": ("eigh", 144, 144), "svd-square": ("svd", 144, 144), "svd-tall": ("svd", 144, 16)}


def make_input(batch: int, m: int, n: int, dtype: torch.dtype, device: str, seed: int, hermitian: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m, n, dtype=dtype, generator=gen)
    return ((x + x.mH) / 2 if hermitian else x).to(device)


def eigh_loss(fn: Callable, a: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    eigenvalues, eigenvectors = fn(a)
    top = eigenvectors[..., -k:]
    return (top @ top.mH * target).sum().real + (eigenvalues[..., -k:] - eigenvalues[..., -k - 1:-1]).square().sum()


def svd_loss(fn: Callable, a: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = fn(a, full_matrices=False)
    left, right = u[..., :k], vh[..., :k, :]
    return ((left @ left.mH * target[0]).sum().real + (right.mH @ right * target[1]).sum().real
            + s[..., :k].square().sum())


def step(loss_fn, fn, a: torch.Tensor, target, k: int) -> torch.Tensor:
    """One forward+backward; returns the gradient (so nothing is optimised away)."""
    leaf = a.detach().requires_grad_()
    loss_fn(fn, leaf, target, k).backward()
    return leaf.grad


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_case(name: str, args: argparse.Namespace, sync) -> float:
    op, m, n = CASES[name]
    dtype = DTYPES[args.dtype]
    a = make_input(args.batch, m, n, dtype, args.device, 0, hermitian=op == "eigh")
    if op == "eigh":
        loss_fn, variants = eigh_loss, {"torch": torch.linalg.eigh, "gap_aware": eigh_gap_aware}
        target = make_input(1, m, m, dtype, args.device, 1, hermitian=True)[0]
    else:
        loss_fn, variants = svd_loss, {"torch": torch.linalg.svd, "gap_aware": svd_gap_aware}
        target = (make_input(1, m, m, dtype, args.device, 1, False)[0], make_input(1, n, n, dtype, args.device, 2, False)[0])
    grads = {v: step(loss_fn, fn, a, target, args.k) for v, fn in variants.items()}
    agreement = float((grads["gap_aware"] - grads["torch"]).norm() / grads["torch"].norm())
    for _ in range(args.warmup):
        for fn in variants.values():
            step(loss_fn, fn, a, target, args.k)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, fn in variants.items():
            times[v].append(timed(lambda fn=fn: step(loss_fn, fn, a, target, args.k), sync))
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    ratio = medians["gap_aware"] / medians["torch"]
    print(f"{op} forward+backward, B={args.batch} {m}x{n} {args.dtype} K={args.k}: median over {args.repeats} "
          f"interleaved repeats (after {args.warmup} warm-up)")
    for v, med in medians.items():
        print(f"    {v:>9}: {med * 1e3:9.3f} ms   (min {min(times[v]) * 1e3:.3f} ms)")
    print(f"  gradient agreement |g_gap - g_torch| / |g_torch| = {agreement:.2e}")
    print(f"  ratio gap_aware / torch = {ratio:.3f}x (target <= 1.2x)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="complex64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{device}, torch {torch.__version__}")
    ratios = {name: run_case(name, args, sync) for name in args.cases}
    print("summary: " + ", ".join(f"{name} {r:.3f}x" for name, r in ratios.items()))


if __name__ == "__main__":
    main()
