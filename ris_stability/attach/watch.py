"""``watch``: the monitor attached to a training loop in one line, by hooks (see ``hooks.py``)::

    with ris_stability.watch(model, optimizer, out="runs/mine") as w:
        for x, y in loader:                      # the loop is unchanged
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()                     # a non-finite step is skipped (on_nonfinite="skip")
            optimizer.zero_grad()
    print(w.nonfinite_steps, w.findings)         # run folder: steps, events, capsules, report.md

:class:`Watcher` is the same attachment with an explicit start / finish, used by ``risdiag trace --
python script.py`` (where model and optimizer are discovered) and by the Lightning callback.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ris_stability.monitor import distributed
from ris_stability.attach.driver import NonFiniteError, StepDriver, batch_state
from ris_stability.attach.hooks import AutoAttach
from ris_stability.locate.finding import Finding
from ris_stability.monitor import MonitorConfig, StabilityMonitor
from ris_stability.records import TraceWriter

log = logging.getLogger(__name__)


def _roots(model: nn.Module | Mapping[str, nn.Module] | None) -> dict[str, nn.Module] | None:
    if model is None:
        return None
    if isinstance(model, nn.Module):
        return {"model": model}
    return dict(model)


class Watcher:
    """One monitored run of a loop we do not drive. ``hooks=False`` leaves the events to the caller
    (the Lightning callback calls ``driver``'s methods itself)."""

    def __init__(self, out: str | Path, model: nn.Module | Mapping[str, nn.Module] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, *, on_nonfinite: str = "skip", every: int = 1,
                 max_matrices: int = 4, live: Any = None, meta: dict | None = None, config_text: str = "",
                 replayer: str = "", hooks: bool = True):
        self.run_dir = Path(out)
        cfg = MonitorConfig(every=every, max_matrices=max_matrices, policy=on_nonfinite)
        self.meta = {"torch": str(torch.__version__), **(meta or {})}
        self.monitor = StabilityMonitor(self.run_dir, cfg, meta=self.meta, config_text=config_text,
                                        replayer=replayer, batch_state=batch_state, live=live)
        self.driver = StepDriver(self.monitor, on_nonfinite)
        self._hooks = AutoAttach(self.driver, _roots(model), optimizer) if hooks else None
        self.status = "running"
        self._t0 = time.perf_counter()

    # -- what the run saw ----------------------------------------------------------------------------
    @property
    def nonfinite_steps(self) -> list[int]:
        return list(self.monitor.nonfinite_steps)

    @property
    def skipped_steps(self) -> list[int]:
        return list(self.monitor.skipped_steps)

    @property
    def findings(self) -> list[tuple[int, Finding]]:
        return list(self.driver.findings)

    @property
    def steps(self) -> int:
        return self.driver.step

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "Watcher":
        if self._hooks is not None:
            self._hooks.install()
        return self

    def finish(self, exc: BaseException | None = None, message: str = "") -> str:
        """Remove every hook, close the trace; the run's status: clean, nonfinite, stopped, crashed
        or no_steps (no optimizer step was seen)."""
        self.driver.close_locator()
        self.driver.keep_pending_finding()
        if self._hooks is not None:
            self._hooks.remove()
        d = self.driver
        if not d.attached:
            self.status = "crashed" if exc is not None and not isinstance(exc, NonFiniteError) else "no_steps"
            self._empty_trace(message or (f"{type(exc).__name__}: {exc}" if exc is not None else
                                          "no optimizer step was seen: nothing was monitored"))
            return self.status
        if exc is not None:
            d.ctx.step = d.step
            self.monitor.on_exception(d.ctx, exc)
            self.status = "stopped" if isinstance(exc, NonFiniteError) else "crashed"
        else:
            self.monitor.on_train_end(d.ctx)
            self.status = "nonfinite" if self.monitor.nonfinite_steps else "clean"
        return self.status

    def _empty_trace(self, message: str) -> None:
        with TraceWriter(distributed.shard_dir(self.run_dir, distributed.process_rank()[0]), self.meta) as w:
            w.event("run_start", "info", "monitor waiting for the first optimizer step")
            w.event("run_stopped", "error", message)
            w.summary({"steps": 0, "wall_s": time.perf_counter() - self._t0, "nonfinite_steps": [],
                       "skipped_steps": [], "final_loss": None, "best_loss": None, "status": self.status})
            w.event("run_end", "info", f"run ended: {self.status}")


@contextlib.contextmanager
def watch(model: nn.Module | Mapping[str, nn.Module] | None = None, optimizer: torch.optim.Optimizer | None = None,
          out: str | Path | None = None, *, on_nonfinite: str = "skip", every: int = 1, max_matrices: int = 4,
          report: bool = True, replayer: str = "", tensorboard: str | Path | None = None,
          mlflow: bool = False) -> Iterator[Watcher]:
    """Attach the stability monitor to the loop inside the ``with`` block (see the module docstring).

    ``model``: the module (or name -> module) whose paths name findings; None discovers the modules
    that own the optimizer's parameters. ``optimizer``: the optimizer whose steps are the training
    steps; None follows the first one that steps. ``on_nonfinite``: "skip" (default: a non-finite step
    changes neither parameters nor optimizer state), "stop" (end the block after locating it) or
    "observe". ``report``: write report.md at the end. The block's exceptions propagate, except the
    stop of the "stop" policy. ``tensorboard=DIR`` / ``mlflow=True``: also write the run there
    (see :mod:`ris_stability.sinks`).
    """
    run_dir = Path(out) if out is not None else Path("runs") / f"watch-{time.strftime('%Y%m%d-%H%M%S')}"
    from ris_stability.sinks import open_sinks

    started = time.time()
    with open_sinks(tensorboard=tensorboard, mlflow=mlflow):
        w = Watcher(run_dir, model, optimizer, on_nonfinite=on_nonfinite, every=every, max_matrices=max_matrices,
                    meta={"command": "ris_stability.watch"}, replayer=replayer).start()
        try:
            yield w
        except NonFiniteError as exc:
            w.finish(exc)
            log.warning("run stopped: %s", exc)
        except BaseException as exc:
            w.finish(exc)
            raise
        else:
            w.finish()
        if report and w.driver.attached:
            _report(w, started)


def _report(w: Watcher, started: float) -> None:
    from ris_stability.report.build import build_report

    def write(missing: list[int]) -> None:
        if missing:
            log.warning("rank(s) %s did not close their shard; the report shows what they wrote", missing)
        build_report(w.run_dir)

    close_run(w, started, write)


def close_run(w: Watcher, started: float, write: Callable[[list[int]], None]) -> None:
    """End a finished run's output: ``write(missing)`` writes the summary / report. In one process it is
    called at once. Under DDP rank 0 first waits for the other ranks' shards (``missing``: those still open
    after the timeout), then calls it and marks the run folder done; a rank > 0 writes nothing and waits
    for that mark, so that its own exit (torchrun stops every rank when one exits with an error) cannot
    cut rank 0's report short. ``started``: time.time() at the run's start."""
    group = w.monitor.dist  # the group may be gone by now (a script destroys its own): the monitor kept it
    rank, world = (group.rank, group.world) if group is not None else distributed.process_rank()
    if world == 1:
        write([])
        return
    wait_s = 5.0 if w.status == "crashed" else distributed.SHARD_WAIT_S  # a peer died: it may never close
    if rank != 0:
        if not distributed.wait_for_rank0(w.run_dir, started, wait_s):
            log.warning("rank %d: rank 0 did not mark the run folder complete within %.0f s", rank, wait_s)
        return
    try:
        write(distributed.wait_for_shards(w.run_dir, world, started, timeout_s=wait_s))
    finally:
        distributed.mark_rank0_done(w.run_dir)


__all__ = ["Watcher", "close_run", "watch"]
