"""Step time with the StabilityMonitor off, on every step, on every 10 steps, and under detect_anomaly.

One process; rounds interleaved (off, every=1, every=10, anomaly, watch, then the same rotated by one,
...) so that machine load hits every mode alike. The step time of a run is the mean over all its timed steps (monitored steps included;
the first ``--warmup`` steps of each run are not timed); each ratio is taken within a round and the min
and median over rounds are printed. ``added`` is the difference of the median step times (every step -
off). ``own`` is the time spent inside the monitor's own code per every=1 step (its callbacks and the
per-call interception, timed directly: far less noisy than a difference of two step times, but blind to
what the monitor costs the training's own kernels, e.g. through the caches); ``stats`` is the part of it
spent computing the spectral statistics (``SpectralProbe._reduce`` and ``_measure``); ``fixed`` = own - stats.
The monitor's own time on a step whose statistics are not sampled (the every=10 run's own time, less its
sampled steps at the every=1 run's own time per step) is printed too, but the fixed-cost goal is judged on step
time over paired steps next to a GradScaler-check floor (benchmarks/paired_steps.py), which counts what the
monitor costs the training's own ops and not the cache misses it takes over from them.

Workloads: the ris_model configs (``--configs``, default quickstart and default) and, with ``--model``,
outside-style models (benchmarks/outside_models.py): ``gpt`` (tiny transformer, ~5 ms/step), ``whiten``
(whitening via eigh, ~1 ms/step), ``persample`` (a per-sample loop of small eigh + solve calls).

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared with
other jobs the wall clock charges their time slices to whichever mode was running; CPU time does not
(it still sees cache and memory-bandwidth contention). With a GPU use the wall clock.

Usage: python benchmarks/monitor_overhead.py [--steps 20] [--rounds 3] [--model gpt whiten persample]
       [--configs quickstart.toml default.toml | --configs] [--set train.device=cuda] [--device cuda]
       [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from outside_models import DESCRIPTIONS, WORKLOADS, session_step, sync  # noqa: E402
from paired_steps import paired_fixed_cost  # noqa: E402
from tests.ris_stability.host_reads import counting  # noqa: E402  (the test's own counter)

from ris_stability import watch  # noqa: E402
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor  # noqa: E402
from ris_stability.attach.callbacks import LoopCallbacks  # noqa: E402
from ris_stability.attach.driver import StepDriver  # noqa: E402
from ris_stability.attach.finish import finish_run  # noqa: E402
from ris_stability.attach.watch import Watcher  # noqa: E402
from ris_stability.instruments.probe import SpectralProbe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "every=1", "every=10", "anomaly", "watch")  # watch: outside models only
WATCH_GOAL = 1.02  # watch() vs an explicit MonitorSession, every step
GOALS = {"quickstart.toml": 1.03, "default.toml": 1.03, "gpt": 1.08, "whiten": 1.5, "persample": 1.3}  # every=1
E10_GOALS = {"gpt": 1.02, "whiten": 1.05}  # every=10 ratio goals
CUDA_GOALS = {"quickstart.toml": 1.05, "gpt": 1.05}
FIXED_GOAL_MS = 0.1
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock


class PartClock:
    """Accumulates the time spent inside some functions (outermost calls only, so nesting is not counted
    twice): the probe's statistics (``SpectralProbe._reduce``) or all of the monitor's own code."""

    def __init__(self, targets: tuple[tuple[type, str], ...]) -> None:
        self.seconds = 0.0
        self.targets = targets
        self._depth = 0

    def _wrap(self, real):
        part = self

        def timed(*args, **kwargs):
            part._depth += 1
            t0 = clock() if part._depth == 1 else 0.0
            try:
                return real(*args, **kwargs)
            finally:
                if part._depth == 1:
                    part.seconds += clock() - t0
                part._depth -= 1
        return timed

    @contextlib.contextmanager
    def installed(self):
        reals = [(owner, name, getattr(owner, name)) for owner, name in self.targets if hasattr(owner, name)]
        for owner, name, real in reals:
            setattr(owner, name, self._wrap(real))
        try:
            yield self
        finally:
            for owner, name, real in reals:
                setattr(owner, name, real)


STATS = ((SpectralProbe, "_reduce"), (SpectralProbe, "_measure"))  # collect-time and per-call statistics
# The monitor's own code: its callbacks (which include the statistics), the per-call interception, and
# what drives the callbacks: an explicit MonitorSession or watch()'s hooks and step driver.
OWN = tuple((StabilityMonitor, f"on_{event}") for event in (
    "step_start", "after_forward", "after_backward", "before_optimizer_step", "step_end")) + (
    (SpectralProbe, "on_call"),) + tuple((MonitorSession, name) for name in (
        "start_step", "after_forward", "after_backward", "end_step")) + tuple((StepDriver, name) for name in (
        "record_inputs", "start_step", "before_backward", "after_backward", "before_optimizer_step",
        "after_optimizer_step"))


def run_workload(name: str, mode: str, steps: int, warmup: int, tmp: Path, device: str) -> float:
    """Mean seconds per timed step of an outside-style workload in one mode."""
    work = WORKLOADS[name](device)
    every = {"every=1": 1, "every=10": 10}.get(mode)
    run_dir = tmp / f"{name}-{time.monotonic_ns()}"
    session = (MonitorSession(StabilityMonitor(run_dir, MonitorConfig(every=every)), work.model, work.optimizer)
               if every else contextlib.nullcontext())
    anomaly = torch.autograd.detect_anomaly(check_nan=True) if mode == "anomaly" else contextlib.nullcontext()
    # watch(): attached automatically (optimizer and backward hooks), the loop is the plain one.
    auto = watch(work.model, work.optimizer, out=run_dir, report=False) if mode == "watch" else contextlib.nullcontext()
    with session as s, anomaly, auto:
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                t0 = clock()
            if s is not None:
                s.start_step(step)
            work.optimizer.zero_grad(set_to_none=True)
            loss = work.loss(step)
            if s is not None:
                s.after_forward(loss)
            loss.backward()
            if s is None or s.after_backward():
                work.optimizer.step()
            if s is not None:
                s.end_step()
        sync(device)
        return (clock() - t0) / steps


def host_reads(name: str, every: int, policy: str, steps: int, tmp: Path, device: str) -> float:
    """Host reads per step that ris_stability makes (each a GPU sync on CUDA), counted on an untimed run."""
    work = WORKLOADS[name](device)
    with counting() as reads:
        with MonitorSession(StabilityMonitor(tmp / f"reads-{time.monotonic_ns()}", MonitorConfig(every=every, policy=policy)),
                            work.model, work.optimizer) as s:
            for step in range(steps):
                session_step(s, work, step)
    return sum(reads.steps(range(steps))) / steps


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (each a kernel launch on a GPU) per step."""

    def __init__(self) -> None:
        super().__init__()
        self.per_step: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.per_step[-1] += 1
        return func(*args, **(kwargs or {}))


def monitor_ops(name: str, every: int, steps: int, tmp: Path, device: str) -> tuple[float, float]:
    """Aten ops the monitor adds per sampled and per unsampled step (every=``every``, policy skip): the ops of
    the monitored steps less those of the same steps unmonitored (counted, not timed: no noise). Step 0 (first
    calls, caches) is left out."""
    counts = []
    for monitored in (False, True):
        work = WORKLOADS[name](device)
        session = (MonitorSession(StabilityMonitor(tmp / f"ops-{time.monotonic_ns()}", MonitorConfig(every=every)),
                                  work.model, work.optimizer) if monitored else contextlib.nullcontext())
        counter = OpCounter()
        with session as s:
            for step in range(steps):
                counter.per_step.append(0)
                with counter:
                    if s is None:
                        work.optimizer.zero_grad(set_to_none=True)
                        loss = work.loss(step)
                        loss.backward()
                        work.optimizer.step()
                    else:
                        session_step(s, work, step)
        counts.append(counter.per_step)
    extra = [(step, on - off) for step, (off, on) in enumerate(zip(*counts)) if step > 0]
    sampled = [n for step, n in extra if step % every == 0]
    unsampled = [n for step, n in extra if step % every != 0]
    return (statistics.mean(sampled) if sampled else math.nan, statistics.mean(unsampled) if unsampled else math.nan)


class StepClock:
    """ris_model callback: the time of every step start; the mean step is (last - first) / count."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def on_step_start(self, ctx) -> None:
        self.starts.append(clock())

    def on_train_end(self, ctx) -> None:
        self.starts.append(clock())

    def mean_step(self) -> float:
        timed = self.starts[self.warmup:]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def run_config(config: str, mode: str, steps: int, warmup: int, tmp: Path, overrides: list[str]) -> float:
    from ris_model.config import load_config
    from ris_model.train import train
    cfg = load_config(ROOT / "configs" / config, [f"train.steps={warmup + steps}", "train.val_every=0",
                                                  "train.checkpoint_every=0", *overrides])
    clock = StepClock(warmup)
    callbacks: list = [clock]
    every = {"every=1": 1, "every=10": 10}.get(mode)
    w = None
    if every:  # as `risdiag trace --config` attaches: the pipeline's callbacks feed the watcher's step driver
        w = Watcher(tmp / f"run-{time.monotonic_ns()}", config=MonitorConfig(every=every), hooks=False,
                    locate=False).start()
        callbacks.append(LoopCallbacks(w.driver))
    with torch.autograd.detect_anomaly(check_nan=True) if mode == "anomaly" else contextlib.nullcontext():
        train(cfg, callbacks=callbacks)
    if w is not None:
        finish_run(w, report=False)
    return clock.mean_step()


def measure(run, rounds: int, modes: tuple[str, ...]) -> tuple[dict[str, list[float]], float, dict[str, float]]:
    """Seconds per step per mode and round (interleaved); the statistics seconds of every=1 runs and the
    monitor's own seconds of every=1 and watch runs (summed over a run's steps, median over rounds)."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    stats: list[float] = []
    own: dict[str, list[float]] = {"every=1": [], "every=10": [], "watch": []}
    for r in range(rounds):
        # The order rotates every round, so no mode always runs first (cold caches) or after the same mode.
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            with PartClock(STATS).installed() as s_clock, PartClock(OWN).installed() as o_clock:
                times[mode].append(run(mode))
            if mode == "every=1":
                stats.append(s_clock.seconds)
            if mode in own:
                own[mode].append(o_clock.seconds)
    return (times, statistics.median(stats) if stats else 0.0,
            {mode: statistics.median(v) for mode, v in own.items() if v})


def report(label: str, times: dict[str, list[float]], stats_s: float, own: dict[str, float], steps_per_run: int,
           cuda: bool = False) -> list[str]:
    off = times["off"]
    ratios = {m: [t / o for t, o in zip(v, off)] for m, v in times.items() if m != "off"}
    cells = [f"{label:<18}{min(off) * 1e3:>9.2f}{statistics.median(off) * 1e3:>9.2f}"]
    for mode in MODES[1:]:
        if mode in ratios:
            cells.append(f"{min(ratios[mode]):>10.3f}{statistics.median(ratios[mode]):>10.3f}")
        elif mode == "watch":
            cells.append(f"{'-':>10}{'-':>10}")
    added_ms = (statistics.median(times["every=1"]) - statistics.median(off)) * 1e3
    stats_ms, own_ms = stats_s / steps_per_run * 1e3, own["every=1"] / steps_per_run * 1e3
    own_ratio = 1 + own_ms / (statistics.median(off) * 1e3)
    cells.append(f"{added_ms:>9.2f}{own_ms:>8.2f}{stats_ms:>8.2f}{own_ms - stats_ms:>8.2f}")
    print("".join(cells), flush=True)
    verdicts = []
    goal = CUDA_GOALS.get(label) if cuda else GOALS.get(label)
    if goal is not None:
        med = statistics.median(ratios["every=1"])
        verdicts.append(f"{label}: every=1 {med:.3f}x (median of rounds; min {min(ratios['every=1']):.3f}x), "
                        f"monitor's own time {own_ratio:.3f}x, goal <= {goal:.2f}x: "
                        f"{'met' if med <= goal else 'NOT met'} (median), {'met' if own_ratio <= goal else 'NOT met'} (own time)")
    if "watch" in times:
        rel = statistics.median([w / e for w, e in zip(times["watch"], times["every=1"])])
        extra_ms = (own["watch"] - own["every=1"]) / steps_per_run * 1e3
        own_rel = 1 + extra_ms / (statistics.median(times["every=1"]) * 1e3)
        # The own-time difference of two ~equal amounts carries the noise of both: shown, not judged.
        verdicts.append(f"{label}: watch() / MonitorSession every step {rel:.3f}x (median of rounds), goal <= "
                        f"{WATCH_GOAL:.2f}x: {'met' if rel <= WATCH_GOAL else 'NOT met'} (own-time difference "
                        f"{extra_ms:+.3f} ms/step = {own_rel:.3f}x)")
    goal10 = None if cuda else E10_GOALS.get(label)
    if goal10 is not None and "every=10" in ratios:
        med = statistics.median(ratios["every=10"])
        verdicts.append(f"{label}: every=10 {med:.3f}x (median of rounds; min {min(ratios['every=10']):.3f}x), goal "
                        f"<= {goal10:.2f}x: {'met' if med <= goal10 else 'NOT met'}")
    if label in ("gpt", "whiten", "persample") and "every=10" in own:
        # the every=10 run's own time = its sampled steps (each costing an every=1 step's own time) + the rest
        sampled = sum(1 for step in range(steps_per_run) if step % 10 == 0)
        fixed = (own["every=10"] * 1e3 - sampled * own_ms) / (steps_per_run - sampled)  # ms
        verdicts.append(f"{label}: monitor's own time {fixed * 1e3:.0f} us per step not sampled (every=10: "
                        f"{own['every=10'] / steps_per_run * 1e6:.0f} us/step, of which {sampled} sampled steps at "
                        f"{own_ms * 1e3:.0f} us each; it includes cache misses the training's next ops are spared)")
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (ris_model configs)")
    ap.add_argument("--model-steps", type=int, default=200, help="timed steps per run (outside models)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--paired-steps", type=int, default=400,
                    help="steps of the paired fixed-cost measure (outside models; 8 of each 10 are used)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="*", default=["quickstart.toml", "default.toml"])
    ap.add_argument("--model", nargs="*", default=[], choices=sorted(WORKLOADS))
    ap.add_argument("--no-anomaly", action="store_true", help="skip the detect_anomaly column")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. train.device=cuda")
    ap.add_argument("--device", default="cpu", help="device of the outside models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the outside models (0: torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (robust to other jobs on the machine)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    modes = tuple(m for m in MODES if not (args.no_anomaly and m == "anomaly"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds interleaved, "
          f"ratios to 'off' within a round: min and median over rounds; {args.clock} clock; overrides "
          f"{args.overrides or 'none'}")
    short = {"every=1": "e1", "every=10": "e10", "anomaly": "anom", "watch": "watch"}
    print(f"{'workload':<18}{'off min':>9}{'off med':>9}" + "".join(f"{short[m] + ' min':>10}{short[m] + ' med':>10}"
                                                               for m in modes[1:])
          + f"{'added ms':>9}{'own':>8}{'stats':>8}{'fixed':>8}   (ms per step; e1/e10/anom/watch: ratios to off)")
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            times, stats_s, own = measure(lambda mode: run_config(config, mode, args.steps, args.warmup, Path(tmp),
                                                                    args.overrides), args.rounds,
                                            tuple(m for m in modes if m != "watch"))
            verdicts += report(config, times, stats_s, own, args.steps + args.warmup,
                               cuda=any("device=cuda" in o for o in args.overrides))
        if args.threads:
            torch.set_num_threads(args.threads)
        for name in args.model:
            times, stats_s, own = measure(lambda mode: run_workload(name, mode, args.model_steps, args.warmup,
                                                                      Path(tmp), args.device), args.rounds, modes)
            verdicts += report(name, times, stats_s, own, args.model_steps + args.warmup,
                               cuda=args.device.startswith("cuda"))
            counts = {(p, e): host_reads(name, e, p, 20, Path(tmp), args.device)
                      for p in ("skip", "observe") for e in (1, 10)}
            paired = paired_fixed_cost(name, args.paired_steps, args.warmup, Path(tmp), args.device, clock)
            (fixed, fixed_se), (floor, floor_se) = paired["monitored"], paired["checked"]
            verdicts.append(f"{name}: fixed cost {fixed * 1e6:.0f} +- {fixed_se * 1e6:.0f} us per step not sampled "
                            f"(paired steps, every=10, mean +- standard error); floor {floor * 1e6:.0f} +- "
                            f"{floor_se * 1e6:.0f} us (a GradScaler's finite check and read); goal <= "
                            f"{FIXED_GOAL_MS * 1e3:.0f} us: {'met' if fixed <= FIXED_GOAL_MS * 1e-3 else 'NOT met'}")
            ratio10, ratio10_se = paired["every10"]
            goal10 = None if args.device.startswith("cuda") else E10_GOALS.get(name)
            verdicts.append(f"{name}: every=10 on paired steps {ratio10:.3f}x +- {ratio10_se:.3f} (mean step time over "
                            f"all {args.paired_steps} paired steps, sampled ones included, against the plain copy "
                            "stepping in turn)" + ("" if goal10 is None else
                                                   f", goal <= {goal10:.2f}x: {'met' if ratio10 <= goal10 else 'NOT met'}"))
            sampled_ops, _ = monitor_ops(name, 1, 6, Path(tmp), args.device)
            _, unsampled_ops = monitor_ops(name, 10, 21, Path(tmp), args.device)
            verdicts.append(f"{name}: aten ops the monitor adds per step (counted): {sampled_ops:.1f} sampled (every=1), "
                            f"{unsampled_ops:.1f} not sampled (every=10)")
            verdicts.append(f"{name}: host reads per step (ris_stability's, 20 steps) " + ", ".join(
                f"{p} every={e}: {v:.2f}" for (p, e), v in counts.items())
                + " (goals: observe 0 unsampled / <= 1 sampled, skip 1)")
    for name in args.model:
        print(f"  {name}: {DESCRIPTIONS[name]}")
    print("goals (every step, all statistics):")
    for line in verdicts:
        print("  " + line)


if __name__ == "__main__":
    main()
