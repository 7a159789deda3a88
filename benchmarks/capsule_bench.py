"""Capsule bytes and the extra step time of a step that writes a capsule, on a 2 M-parameter model.

A research-size MLP (4 x Linear(1024, 1024)-ish, ~2.1 M parameters, Adam) trained under ``ris_stability.watch``
(on_nonfinite="skip", the default capsule budget of 5 capsules / 512 MB; statistics every ``--sample`` steps, by
default 1000, so that a plain step is the cheap unsampled one the capsule step is compared with). Every
``--every``-th step gets a batch with one NaN: its gradients go non-finite, the step is skipped and a capsule is
written. Two capsule paths, interleaved run by run (sync, background, sync, background, ...):

- ``sync``: the old path, ``torch.save`` and the atomic rename inside the step (``monitor.capsule_background =
  False``);
- ``background``: the copies taken in the step, the write on the writer thread (records/capsule_writer.py).

Printed per path: the mean time of a plain step and of a capsule step within the same runs (so a plain step
that shares the CPU with a background write is counted as plain), ``extra`` = capsule step - plain step and
``extra / plain`` (the goal: <= 1 plain step), the mean over all steps, and the bytes of one capsule (its own
file, and with the model and optimizer state it refers to in capsules/state/). A skipped step does no
optimizer update, so ``extra`` slightly understates the cost of the copy + write by the update's time.

Usage: python benchmarks/capsule_bench.py [--steps 60] [--every 10] [--rounds 2] [--width 1024] [--sample 1000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ris_stability  # noqa: E402


def model_of(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def one_run(out: Path, background: bool, steps: int, every: int, width: int, batch: int, sample: int) -> dict:
    torch.manual_seed(0)
    model = model_of(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    plain, capsule = [], []
    with ris_stability.watch(model, opt, out=out, report=False, every=sample) as w:
        w.monitor.capsule_background = background
        for step in range(steps):
            x, y = torch.randn(batch, 256), torch.randint(0, 10, (batch,))
            bad = step > 0 and step % every == 0
            if bad:
                x[0, 0] = float("nan")
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            (capsule if bad else plain).append(time.perf_counter() - t0)
        t_end = time.perf_counter()
    drain = time.perf_counter() - t_end  # the run's end: waits for the writes still in flight
    files = sorted((out / "capsules").glob("step_*.pt"))
    state = list((out / "capsules" / "state").glob("*.pt"))
    own = statistics.mean(f.stat().st_size for f in files) if files else 0
    return {"plain": plain[3:], "capsule": capsule, "drain": drain, "own_bytes": own,
            "state_bytes": sum(f.stat().st_size for f in state), "kept": len(files), "written": len(capsule),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="a capsule step every N steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample", type=int, default=1000, help="the monitor's statistics every N steps (watch every=)")
    args = ap.parse_args(argv)
    results: dict[str, list[dict]] = {"sync": [], "background": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("sync", "background") if r % 2 == 0 else ("background", "sync")
            for mode in order:
                out = Path(tmp) / f"{mode}_{r}"
                results[mode].append(one_run(out, mode == "background", args.steps, args.every, args.width,
                                             args.batch, args.sample))
    first = results["sync"][0]
    print(f"model: {first['params'] / 1e6:.2f} M parameters (width {args.width}, batch {args.batch}, Adam); "
          f"{args.steps} steps x {args.rounds} rounds per path, a capsule every {args.every}th step; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"capsule bytes: {first['own_bytes'] / 2 ** 20:.1f} MB own file (batch, gradients, RNG, meta) + "
          f"{first['state_bytes'] / 2 ** 20:.1f} MB shared state in capsules/state/ for the {first['kept']} kept "
          f"of {first['written']} written (default budget)")
    print(f"{'path':<11} {'plain ms':>9} {'capsule ms':>11} {'extra ms':>9} {'extra/plain':>12} {'all-steps ms':>13} "
          f"{'end drain ms':>13}")
    for mode, runs in results.items():
        plain = statistics.mean(t for r in runs for t in r["plain"]) * 1e3
        cap = statistics.mean(t for r in runs for t in r["capsule"]) * 1e3
        every = statistics.mean(t for r in runs for t in r["plain"] + r["capsule"]) * 1e3
        drain = statistics.mean(r["drain"] for r in runs) * 1e3
        print(f"{mode:<11} {plain:9.2f} {cap:11.2f} {cap - plain:9.2f} {(cap - plain) / plain:11.2f}x {every:13.2f} "
              f"{drain:13.1f}")


if __name__ == "__main__":
    main()
