"""ris_stability: numerical-stability instruments for any PyTorch training loop.

The public API, in one place (everything else is importable from its package, and is advanced use):

* front doors - ``watch`` (one line around any loop), ``Watcher`` (the same with explicit start / finish),
  ``MonitorSession`` (a hand-written loop that calls the monitor itself), ``MonitorConfig`` (what every front
  door measures), ``NonFiniteError`` (the stop policy's exception); the Lightning and HF Trainer callbacks
  live in ``ris_stability.attach.lightning`` / ``.hf_trainer`` (optional extras); any script:
  ``risdiag trace -- python train.py``.
* instruments - ``SpectralProbe`` (statistics of every linear-algebra call), ``GradMonitor`` (per-module
  gradient norms), ``audit_precision`` / ``PrecisionAudit`` (float32 vs float64 gradient), ``check_alignment``
  (do loss and inference consume the same matrices?), ``Locator`` / ``locate_nonfinite`` (which op made the
  first non-finite value).
* the fix - ``gap_aware()``: gap-aware eigh / SVD backward inside the block.
* sweeps - ``report_metric(name, value)``: the one optional line of a script swept by ``risdiag sweep``.
* results - ``Finding`` / ``format_finding``; run folders are read with ``ris_stability.records.read_trace``.

Advanced: ``StabilityMonitor`` (the monitor the front doors compose; drive it through a front door),
``ris_stability.attach.driver.StepDriver`` and ``ris_stability.attach.callbacks.LoopCallbacks`` (feeding a loop
with a callback protocol of its own).

The core needs only torch; rich, pandas and matplotlib are imported by the live view, the trace reader and the
reports only.
"""

from ris_stability.attach import MonitorSession, Watcher, watch
from ris_stability.instruments.alignment import check_alignment
from ris_stability.instruments.grads import GradMonitor
from ris_stability.instruments.precision import PrecisionAudit, audit_precision
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.locate import Finding, Locator, format_finding, locate_nonfinite
from ris_stability.monitor import MonitorConfig, NonFiniteError, StabilityMonitor
from ris_stability.spectral import gap_aware
from ris_stability.sweep.metrics import report_metric

__all__ = ["audit_precision", "check_alignment", "Finding", "format_finding", "gap_aware", "GradMonitor", "Locator",
           "locate_nonfinite", "MonitorConfig", "MonitorSession", "NonFiniteError", "PrecisionAudit",
           "report_metric", "SpectralProbe", "StabilityMonitor", "Watcher", "watch"]
