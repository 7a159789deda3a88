"""The live dashboard of `risdiag trace`: a pure table builder plus a rich Live that is refreshed by hand.

``build_dashboard(state)`` is pure (state in, renderable out) so it can be tested without a terminal.
``LiveView`` switches itself off without a TTY (CI) or when asked to, and then logs one plain progress line
per interval instead (about 40 per run). Either way it follows the trace writer (``record``): each kind of
warning or incident is logged once, when it first happens, and its repeats are counted in one line at the end.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ris_stability.linalg.hazards import tie_safe
from ris_stability.report.markdown import shortlist

log = logging.getLogger(__name__)



@dataclass
class DashboardState:
    total_steps: int
    step: int = 0
    row: dict[str, Any] = field(default_factory=dict)
    nonfinite_steps: list[int] = field(default_factory=list)
    last_event: str = ""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


def _group(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}


def _matrices(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    mats: dict[str, dict[str, Any]] = {}
    for key, v in _group(row, "mat/").items():
        name, _, stat = key.rpartition("/")
        mats.setdefault(name, {})[stat] = v
    return mats


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def worst_hazard(row: dict[str, Any]) -> tuple[str, dict[str, Any], str] | None:
    """The site of a step row that most endangers a backward, with why: a non-finite input (its spectrum is
    NaN), else the smallest gap among sites whose eigen/singular vectors receive gradient through a backward
    that is not tie-safe. None when no site is either: an eigenvalues-only site's tie is no hazard."""
    mats = _matrices(row)
    for name, s in mats.items():
        if "trace" in s and _nan(s["trace"]):
            return name, s, "non-finite input"
    vectors = [(s["min_gap"], name, s) for name, s in mats.items() if s.get("vec_grad") and not tie_safe(name)
               and isinstance(s.get("min_gap"), (int, float)) and not _nan(s["min_gap"])]
    if not vectors:
        return None
    _, name, s = min(vectors, key=lambda v: v[0])
    return name, s, "eigenvectors receive gradient"


def worst_matrices(row: dict[str, Any], n: int = 5) -> list[tuple[str, dict[str, Any]]]:
    """Matrices of a step row, worst first: smallest relevant gap, then largest condition number."""
    mats = _matrices(row)

    def badness(item: tuple[str, dict[str, Any]]) -> tuple[float, float]:
        s = item[1]
        gap = s.get("min_gap")
        gap = math.inf if gap is None or (isinstance(gap, float) and math.isnan(gap)) else gap
        lc = s.get("log10_cond")
        lc = 0.0 if lc is None or (isinstance(lc, float) and math.isnan(lc)) else lc
        return (gap if s.get("vec_grad") else math.inf, -lc)

    return sorted(mats.items(), key=badness)[:n]


def build_dashboard(state: DashboardState) -> Group:
    row = state.row
    head = Text.assemble(("risdiag trace ", "bold"), f"step {state.step}/{state.total_steps or '?'}   ",
                         ("non-finite steps: ", "bold"),
                         (str(len(state.nonfinite_steps)), "red bold" if state.nonfinite_steps else "green"))
    bar = ProgressBar(total=max(state.total_steps, 1), completed=state.step, width=60)

    losses = Table(title="loss terms", expand=False)
    losses.add_column("term")
    losses.add_column("value", justify="right")
    losses.add_row("total", _fmt(row.get("loss")))
    for term, v in _group(row, "loss/").items():
        losses.add_row(term, _fmt(v))

    mats = Table(title="worst matrices", expand=False)
    for col in ("matrix", "rank", "log10 cond", "min gap", "tied", "vec grad"):
        mats.add_column(col, justify="right" if col != "matrix" else "left")
    for name, s in worst_matrices(row):
        tied = s.get("max_cluster")
        style = "red" if s.get("vec_grad") and tied is not None and tied > 1 else ""
        mats.add_row(name, _fmt(s.get("rank")), _fmt(s.get("log10_cond")), _fmt(s.get("min_gap")),
                     _fmt(tied), "yes" if s.get("vec_grad") else "no", style=style)

    grads = Table(title="grad norms", expand=False)
    grads.add_column("module")
    grads.add_column("norm", justify="right")
    for mod, v in sorted(_group(row, "grad/").items()):
        grads.add_row(mod, _fmt(v))

    parts: list[Any] = [head, bar, Table.grid(padding=(0, 2))]
    parts[2].add_row(losses, grads)
    parts.append(mats)
    if state.last_event:
        parts.append(Text(state.last_event, style="yellow"))
    return Group(*parts)


def plain_line(state: DashboardState) -> str:
    row = state.row
    hazard = worst_hazard(row)
    mat = " hazard=none" if any(k.startswith("mat/") for k in row) else ""
    if hazard is not None:
        name, s, why = hazard
        mat = (f" hazard={name} ({why})" if why.startswith("non-finite") else
               f" hazard={name} gap={_fmt(s.get('min_gap'))} tied={_fmt(s.get('max_cluster'))}")
    return (f"step {state.step}/{state.total_steps or '?'} loss={_fmt(row.get('loss'))} "
            f"grad={_fmt(row.get('grad/_total'))} nonfinite={len(state.nonfinite_steps)}{mat}")


_TERMINAL: Console | None = None


def terminal_console() -> Console:
    """The one stderr console shared by the dashboard and the log handler, so that log records are
    printed above the live region instead of through it."""
    global _TERMINAL
    if _TERMINAL is None:
        _TERMINAL = Console(stderr=True)
    return _TERMINAL


class LiveView:
    """rich Live dashboard when attached to a terminal; plain log lines otherwise."""

    def __init__(self, total_steps: int, enabled: bool = True, console: Console | None = None):
        self.console = console or terminal_console()
        self.enabled = enabled and self.console.is_terminal and sys.stderr.isatty()
        self.state = DashboardState(total_steps=total_steps)
        self._live: Live | None = None
        self._incidents: dict[str, list[Any]] = {}  # event kind -> steps, in order

    @property
    def total_steps(self) -> int:
        return self.state.total_steps

    @total_steps.setter
    def total_steps(self, total: int) -> None:
        """Known once the run's config is read (before the view is entered)."""
        self.state.total_steps = total

    def __enter__(self) -> "LiveView":
        if self.enabled:
            self._live = Live(build_dashboard(self.state), console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        for kind, steps in self._incidents.items():
            if len(steps) > 1:
                log.warning("%s: %d more (all in events.jsonl), at steps %s", kind, len(steps) - 1,
                            shortlist(steps[1:], 10))
        self._incidents = {}

    def record(self, kind: str, record: dict[str, Any]) -> None:
        """A listener of the trace writer: log a warning or error event the first time its kind occurs."""
        severity = record.get("severity")
        if kind != "event" or severity not in ("warning", "error"):
            return
        steps = self._incidents.setdefault(str(record.get("kind")), [])
        steps.append(record.get("step"))
        if len(steps) == 1:
            at = f" at step {record['step']}" if record.get("step") is not None else ""
            log.log(logging.ERROR if severity == "error" else logging.WARNING, "%s%s: %s", record.get("kind"), at,
                    record.get("message"))

    def update(self, step: int, row: dict[str, Any] | None = None, event: str | None = None,
               nonfinite: bool = False) -> None:
        self.state.step = step
        if row is not None:
            self.state.row = row
        if nonfinite and step not in self.state.nonfinite_steps:
            self.state.nonfinite_steps.append(step)
        if event:
            self.state.last_event = event
        if self._live is not None:
            self._live.update(build_dashboard(self.state), refresh=True)
        elif row is not None and self._plain_due(step):  # incidents are logged by record(), once per kind
            log.info("%s", plain_line(self.state))

    def _plain_due(self, step: int) -> bool:
        total = self.state.total_steps
        if total <= 0:  # length unknown (a traced script): steps 1-10, then each power of ten's multiples
            return step <= 10 or step % (10 ** (len(str(step)) - 1)) == 0
        return step % max(1, total // 40) == 0 or step >= total  # about 40 plain lines per run, plus incidents
