"""ris_stability: numerical-stability instruments for any PyTorch training loop.

The core (probes, gradient monitor, monitor, locator, alignment) needs only torch; rich, pandas and
matplotlib are imported by the live view, the trace reader and the reports only.
"""

from ris_stability.instruments.alignment import check_alignment
from ris_stability.attach import watch
from ris_stability.instruments.grads import GradMonitor
from ris_stability.locate import Finding, Locator, format_finding, locate_nonfinite
from ris_stability.instruments.precision import PrecisionAudit, audit_precision
from ris_stability.monitor import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.spectral import gap_aware
from ris_stability.sweep.metrics import report_metric  # the one optional line of a swept script

__all__ = ["audit_precision", "PrecisionAudit", "check_alignment", "Finding", "format_finding", "gap_aware", "GradMonitor",
           "Locator", "locate_nonfinite", "MonitorConfig", "MonitorSession", "report_metric", "StabilityMonitor", "SpectralProbe", "watch"]
