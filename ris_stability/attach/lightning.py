"""PyTorch Lightning 2.x: ``StabilityCallback``, the stability monitor of ``risdiag trace`` for a Trainer.

    trainer = lightning.Trainer(callbacks=[StabilityCallback(out="runs/mine")])

Lightning runs forward and backward inside a closure that ``optimizer.step`` calls, so this callback
follows Lightning's hooks instead of the optimizer hooks of ``risdiag trace``: a step starts at
``on_train_batch_start``, the loss is the one of ``on_before_backward``, gradients are checked in
``on_before_optimizer_step`` (after the closure's backward, before the update: a non-finite step is
skipped there by hiding its gradients) and the step ends at ``on_train_batch_end``. The model roots are
``{"model": pl_module}``; the first optimizer's steps are the training steps. Works with ``lightning`` or
``pytorch_lightning`` (whichever is installed; the optional extra ``ris-diag[lightning]``). Limits: manual
optimisation and several optimizers per step are followed through the first optimizer only.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ris_stability.attach.finish import finish_run
from ris_stability.attach.watch import Watcher
from ris_stability.monitor import MonitorConfig, NonFiniteError

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as err:
        raise ImportError("ris_stability.attach.lightning needs PyTorch Lightning 2.x: "
                          "pip install 'ris-diag[lightning]'") from err

log = logging.getLogger(__name__)


class StabilityCallback(Callback):
    """Monitor a Lightning fit: trace files, capsules, finding and report.md in ``out``."""

    def __init__(self, out: str | Path | None = None, *, config: MonitorConfig | None = None, report: bool = True,
                 **settings: Any):
        """``config`` / ``settings``: what the monitor measures (MonitorConfig and fields to change in it,
        e.g. ``on_nonfinite="stop"``, ``every=10``)."""
        super().__init__()
        self.out = Path(out) if out is not None else Path("runs") / f"lightning-{time.strftime('%Y%m%d-%H%M%S')}"
        self.options = {"config": config, **settings}
        self.report = report
        self.watcher: Watcher | None = None
        self.result: Watcher | None = None  # the finished run (status, findings, run_dir) after fit
        self._loss = None
        self._stopped: NonFiniteError | None = None

    # -- fit lifecycle -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        meta = {"command": f"lightning fit ({type(pl_module).__name__})"}
        self.watcher = Watcher(self.out, hooks=False, meta=meta, **self.options).start()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(exception)

    # -- one step ------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        d = self.watcher.driver
        if not d.attached:
            d.attach({"model": pl_module}, trainer.optimizers[0])
        d.record_inputs("batch", (batch,), {})
        d.start_step()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._loss = loss
        self.watcher.driver.before_backward(loss)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.watcher.driver.after_backward(self._loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        d = self.watcher.driver
        if d.attached and optimizer is d.ctx.optimizer:
            d.before_optimizer_step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        d = self.watcher.driver
        if not d.in_step:
            return
        try:
            d.after_optimizer_step()
        except NonFiniteError as exc:  # the stop policy: let Lightning end the fit cleanly
            self._stopped = exc
            trainer.should_stop = True

    # -- end -------------------------------------------------------------------------------------------
    def _finish(self, exc: BaseException | None) -> None:
        w, self.watcher = self.watcher, None
        if w is None:
            return
        finish_run(w, exc if exc is not None else self._stopped, report=self.report)
        self.result = w


__all__ = ["StabilityCallback"]
