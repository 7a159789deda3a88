"""finish_run: the one end of a monitored run, whatever front door started it (script trace, ``watch``,
MonitorSession's loops, Lightning, HF Trainer, a pipeline's callbacks): close the trace (summary, run_end),
wait for the other ranks' shards under DDP, write report.md once, and mark the run folder done."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ris_stability.attach.signals import asked_to_end
from ris_stability.monitor import distributed

if TYPE_CHECKING:
    from ris_stability.attach.watch import Watcher

log = logging.getLogger(__name__)


def finish_run(w: "Watcher", exc: BaseException | None = None, *, report: bool = True, stopped: bool | None = None,
               announce: Callable[[list[int]], None] | None = None) -> str:
    """End ``w``'s run: :meth:`Watcher.finish` (idempotent), then, on the rank that writes them, ``announce
    (missing)`` (e.g. the CLI's summary table; ``missing``: ranks whose shard stayed open) and report.md.
    Returns the run's status."""
    status = w.finish(exc, stopped=stopped)

    def write(missing: list[int]) -> None:
        if missing:
            log.warning("rank(s) %s did not close their shard; the report shows what they wrote", missing)
        if announce is not None:
            announce(missing)
        if report and w.driver.attached:
            from ris_stability.report.build import build_report

            w.report_path = Path(build_report(w.run_dir))

    close_run(w, write)
    return status


def close_run(w: "Watcher", write: Callable[[list[int]], None]) -> None:
    """End a finished run's output: ``write(missing)`` writes the summary / report. In one process it is
    called at once. Under DDP rank 0 first waits for the other ranks' shards (``missing``: those still open
    after the timeout), then calls it and marks the run folder done; a rank > 0 writes nothing and waits
    for that mark, so that its own exit (torchrun stops every rank when one exits with an error) cannot
    cut rank 0's report short."""
    started = w.started
    group = w.monitor.dist  # the group may be gone by now (a script destroys its own): the monitor kept it
    rank, world = (group.rank, group.world) if group is not None else distributed.process_rank()
    if world == 1:
        write([])
        return
    wait_s = 5.0 if w.status == "crashed" else distributed.SHARD_WAIT_S  # a peer died: it may never close
    if rank != 0:
        if not distributed.wait_for_rank0(w.run_dir, started, wait_s, stop=asked_to_end):
            log.warning("rank %d: rank 0 did not mark the run folder complete within %.0f s", rank, wait_s)
        return
    try:
        write(distributed.wait_for_shards(w.run_dir, world, started, timeout_s=wait_s, stop=asked_to_end))
    finally:
        distributed.mark_rank0_done(w.run_dir)



__all__ = ["close_run", "finish_run"]
