"""Workers: processes that take trials from one study until their share of ``--trials`` is done.

``--workers W`` splits the command's trials over W processes of this machine (each a ``risdiag sweep
--workers 1`` with its share); the same command with the same storage on another machine runs its own
trials in the same study (Optuna's TPE sees every finished trial, whichever worker ran it). Each trial
keeps a heartbeat; before each trial a worker fails the trials of dead workers (storage.fail_stale).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Callable, Sequence

import optuna

from ris_stability.sweep.storage import fail_stale
from ris_stability.sweep.trial import TrialCrashed

log = logging.getLogger(__name__)


def shares(trials: int, workers: int) -> list[int]:
    """``trials`` split over ``workers`` as evenly as possible (the first ones take the remainder)."""
    return [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], float], trials: int) -> None:
    """Run ``trials`` trials of ``study`` in this process, one at a time."""
    for _ in range(trials):
        fail_stale(study)
        study.optimize(objective, n_trials=1, catch=(TrialCrashed,))
    fail_stale(study)


def launch(commands: Sequence[list[str]]) -> int:
    """Start one worker process per command and wait for all; the worst exit code."""
    procs = [subprocess.Popen(cmd) for cmd in commands]
    log.info("started %d worker processes: pids %s", len(procs), [p.pid for p in procs])
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # our own children, by pid: their running trials fail by heartbeat
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    for p, code in zip(procs, codes):
        if code:
            log.error("worker pid %d exited with code %d", p.pid, code)
    return max(codes, default=0)


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``risdiag`` with ``argv`` in a fresh interpreter (same Python, same path)."""
    return [sys.executable, "-m", "ris_stability.cli", *argv]
