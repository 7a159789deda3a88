"""Gradient spikes as incidents: a robust running baseline of gradient norms and the steps that leave it.

Each series (the total gradient norm, each module's, the gradient each linalg site passes back to its
matrix) keeps its last ``window`` finite values. A value is a spike when it exceeds both ``factor``
times the series' median and the median plus ``factor`` robust standard deviations (1.4826 * MAD): the
first rule ignores noisy series whose spread alone is large, the second ignores a quiet series whose
median is tiny. The total norm decides whether the step is a spike; the modules and sites whose own
series jumped are named with it, largest jump first. A huge but finite gradient is a spike, not a
non-finite step; non-finite values are left to the non-finite checks and never enter a baseline.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from ris_stability.records.schema import SettingError

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
TOTAL = "_total"


class SpikeConfigError(SettingError):
    """A spike detector setting that cannot define a baseline."""


@dataclass(frozen=True)
class Jump:
    name: str
    value: float
    baseline: float  # running median before this step

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline > 0 else math.inf


@dataclass(frozen=True)
class Spike:
    step: int
    total: Jump
    factor: float
    modules: tuple[Jump, ...] = ()
    sites: tuple[Jump, ...] = ()

    def message(self) -> str:
        text = (f"gradient spike at step {self.step}: total grad norm {self.total.value:.3g} = "
                f"{self.total.ratio:.3g}x its running median {self.total.baseline:.3g}")
        parts = [f"module {j.name} ({j.value:.3g}, x{j.ratio:.3g})" for j in self.modules[:4]]
        parts += [f"linalg site {j.name} ({j.value:.3g}, x{j.ratio:.3g})" for j in self.sites[:4]]
        return text + ("; jumped: " + ", ".join(parts) if parts else "; no single module or site jumped alone")

    def data(self) -> dict:
        jumps = lambda js: [{"name": j.name, "value": j.value, "baseline": j.baseline} for j in js]  # noqa: E731
        return {"total": self.total.value, "baseline": self.total.baseline, "factor": self.factor,
                "modules": jumps(self.modules), "sites": jumps(self.sites),
                "names": [j.name for j in self.modules] + [j.name for j in self.sites]}


@dataclass
class SpikeDetector:
    """Running median/MAD baselines per series; :meth:`observe` returns a :class:`Spike` or None."""

    factor: float = 10.0
    window: int = 50
    warmup: int = 5
    _history: dict[str, deque] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.factor > 1 or self.warmup < 2 or self.window < self.warmup:
            raise SpikeConfigError(
                f"spike detector: factor={self.factor} must be > 1, warmup={self.warmup} >= 2 and window="
                f"{self.window} >= warmup; e.g. factor=10, window=50, warmup=5")

    def threshold(self, name: str) -> float | None:
        """The value above which ``name`` spikes now; None while its baseline has fewer than warmup values."""
        hist = self._history.get(name)
        if hist is None or len(hist) < self.warmup:
            return None
        median = statistics.median(hist)
        mad = statistics.median(abs(v - median) for v in hist)
        return max(self.factor * median, median + self.factor * MAD_TO_SIGMA * mad)

    def _jump(self, name: str, value: float) -> Jump | None:
        limit = self.threshold(name)
        if limit is None or not math.isfinite(value) or value <= limit:
            return None
        return Jump(name, value, statistics.median(self._history[name]))

    def observe(self, step: int, total: float, modules: dict[str, float],
                sites: dict[str, float] | None = None) -> Spike | None:
        """Check the step against the baselines, then add its finite values to them."""
        sites = sites or {}
        spike = None
        jump = self._jump(TOTAL, total)
        if jump is not None:
            by_ratio = lambda js: tuple(sorted((j for j in js if j is not None), key=lambda j: -j.ratio))  # noqa: E731
            spike = Spike(step, jump, self.factor,
                          modules=by_ratio(self._jump(f"module/{n}", v) for n, v in modules.items()),
                          sites=by_ratio(self._jump(f"site/{n}", v) for n, v in sites.items()))
            spike = _strip(spike)
        for name, value in [(TOTAL, total)] + [(f"module/{n}", v) for n, v in modules.items()] + \
                [(f"site/{n}", v) for n, v in sites.items()]:
            if math.isfinite(value):
                self._history.setdefault(name, deque(maxlen=self.window)).append(value)
        return spike


def _strip(spike: Spike) -> Spike:
    """Jump names without their series prefix."""
    strip = lambda js: tuple(Jump(j.name.split("/", 1)[1], j.value, j.baseline) for j in js)  # noqa: E731
    return Spike(spike.step, Jump("total", spike.total.value, spike.total.baseline), spike.factor,
                 strip(spike.modules), strip(spike.sites))
