"""Where a sweep's objective comes from, and ``report_metric``: the one line a script may add.

``--metric NAME`` of a script sweep is read, in this order of precedence, from

1. ``ris_stability.report_metric(NAME, value)`` calls of the script (the last one is the trial's value;
   each call is also an intermediate value for Optuna's median pruner);
2. the script's last line on stdout that is a JSON object holding NAME (e.g. ``print(json.dumps({"val_loss":
   v}))``) -- only the final value, so the median pruner has nothing to compare during the run;
3. the trace itself: ``loss`` (the loss the trace saw at the last logged step) or ``loss/TERM`` (a loss
   term), reported to the median pruner at each logged step.

Outside a sweep ``report_metric`` only reaches the sinks a command installed (``risdiag trace --tensorboard
DIR --mlflow``: the value is written as ``val/NAME``); with none it does nothing but log at debug level, so a
script keeps working unchanged on its own.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

TRACE_METRICS = ("loss",)  # step-row columns a metric may name, besides loss/TERM
_HANDLERS: list[Callable[[str, float, "int | None"], None]] = []


def report_metric(name: str, value: float, step: int | None = None) -> None:
    """Report a scalar the sweep may optimise (``--metric NAME``); a no-op outside a sweep.

    ``value``: a Python number or a 0-d tensor; ``step``: the training step it belongs to (default: the
    trace's current step). Call it once per evaluation; the last call before the script ends is the
    trial's value."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"report_metric: name must be a non-empty string, got {name!r}")
    from ris_stability.sinks.base import current_sinks

    number = float(value.item() if hasattr(value, "item") else value)
    sinks = current_sinks()
    if not _HANDLERS and sinks is None:
        log.debug("report_metric(%r, %g): no sweep or sink is listening", name, number)
    if sinks is not None:
        sinks.metric(name, number, step)
    for handler in list(_HANDLERS):
        handler(name, number, step)


def add_handler(handler: Callable[[str, float, "int | None"], None]) -> Callable[[], None]:
    """Listen to report_metric calls of this process; returns the function that stops listening."""
    _HANDLERS.append(handler)
    return lambda: _HANDLERS.remove(handler) if handler in _HANDLERS else None


def is_trace_metric(name: str) -> bool:
    return name in TRACE_METRICS or (name.startswith("loss/") and len(name) > len("loss/"))


def trace_value(row: dict[str, Any], name: str) -> float | None:
    """The metric's value in one step row (None: not in this row)."""
    value = row.get(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):  # steps.jsonl spelling of a non-finite float
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value)
    return float(value)


def last_json_metrics(text: str) -> dict[str, float]:
    """The numbers of the last stdout line that is a JSON object (empty when there is none)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return {str(k): float(v) for k, v in data.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


def named_in_source(name: str, path: Path | None) -> bool:
    """Whether ``name`` appears as a word in the script's source (the up-front check of ``--metric``)."""
    if path is None or not path.is_file():
        return True  # nothing to check against: the trial will say so
    text = path.read_text(encoding="utf-8", errors="replace")
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", text) is not None


__all__ = ["TRACE_METRICS", "add_handler", "is_trace_metric", "last_json_metrics", "named_in_source",
           "report_metric", "trace_value"]
