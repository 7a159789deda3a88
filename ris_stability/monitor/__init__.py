"""The monitor: one config (policy, sampling), the StabilityMonitor that composes the instruments for a
run, MonitorSession for hand-written loops, and the AMP and distributed readings it needs."""

from ris_stability.monitor.config import MonitorConfig
from ris_stability.monitor.session import LoopContext, MonitorSession
from ris_stability.monitor.stability_monitor import StabilityMonitor

__all__ = ["LoopContext", "MonitorConfig", "MonitorSession", "StabilityMonitor"]
