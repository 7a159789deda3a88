"""Where the monitor's time goes per step: cProfile of a workload under an explicit MonitorSession, every
step, grouped by the monitor's parts.

Each part is the cumulative time of the functions listed for it (their callees included), divided by the
number of profiled steps; ``training`` is the workload's own forward, backward and optimizer step with
the monitor's parts taken out. cProfile adds its own cost to every Python call, so read the shares, not
the absolute times (a quiet 2-core CPU runs the unprofiled whitening step in about half the time).

Usage: python benchmarks/monitor_profile.py [--model whiten|gpt|persample] [--steps 200] [--threads 1] [--every 1]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outside_models import DESCRIPTIONS, WORKLOADS, session_step  # noqa: E402

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor  # noqa: E402

# part -> (file suffix, function name) pairs whose cumulative times are summed (none nested in another).
PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "spectral statistics (probe collect)": (("instruments/probe.py", "collect"),),
    "linalg call interception (per call)": (("instruments/probe.py", "on_call"),),  # includes the next line
    "  of which statistics measured per call": (("instruments/probe.py", "_measure", "on_call"),),
    "backward hooks of linalg sites": (("linalg/site_grads.py", "hook"),),
    "gradient norms": (("instruments/grads.py", "observe_grads"), ("instruments/grads.py", "_block_values")),
    "check at backward (peaks on the device)": (("attach/born.py", "after_backward"),),
    "finiteness verdict (device flags)": (("monitor/step_reads.py", "verdict_flags"),
                                          ("monitor/step_reads.py", "resolve_verdict")),
    "read point (the one host read, the rows it completes)": (("monitor/readback.py", "read"),),
    "spike baseline": (("instruments/spikes.py", "observe"),),
    "step row (host part, queued)": (("monitor/step_reads.py", "queue_row"),),
    "step start (RNG snapshot, sampling)": (("monitor/stability_monitor.py", "on_step_start"),),
    "update ratio (every update_every steps)": (("instruments/grads.py", "before_step"),
                                                ("instruments/grads.py", "after_step")),
}
MONITOR_ENTRIES = (("session.py", "start_step"), ("session.py", "after_forward"), ("session.py", "after_backward"),
                   ("session.py", "end_step"))


def profile(name: str, steps: int, warmup: int, every: int = 1) -> tuple[pstats.Stats, int]:
    work = WORKLOADS[name]("cpu")
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        with MonitorSession(StabilityMonitor(Path(tmp) / "run", MonitorConfig(every=every)), work.model,
                            work.optimizer) as s:
            for step in range(warmup + steps):
                if step == warmup:
                    prof.enable()
                session_step(s, work, step)
            prof.disable()
    return pstats.Stats(prof), steps


def cumulative(stats: pstats.Stats, wanted: tuple[tuple[str, ...], ...]) -> float:
    """Summed cumulative time of the (file, function) entries; (file, function, caller): only the calls
    made from that caller."""
    total = 0.0
    for (filename, _, func), (_, _, _, cum, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for want in wanted:
            if not (filename.endswith(want[0]) and func == want[1]):
                continue
            if len(want) == 2:
                total += cum
            else:
                total += sum(c[3] for (_, _, caller), c in callers.items() if caller == want[2])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whiten", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=1, help="statistics every N steps (10: mostly the fixed cost)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stats, steps = profile(args.model, args.steps, args.warmup, args.every)
    total = stats.total_tt / steps  # type: ignore[attr-defined]
    parts = {part: cumulative(stats, fns) / steps for part, fns in PARTS.items()}
    # The interception wrapper runs the op itself; its own share is on_call (listed above).
    monitor = cumulative(stats, MONITOR_ENTRIES) / steps + parts["linalg call interception (per call)"] \
        + parts["backward hooks of linalg sites"]
    print(f"{args.model}: {DESCRIPTIONS[args.model]}; {steps} profiled steps, "
          f"{torch.get_num_threads()} thread(s), statistics every {args.every} step(s), under cProfile")
    print(f"{'part':<42}{'ms/step':>9}{'share':>8}")
    for part, ms in parts.items():
        print(f"{part:<42}{ms * 1e3:>9.3f}{ms / total:>8.1%}")
    rest = monitor - sum(ms for part, ms in parts.items() if not part.startswith(" "))
    print(f"{'other monitor bookkeeping':<42}{rest * 1e3:>9.3f}{rest / total:>8.1%}")
    print(f"{'monitor in all':<42}{monitor * 1e3:>9.3f}{monitor / total:>8.1%}")
    print(f"{'training (forward, backward, optimizer)':<42}{(total - monitor) * 1e3:>9.3f}{(total - monitor) / total:>8.1%}")


if __name__ == "__main__":
    main()
