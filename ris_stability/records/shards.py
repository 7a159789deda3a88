"""The on-disk layout of a data-parallel run folder, and waiting on it.

Rank 0 writes its trace in the run folder itself, rank r > 0 in ``<run>/rank<r>/`` (its shard). The end of
a run is agreed through files, not collectives: a traced script may have destroyed its process group by then,
so rank 0 waits for every shard's summary.json, and the other ranks wait for rank 0's completion mark. Only
the standard library; which rank this process is belongs to ``ris_stability.monitor.distributed``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SHARD_PREFIX = "rank"  # rank r > 0 writes its trace shard in <run>/rank<r>/; rank 0 writes <run>/ itself
SHARD_WAIT_S = 60.0  # how long rank 0 waits for the other ranks' shards to be closed before its report
# Rank 0 of a traced script touches this file in the run folder once its summary and report are written;
# the other ranks wait for it before they exit (torchrun stops every rank as soon as one exits with an
# error, which would cut rank 0's report short).
RANK0_DONE = ".rank0-done"


def shard_dir(run_dir: str | Path, r: int) -> Path:
    """The folder rank ``r`` writes its trace to (rank 0: the run folder itself)."""
    return Path(run_dir) if r == 0 else Path(run_dir) / f"{SHARD_PREFIX}{r}"


def shard_dirs(run_dir: str | Path) -> dict[int, Path]:
    """The shards present in a run folder, by rank (rank 0 is the folder itself)."""
    run_dir = Path(run_dir)
    found = {0: run_dir}
    for sub in run_dir.glob(f"{SHARD_PREFIX}[0-9]*"):
        if sub.is_dir() and sub.name[len(SHARD_PREFIX):].isdigit():
            found[int(sub.name[len(SHARD_PREFIX):])] = sub
    return dict(sorted(found.items()))


def wait_for_shards(run_dir: str | Path, world: int, since: float, timeout_s: float = SHARD_WAIT_S,
                    stop: Callable[[], bool] = lambda: False) -> list[int]:
    """Wait until every rank r > 0 has closed its shard (its summary.json written at or after ``since``,
    a time.time()); returns the ranks still missing after ``timeout_s`` or once ``stop()`` is true (e.g. the
    launcher asked this process to end). For runs whose process group may be gone by then (a traced script
    destroys its own), so no barrier is possible; the run folder must be on a filesystem every rank writes
    to (one node: always)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(1, world) if not _closed(shard_dir(run_dir, r) / "summary.json", since)]
        if not missing or time.monotonic() >= deadline or stop():
            return missing
        time.sleep(0.1)


def mark_rank0_done(run_dir: str | Path) -> None:
    """Rank 0: the run folder is complete (summary and report written)."""
    try:
        (Path(run_dir) / RANK0_DONE).touch()
    except OSError as err:
        log.warning("cannot mark %s as complete (%s); the other ranks wait for it until their timeout", run_dir, err)


def wait_for_rank0(run_dir: str | Path, since: float, timeout_s: float = SHARD_WAIT_S,
                   stop: Callable[[], bool] = lambda: False) -> bool:
    """Ranks > 0: wait until rank 0 has marked the run folder complete (at or after ``since``, a
    time.time()); False after ``timeout_s`` or once ``stop()`` is true."""
    deadline = time.monotonic() + timeout_s
    while not _closed(Path(run_dir) / RANK0_DONE, since):
        if time.monotonic() >= deadline or stop():
            return False
        time.sleep(0.1)
    return True


def _closed(marker: Path, since: float) -> bool:
    try:
        return marker.stat().st_mtime >= since - 1.0  # 1 s: coarse filesystem timestamps
    except OSError:
        return False


__all__ = ["RANK0_DONE", "SHARD_PREFIX", "SHARD_WAIT_S", "mark_rank0_done", "shard_dir", "shard_dirs",
           "wait_for_rank0", "wait_for_shards"]
