"""Which worker runs the next trial: ``--trials N`` as N trials of one batch, claimed one at a time.

A ``risdiag sweep`` command is one *batch* (an id stored on each of its trials). Its workers claim trials
until the batch holds N of them: under a lock file in the sweep's output folder, a worker counts the
batch's trials and, below N, asks the study for a new one and tags it. So a worker that dies leaves at
most its running trial (failed by the launcher at once, or by heartbeat), and the survivors take every
trial it would have run; N finished trials (COMPLETE + PRUNED + FAIL) is what the command delivers.

The sampler is re-seeded for every trial from ``--seed`` and the study's trial count: a resumed study with
the same seed draws new parameters, and a fresh one with the same seed draws the same sequence.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

import optuna

log = logging.getLogger(__name__)

BATCH_ATTR = "batch"  # trial user attribute: the id of the command (batch) that claimed it
WORKER_ATTR = "pid"  # trial user attribute: the worker process running it
LOCK_FILE = ".claims.lock"


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler seed of the study's trial ``number`` (None: unseeded)."""
    return None if seed is None else (seed * 1_000_003 + number) % (2**32)


@contextlib.contextmanager
def claim_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock shared by the workers of this machine (released by the kernel if one dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def batch_trials(study: optuna.Study, batch: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BATCH_ATTR) == batch]


def claim(study: optuna.Study, batch: str, goal: int, folder: Path, seed: int | None,
          make_sampler: Callable[[int | None], optuna.samplers.BaseSampler]) -> optuna.Trial | None:
    """A new trial for this worker, or None once the batch holds ``goal`` trials."""
    with claim_lock(folder):
        trials = study.get_trials(deepcopy=False)
        if sum(t.user_attrs.get(BATCH_ATTR) == batch for t in trials) >= goal:
            return None
        study.sampler = make_sampler(trial_seed(seed, len(trials)))
        with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize(): we beat them
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        trial.set_user_attr(BATCH_ATTR, batch)
        trial.set_user_attr(WORKER_ATTR, os.getpid())
        return trial


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while the block runs (what ``study.optimize`` does for its trials)."""
    storage = study._storage  # Optuna keeps the storage here; Study exposes no public accessor
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"risdiag-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


__all__ = ["BATCH_ATTR", "WORKER_ATTR", "batch_trials", "claim", "claim_lock", "heartbeat", "trial_seed"]
