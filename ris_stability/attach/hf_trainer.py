"""Hugging Face ``transformers.Trainer``: ``StabilityTrainerCallback``, the monitor of ``risdiag trace``.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StabilityTrainerCallback(out="runs/mine", tensorboard="runs/tb")])

The callback starts the same automatic attachment as ``ris_stability.watch`` when training begins: the
model is the root that names modules, the optimizer's steps are the training steps and the loss is the
one each backward receives. A non-finite step is skipped by the optimizer hook (parameters and optimizer
state unchanged; the Trainer's learning-rate schedule still advances, as it does for its own skipped
AMP steps), the first ones get a finding, and report.md is written when training ends. The Trainer calls
no callback when training raises: the hooks then stay until the next ``on_train_begin`` or
``close()``; wrap ``trainer.train()`` in ``with ris_stability.watch(model, out=...):`` to have a crash
recorded as one. Under ``on_nonfinite="stop"`` the optimizer step raises ``NonFiniteError`` out of
``trainer.train()`` after the finding is written; call ``callback.close(exc)`` in the handler. Needs ``transformers`` (and its ``accelerate``): extra ``ris-diag[hf]``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ris_stability.attach.finish import finish_run
from ris_stability.attach.watch import Watcher
from ris_stability.monitor import MonitorConfig, NonFiniteError
from ris_stability.sinks import open_sinks

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("ris_stability.attach.hf_trainer needs transformers: pip install 'ris-diag[hf]'") from err

log = logging.getLogger(__name__)


class StabilityTrainerCallback(TrainerCallback):
    """Monitor a ``Trainer.train()``: trace files, capsules, findings and report.md in ``out``."""

    def __init__(self, out: str | Path | None = None, *, config: MonitorConfig | None = None, report: bool = True,
                 tensorboard: str | Path | None = None, mlflow: bool = False, wandb: bool = False,
                 **settings: Any):
        """``config`` / ``settings``: what the monitor measures (MonitorConfig and fields to change in it,
        e.g. ``on_nonfinite="stop"``, ``every=10``)."""
        self.out = Path(out) if out is not None else Path("runs") / f"trainer-{time.strftime('%Y%m%d-%H%M%S')}"
        self.options = {"config": config, **settings}
        self.report = report
        self.sink_options = {"tensorboard": tensorboard, "mlflow": mlflow, "wandb": wandb}
        self.watcher: Watcher | None = None
        self.result: Watcher | None = None  # the finished run (status, findings, run_dir) after train()
        self._stack: contextlib.ExitStack | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.close()  # a previous train() that raised left its hooks: end that run first
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(open_sinks(**self.sink_options))
        meta = {"command": f"transformers Trainer ({type(model).__name__})"}
        roots = {"model": model} if model is not None else None
        self.watcher = Watcher(self.out, roots, None, meta=meta, **self.options).start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, exc: BaseException | None = None) -> None:
        """Remove the hooks, close the trace, write report.md and publish to the sinks."""
        w, self.watcher = self.watcher, None
        stack, self._stack = self._stack, None
        if w is not None:
            finish_run(w, exc, report=self.report)
            self.result = w
        if stack is not None:
            stack.close()


__all__ = ["NonFiniteError", "StabilityTrainerCallback"]
