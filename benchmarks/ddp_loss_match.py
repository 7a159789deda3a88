"""Is a 2-rank DDP run the same training as 1 process at the same global batch? Quickstart, N steps.

    PYTHONPATH=. python benchmarks/ddp_loss_match.py [--steps 50] [--seeds 0 1 2] [--json]

Runs ``ris_model.train.train`` (the pipeline of ``python -m ris_model train``; no monitor) on the quickstart
config once under 2 ranks (gloo, torchrun's environment, seed 0) and once per seed in 1 process. Each rank
records its own loss per step; the 2-rank run's loss is the mean of the ranks' losses (every loss term is a
batch mean and the ranks hold equal shares, so this is the global batch's loss; DDP averages the gradients
the same way). It prints the largest relative difference between the 2-rank curve and the 1-process curve of
the same seed (same samples, same initial weights: only float32 reduction order differs) and two
yardsticks: the same 1-process run with 2 intra-op threads instead of 1 (also only reduction order
differs), and 1-process runs that differ only in ``train.seed`` (run-to-run noise).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.toml"


def worker(out: Path, steps: int, seed: int, threads: int) -> None:
    from ris_model.config import load_config
    from ris_model.train import train

    losses: list[float] = []
    norms: list[float] = []  # the gradient norm the optimizer saw (after DDP's average: the same on every rank)

    class Record:
        def on_step_end(self, ctx) -> None:
            losses.append(float(ctx.loss.detach()))
            norms.append(ctx.result.grad_norm)

    cfg = load_config(str(CONFIG), [f"train.steps={steps}", f"train.seed={seed}", "train.val_every=0",
                                    f"train.threads={threads}"])
    train(cfg, callbacks=[Record()])
    (out / f"losses{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"loss": losses, "grad_norm": norms}))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(n: int, out: Path, steps: int, seed: int, threads: int = 1) -> tuple[list[float], list[float]]:
    """The run's loss per step (mean over ranks) and its gradient norm per step (rank 0's)."""
    out.mkdir(parents=True)
    cmd = [__file__, "--worker", str(out), "--steps", str(steps), "--seeds", str(seed), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if n > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port), *cmd]
    subprocess.run([sys.executable, *cmd], env=env, check=True, stdout=subprocess.DEVNULL)
    per_rank = [json.loads((out / f"losses{r}.json").read_text()) for r in range(n)]
    return [sum(vals) / n for vals in zip(*(r["loss"] for r in per_rank))], per_rank[0]["grad_norm"]


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def compare(steps: int, seeds: list[int]) -> dict:
    with TemporaryDirectory() as tmp:
        two, two_norm = _run(2, Path(tmp) / "ddp", steps, seeds[0])
        runs = {s: _run(1, Path(tmp) / f"one{s}", steps, s) for s in seeds}
        threads2, _ = _run(1, Path(tmp) / "threads2", steps, seeds[0], threads=2)
    one = {s: loss for s, (loss, _) in runs.items()}
    ref, ref_norm = runs[seeds[0]]
    spread = [max_rel(one[s], ref) for s in seeds[1:]]
    return {"steps": steps, "seeds": seeds, "loss_2rank": two, "loss_1proc": ref,
            "first_rel_diff": abs(two[0] - ref[0]) / abs(ref[0]), "max_rel_diff": max_rel(two, ref),
            "first_grad_norm_rel_diff": abs(two_norm[0] - ref_norm[0]) / abs(ref_norm[0]),
            "rel_diff_by_step": [abs(x - y) / abs(y) for x, y in zip(two, ref)],
            "threads2_max_rel_diff": max_rel(threads2, ref),
            "threads2_rel_diff_by_step": [abs(x - y) / abs(y) for x, y in zip(threads2, ref)],
            "last_2rank": two[-1], "last_1proc": ref[-1], "seed_max_rel_diff": spread,
            "last_by_seed": {s: one[s][-1] for s in seeds}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of the 1-process runs "
                   "(the first is also the 2-rank run's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.seeds[0], args.threads)
        return
    r = compare(args.steps, args.seeds)
    if args.json:
        print(json.dumps(r))
        return
    print(f"quickstart, {r['steps']} steps, global batch 16 (2 ranks x 8 vs 1 x 16), 1 thread per process")
    print(f"2 ranks vs 1 process, seed {r['seeds'][0]}: step 0 relative loss difference {r['first_rel_diff']:.2e}, "
          f"gradient norm {r['first_grad_norm_rel_diff']:.2e}; loss "
          f"largest over all steps {r['max_rel_diff']:.2e}; last loss {r['last_2rank']:.6f} vs {r['last_1proc']:.6f}")
    at = sorted({0, 1, 2, 5, 10, 25, r["steps"] - 1} & set(range(r["steps"])))
    print("relative loss difference by step: " + ", ".join(f"{i}: {r['rel_diff_by_step'][i]:.1e}" for i in at))
    print(f"rounding yardstick, 1 process, seed {r['seeds'][0]}, 2 threads vs 1 (only reduction order differs): "
          f"largest {r['threads2_max_rel_diff']:.2e}; by step: "
          + ", ".join(f"{i}: {r['threads2_rel_diff_by_step'][i]:.1e}" for i in at))
    print("noise yardstick, 1 process, seed 0 vs seeds " + ", ".join(
        f"{s}: largest relative difference {d:.2e}" for s, d in zip(r["seeds"][1:], r["seed_max_rel_diff"])))
    print("last loss by seed: " + ", ".join(f"{s}: {v:.6f}" for s, v in r["last_by_seed"].items()))


if __name__ == "__main__":
    main()
