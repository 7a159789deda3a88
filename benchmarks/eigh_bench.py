"""Forward+backward time of eigh_gap_aware vs torch.linalg.eigh, as a ratio measured in one run.

    python benchmarks/eigh_bench.py                      # B=32, N=144, complex64, CPU
    python benchmarks/eigh_bench.py --device cuda --repeats 50

The input is a batch of random Hermitian matrices (simple spectra, so torch's backward is finite
and both sides do the same work); the loss uses eigenvalues and a top-K projector, as the pipeline's
eigengap and subspace terms do. Both variants run interleaved, repeat by repeat, so drifts in
machine load hit both alike; the figure is median(ours) / median(torch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ris_stability.spectral import eigh_gap_aware  # noqa: E402

DTYPES = {"complex64": torch.complex64, "complex128": torch.complex128, "float32": torch.float32, "float64": torch.float64}


def make_input(batch: int, n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, n, dtype=dtype, generator=gen)
    return ((x + x.mH) / 2).to(device)


def step(eigh_fn, a: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """One forward+backward; returns the gradient (so nothing is optimised away)."""
    leaf = a.detach().requires_grad_()
    eigenvalues, eigenvectors = eigh_fn(leaf)
    top = eigenvectors[..., -k:]
    projector = top @ top.mH
    loss = (projector * target).sum().real + (eigenvalues[..., -k:] - eigenvalues[..., -k - 1 : -1]).square().sum()
    loss.backward()
    return leaf.grad


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=144)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="complex64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    a = make_input(args.batch, args.n, dtype, args.device, seed=0)
    target = make_input(1, args.n, dtype, args.device, seed=1)[0]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    variants = {"torch": torch.linalg.eigh, "gap_aware": eigh_gap_aware}

    grads = {name: step(fn, a, target, args.k) for name, fn in variants.items()}
    agreement = float((grads["gap_aware"] - grads["torch"]).norm() / grads["torch"].norm())
    for _ in range(args.warmup):
        for fn in variants.values():
            step(fn, a, target, args.k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(lambda fn=fn: step(fn, a, target, args.k), sync))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"eigh forward+backward, B={args.batch} N={args.n} {args.dtype} K={args.k}, {device}, torch {torch.__version__}")
    print(f"  median over {args.repeats} repeats (after {args.warmup} warm-up):")
    for name, med in medians.items():
        print(f"    {name:>9}: {med * 1e3:9.3f} ms   (min {min(times[name]) * 1e3:.3f} ms)")
    print(f"  gradient agreement |g_gap - g_torch| / |g_torch| = {agreement:.2e}")
    print(f"  ratio gap_aware / torch = {medians['gap_aware'] / medians['torch']:.3f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
