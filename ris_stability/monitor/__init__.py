"""The monitor: one config (policy, sampling), the typed loop context, the StabilityMonitor that composes the
instruments for a run, and the AMP and distributed readings it needs. Front doors live in ``attach``."""

from ris_stability.monitor.config import POLICIES, MonitorConfig, monitor_config
from ris_stability.monitor.context import LoopContext, NonFiniteError
from ris_stability.monitor.stability_monitor import StabilityMonitor

__all__ = ["LoopContext", "MonitorConfig", "NonFiniteError", "POLICIES", "StabilityMonitor", "monitor_config"]
