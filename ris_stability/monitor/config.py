"""MonitorConfig: what the StabilityMonitor measures, how often (``sampled``) and what it asks of the loop on a
non-finite step (``policy``), validated once, on construction; ``monitor_config`` builds one from a front
door's keyword settings; and the rule that names the linear-algebra site most likely behind a non-finite
backward."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ris_stability.monitor import amp
from ris_stability.records import SettingError

SPIKE_WARMUP = 5  # logged steps before a gradient norm has a baseline
Policy = Literal["skip", "stop", "observe"]
POLICIES: tuple[str, ...] = ("skip", "stop", "observe")  # the choices of Policy, in the order shown to users


@dataclass(frozen=True)
class MonitorConfig:
    every: int = 1  # matrix and gradient statistics every n steps (non-finite checks run every step)
    max_matrices: int | None = 4  # matrices of each batch the probes analyse
    grad_depth: int = 2  # module-tree depth of the per-module gradient norms
    dead_after: int = 50  # steps after which a parameter / loss term that never moved is reported
    policy: Policy = "skip"  # what to ask of the loop on a non-finite step
    max_capsules: int = 5  # crash capsules (non-finite steps) per run: the first bad steps are the informative ones
    spike_snapshots: int = 1  # snapshots/ of finite gradient spikes per run, for `risdiag bisect --precision`
    update_every: int = 10  # update ratios (a parameter snapshot per step) every n steps: they move slowly
    spike_factor: float = 10.0  # a logged grad norm above factor x its running median (and factor robust sigmas)
    spike_window: int = 50  # logged steps in the running median / MAD baseline of each gradient norm
    audit_every: int = 0  # precision audit every n steps when the loop gives an audit_fn (0: only on spikes)
    audit_on_spike: bool = True  # precision audit on a gradient spike when the loop gives an audit_fn
    amp_collapse_steps: int = amp.COLLAPSE_STEPS  # GradScaler scale below 1 this many steps in a row: incident

    def __post_init__(self) -> None:
        if (self.every < 1 or self.dead_after < 1 or self.update_every < 1 or self.grad_depth < 1
                or self.max_capsules < 0 or self.spike_snapshots < 0 or (self.max_matrices is not None and self.max_matrices < 1)):
            raise SettingError(f"MonitorConfig: every={self.every}, dead_after={self.dead_after}, update_every="
                               f"{self.update_every}, grad_depth={self.grad_depth} and max_matrices="
                               f"{self.max_matrices} must be >= 1 (max_matrices=None: whole batches) and "
                               f"max_capsules={self.max_capsules}, spike_snapshots={self.spike_snapshots} >= 0")
        if not self.spike_factor > 1 or self.spike_window < SPIKE_WARMUP or self.audit_every < 0:
            raise SettingError(f"MonitorConfig: spike_factor={self.spike_factor} must be > 1, spike_window="
                               f"{self.spike_window} >= {SPIKE_WARMUP} and audit_every={self.audit_every} >= 0 "
                               "(0: no sampled audits)")
        if self.policy not in POLICIES:
            raise SettingError(f"on_nonfinite / MonitorConfig.policy = {self.policy!r}: valid choices "
                               f"{', '.join(repr(p) for p in POLICIES)}")

    def sampled(self, step: int) -> bool:
        """Whether matrix and gradient statistics are taken at ``step`` (non-finite checks run every step)."""
        return step % self.every == 0


_FIELDS = tuple(f.name for f in dataclasses.fields(MonitorConfig))


def monitor_config(config: MonitorConfig | None = None, **settings: Any) -> MonitorConfig:
    """The front doors' settings: ``config`` (default MonitorConfig()) with ``settings`` replaced; a front door's
    ``on_nonfinite=`` is the config's ``policy``. An unknown name is a SettingError listing the valid ones."""
    if "on_nonfinite" in settings:
        settings["policy"] = settings.pop("on_nonfinite")
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise SettingError(f"unknown monitor setting(s) {', '.join(unknown)}; valid: on_nonfinite, "
                           f"{', '.join(_FIELDS)}")
    base = config if config is not None else MonitorConfig()
    return dataclasses.replace(base, **settings) if settings else base


def suspect_site(sites: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The call site most likely behind a non-finite backward: eigenvectors used, smallest gap."""
    def key(s: dict[str, Any]) -> tuple[int, float, float]:
        st = s["stats"]
        gap = st.get("min_gap", math.nan)
        return (0 if s["vec_grad"] else 1, gap if math.isfinite(gap) else math.inf, -st.get("max_cluster", 0.0))
    ranked = sorted(sites.values(), key=key)
    return ranked[0] if ranked else None
