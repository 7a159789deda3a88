"""MonitorConfig: what the StabilityMonitor measures, how often (``sampled``) and what it asks of the loop on a
non-finite step (``policy``), validated once, on construction; ``monitor_config`` builds one from a front
door's keyword settings; and the rule that names the linear-algebra site most likely behind a non-finite
backward."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ris_stability.linalg.hazards import CONDITION_OPS
from ris_stability.linalg.registry import base_name, info
from ris_stability.monitor import amp
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL, eps_of, ill_conditioned_log10
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
    max_capsules: int = 5  # capsules kept per run: the first and the most recent (records/capsule_store.py)
    max_capsule_mb: float = 512.0  # their size in all (shared state included); the first and the latest stay
    spike_snapshots: int = 1  # snapshots/ of finite gradient spikes per run, for `risdiag bisect --precision`
    update_every: int = 10  # update ratios (a parameter snapshot per step) every n steps: they move slowly
    spike_factor: float = 10.0  # a logged grad norm above factor x its running median (and factor robust sigmas)
    spike_window: int = 50  # logged steps in the running median / MAD baseline of each gradient norm
    audit_every: int = 0  # precision audit every n steps when the loop gives an audit_fn (0: only on spikes)
    audit_on_spike: bool = True  # precision audit on a gradient spike when the loop gives an audit_fn
    amp_collapse_steps: int = amp.COLLAPSE_STEPS  # GradScaler scale below 1 this many steps in a row: incident
    on_explosion: Policy = "observe"  # what to ask of the loop on a catastrophic finite gradient (docs/explosions.md)

    def __post_init__(self) -> None:
        if (self.every < 1 or self.dead_after < 1 or self.update_every < 1 or self.grad_depth < 1
                or self.max_capsules < 0 or not self.max_capsule_mb > 0 or self.spike_snapshots < 0
                or (self.max_matrices is not None and self.max_matrices < 1)):
            raise SettingError(f"MonitorConfig: every={self.every}, dead_after={self.dead_after}, update_every="
                               f"{self.update_every}, grad_depth={self.grad_depth} and max_matrices="
                               f"{self.max_matrices} must be >= 1 (max_matrices=None: whole batches), "
                               f"max_capsules={self.max_capsules} and spike_snapshots={self.spike_snapshots} >= 0, "
                               f"max_capsule_mb={self.max_capsule_mb} > 0")
        if not self.spike_factor > 1 or self.spike_window < SPIKE_WARMUP or self.audit_every < 0:
            raise SettingError(f"MonitorConfig: spike_factor={self.spike_factor} must be > 1, spike_window="
                               f"{self.spike_window} >= {SPIKE_WARMUP} and audit_every={self.audit_every} >= 0 "
                               "(0: no sampled audits)")
        if self.policy not in POLICIES:
            raise SettingError(f"on_nonfinite / MonitorConfig.policy = {self.policy!r}: valid choices "
                               f"{', '.join(repr(p) for p in POLICIES)}")
        if self.on_explosion not in POLICIES:
            raise SettingError(f"on_explosion = {self.on_explosion!r}: valid choices "
                               f"{', '.join(repr(p) for p in POLICIES)} (what to do with a catastrophic finite gradient)")

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


def suspect_site(sites: dict[str, dict[str, Any]], dtype: torch.dtype = torch.float32) -> dict[str, Any] | None:
    """The call site most likely behind a non-finite backward, only with evidence at this step (its record
    plus ``evidence``, in words): a tie, or a gap near the rounding floor, while the eigen/singular vectors
    receive gradient; a non-finite input; or, for an op that inverts its matrix, a condition number past the
    dtype's digits. Among those: vectors used first, then the smallest relative gap. None without evidence: a
    healthy decomposition next to the fault is never blamed."""
    found = [(site, why) for site in sites.values() if (why := _evidence(site, dtype))]

    def key(item: tuple[dict[str, Any], str]) -> tuple[int, float, float]:
        s = item[0]
        rel = _relative_gap(s["stats"], s.get("op", ""))
        return (0 if s["vec_grad"] else 1, rel if math.isfinite(rel) else math.inf, -s["stats"].get("max_cluster", 0.0))
    found.sort(key=key)
    return {**found[0][0], "evidence": found[0][1]} if found else None


def _relative_gap(st: dict[str, Any], op: str) -> float:
    """The smallest gap over the spectrum's scale (gaps of an svd are in s^2 units)."""
    gap, scale = st.get("min_gap", math.nan), abs(st.get("lambda_max", math.nan))
    if "svd" in op or (info(op) is not None and info(op).values == "singular values"):
        scale = scale * scale
    return gap / scale if scale > 0 else math.nan


def _evidence(site: dict[str, Any], dtype: torch.dtype) -> str:
    st, op = site["stats"], site.get("op", "")
    values = (info(op).values if info(op) is not None else "eigenvalues")
    if any(isinstance(v, float) and math.isnan(v) for k, v in st.items() if k in ("trace", "lambda_max", "lambda_min")):
        return "its input held NaN/Inf"
    if site.get("vec_grad"):
        cluster = st.get("max_cluster", 0.0)
        if cluster > 1:
            return f"{int(cluster)} {values} tie at {st.get('cluster_value', math.nan):.2e}"
        rel, n = _relative_gap(st, op), st.get("n", math.nan)
        floor = (n if math.isfinite(n) and n > 0 else 2.0) * eps_of(dtype) / PRECISION_GRAD_RTOL
        if rel < floor:
            return f"smallest gap {st.get('min_gap', math.nan):.2e} ({rel:.1e} relative, below the rounding floor {floor:.1e})"
    if base_name(op) in CONDITION_OPS and st.get("log10_cond", math.nan) > ill_conditioned_log10(dtype):
        return f"log10 condition number {st['log10_cond']:.1f}"
    return ""
