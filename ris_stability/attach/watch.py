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
from ris_stability.attach.driver import StepDriver
from ris_stability.attach.loop_parts import batch_state as inputs_state
from ris_stability.attach.hooks import AutoAttach
from ris_stability.monitor import MonitorConfig, NonFiniteError, StabilityMonitor, monitor_config
from ris_stability.records import TraceWriter

log = logging.getLogger(__name__)


def _roots(model: nn.Module | Mapping[str, nn.Module] | None) -> dict[str, nn.Module] | None:
    if model is None:
        return None
    if isinstance(model, nn.Module):
        return {"model": model}
    return dict(model)


class Watcher:
    """One monitored run: the monitor, the step driver every front door feeds, and (``hooks=True``) the global
    hooks that feed it for a loop we do not drive. ``hooks=False`` leaves the events to the caller (the
    Lightning callback, MonitorSession, a loop's callback protocol). ``config`` and ``settings`` (MonitorConfig
    fields; ``on_nonfinite`` is ``policy``) say what to measure; ``batch_state(batch) -> dict`` is a capsule's
    batch (default: the roots' recorded forward inputs); ``locate``: arm the in-process locator after a fault."""

    def __init__(self, out: str | Path, model: nn.Module | Mapping[str, nn.Module] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, *, config: MonitorConfig | None = None,
                 live: Any = None, meta: dict | None = None, config_text: str = "", replayer: str = "",
                 batch_state: Callable[[Any], dict] | None = None, listeners: tuple = (), hooks: bool = True,
                 locate: bool = True, **settings: Any):
        self.run_dir = Path(out)
        cfg = monitor_config(config, **settings)
        self.meta = {"torch": str(torch.__version__), **(meta or {})}
        self.monitor = StabilityMonitor(self.run_dir, cfg, meta=self.meta, config_text=config_text,
                                        replayer=replayer, batch_state=batch_state or inputs_state, live=live,
                                        listeners=listeners)
        self.driver = StepDriver(self.monitor, max_findings=1 if locate else 0)
        self._hooks = AutoAttach(self.driver, _roots(model), optimizer) if hooks else None
        self.status = "running"
        self.report_path: Path | None = None
        self._finished = False
        self._t0 = time.perf_counter()
        self.started = time.time()  # under DDP rank 0 waits for the shards closed since then

    # -- what the run saw (copies: the monitor and the driver keep their own) ---------------------------------
    nonfinite_steps = property(lambda self: list(self.monitor.nonfinite_steps), doc="steps with non-finite values")
    skipped_steps = property(lambda self: list(self.monitor.skipped_steps), doc="steps whose update was skipped")
    findings = property(lambda self: list(self.driver.findings), doc="(step, Finding) of the located faults")
    steps = property(lambda self: self.driver.step, doc="steps ended so far")

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "Watcher":
        self.driver.open()
        if self._hooks is not None:
            try:
                self._hooks.install()
            except BaseException:
                self.driver.close()
                raise
        return self

    def finish(self, exc: BaseException | None = None, message: str = "", stopped: bool | None = None) -> str:
        """Remove every hook, close the trace; the run's status: clean, nonfinite, stopped, crashed
        or no_steps (no optimizer step was seen). ``stopped``: ``exc`` ended the run under the stop policy
        (default: it is a NonFiniteError). Called again, it returns the status it already took."""
        if self._finished:
            return self.status
        self._finished = True
        stopped = isinstance(exc, NonFiniteError) if stopped is None else stopped
        if exc is not None and not stopped:
            self.driver.crashed(exc)  # a step run under the locator raised: where its bad value was born
        if self._hooks is not None:
            self._hooks.flush()
        self.driver.close()
        self.driver.keep_pending_finding()
        if self._hooks is not None:
            self._hooks.remove()
        d = self.driver
        if not d.attached:
            self.status = "crashed" if exc is not None and not stopped else "no_steps"
            self._empty_trace(message or (f"{type(exc).__name__}: {exc}" if exc is not None else
                                          "no optimizer step was seen: nothing was monitored"))
            return self.status
        if exc is not None:
            d.ctx.step = d.step
            self.monitor.on_exception(d.ctx, exc, stopped=stopped)
            self.status = "stopped" if stopped else getattr(exc, "run_status", "crashed")  # terminated: a signal
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
          out: str | Path | None = None, *, config: MonitorConfig | None = None, report: bool = True,
          replayer: str = "", tensorboard: str | Path | None = None, mlflow: bool = False,
          wandb: bool = False, **settings: Any) -> Iterator[Watcher]:
    """Attach the stability monitor to the loop inside the ``with`` block (see the module docstring).

    ``model``: the module (or name -> module) whose paths name findings; None discovers the modules
    that own the optimizer's parameters. ``optimizer``: the optimizer whose steps are the training
    steps; None follows the first one that steps. ``config`` / ``settings``: a MonitorConfig and fields to
    change in it, e.g. ``on_nonfinite="skip"`` (the default: a non-finite step changes neither parameters nor
    optimizer state), "stop" (end the block after locating it) or "observe"; ``every=10``. ``report``: write
    report.md at the end. The block's exceptions propagate, except the stop of the "stop" policy.
    ``tensorboard=DIR`` / ``mlflow=True`` / ``wandb=True``: also write the run there (see :mod:`ris_stability.sinks`).
    """
    from ris_stability.attach.finish import finish_run
    from ris_stability.sinks import open_sinks

    run_dir = Path(out) if out is not None else Path("runs") / f"watch-{time.strftime('%Y%m%d-%H%M%S')}"
    with open_sinks(tensorboard=tensorboard, mlflow=mlflow, wandb=wandb):
        w = Watcher(run_dir, model, optimizer, config=config, meta={"command": "ris_stability.watch"},
                    replayer=replayer, **settings).start()
        try:
            yield w
        except NonFiniteError as exc:
            finish_run(w, exc, report=report)
            log.warning("run stopped: %s", exc)
        except BaseException as exc:
            finish_run(w, exc, report=report)
            raise
        else:
            finish_run(w, report=report)


__all__ = ["Watcher", "watch"]
