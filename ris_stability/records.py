"""Trace files of a monitored run (format v1): writer, tolerant reader, Parquet converter.

A run folder holds meta.json, steps.jsonl (one flat JSON object per logged step), events.jsonl,
optional summary.json / finding.json / capsules/. The writer appends and flushes one line per step,
so a killed process loses at most the step being written; the reader drops a truncated last line.
Non-finite floats are written as JSON null and read back as NaN (JSON has no NaN/inf literals).

The writer needs only the standard library; pandas is imported by the reader and the converter.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:  # pandas is heavy and only needed by readers
    import pandas as pd

logger = logging.getLogger(__name__)

SCHEMA_NAME = "risdiag-trace"
SCHEMA_VERSION = 1

META_FILE = "meta.json"
STEPS_FILE = "steps.jsonl"
STEPS_PARQUET = "steps.parquet"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
FINDING_FILE = "finding.json"
CAPSULE_DIR = "capsules"

SEVERITIES = ("info", "warning", "error")
EVENT_KINDS = (
    "run_start", "run_end", "nonfinite_loss", "nonfinite_grad", "step_skipped", "run_stopped",
    "capsule_written", "dead_parameter", "dead_loss_term", "ill_conditioned", "tied_eigenvalues",
    "finding",
)
# Step-table columns that are flags, not measurements.
BOOL_COLUMNS = ("skipped", "nonfinite")

MAT_PREFIX = "mat/"
LOSS_PREFIX = "loss/"
GRAD_PREFIX = "grad/"
GRAD_TOTAL = "grad/_total"
GRAD_NONFINITE_PREFIX = "grad_nonfinite/"
UPDATE_RATIO_PREFIX = "update_ratio/"
GRAD_GROUP_PREFIX = "grad_group/"


class UsageError(Exception):
    """Base of the errors caused by what the user asked for (bad folder, bad file); CLI exit code 2."""


class TraceError(UsageError):
    """A run folder or one of its trace files cannot be read or written."""



def _jsonable(value: Any, key: str) -> Any:
    """Plain-JSON form of one value; non-finite floats become None (read back as NaN)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        as_float = float(value)
        return as_float if math.isfinite(as_float) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"trace value {key!r} has type {type(value).__name__}, which the trace cannot store; "
        "pass a Python number, bool, str, None, list or dict (call .item() on 0-d tensors)"
    )


def _dumps(obj: Mapping[str, Any], what: str) -> str:
    return json.dumps(_jsonable(obj, what), allow_nan=False, separators=(",", ":"))


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> Path:
    """Write a JSON file via a temporary file + rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_jsonable(obj, path.name), allow_nan=False, indent=2, sort_keys=True)
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise TraceError(f"cannot write {path}: {exc}. Check that the folder exists and is writable.") from exc
    return path


def write_finding(run_dir: Path, finding: Mapping[str, Any]) -> Path:
    """Store the bisector's Finding.to_dict() as run_dir/finding.json."""
    return write_json_atomic(Path(run_dir) / FINDING_FILE, finding)



class TraceWriter:
    """Append-only writer of one run folder.

    `fsync=True` also forces each line to disk (survives a machine crash, costs ~ms per step);
    flushing alone already survives the process being killed.
    """

    def __init__(self, run_dir: Path, meta: Mapping[str, Any], *, fsync: bool = False,
                 listeners: Iterable[Callable[[str, Mapping[str, Any]], None]] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.fsync = fsync
        # Called with ("step", row) / ("event", record) after each line is written: how other instruments
        # (e.g. a sweep's pruner) follow a run as it happens without reading the files back.
        self.listeners = tuple(listeners)
        self._t0 = time.monotonic()
        self._closed = False
        if (self.run_dir / META_FILE).exists():
            raise TraceError(
                f"{self.run_dir} already holds a trace ({META_FILE} exists); appending would mix two runs. "
                "Choose another output folder or delete the old run."
            )
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            full_meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            full_meta.update(meta)
            full_meta.update(schema=SCHEMA_NAME, version=SCHEMA_VERSION)
            write_json_atomic(self.run_dir / META_FILE, full_meta)
            self._steps = open(self.run_dir / STEPS_FILE, "a", encoding="utf-8")
            self._events = open(self.run_dir / EVENTS_FILE, "a", encoding="utf-8")
        except OSError as exc:
            raise TraceError(
                f"cannot create the run folder {self.run_dir}: {exc}. Pass a writable output folder."
            ) from exc

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _append(self, handle, line: str) -> None:
        if self._closed:
            raise ValueError(f"TraceWriter for {self.run_dir} is closed; no more rows can be written")
        handle.write(line + "\n")
        handle.flush()
        if self.fsync:
            os.fsync(handle.fileno())

    def step(self, row: Mapping[str, Any]) -> None:
        """Append one step row (flat keys per TRACE_SCHEMA); adds time_s when absent."""
        if not isinstance(row.get("step"), numbers.Integral) or isinstance(row.get("step"), bool):
            raise ValueError(f"step row needs an integer 'step' key, got {row.get('step')!r}")
        full = dict(row)
        full.setdefault("time_s", self.elapsed())
        self._append(self._steps, _dumps(full, "step row"))
        for listener in self.listeners:
            listener("step", full)

    def event(self, kind: str, severity: str, message: str, step: int | None = None, **data: Any) -> None:
        """Append one event; `data` holds the kind-specific fields (matrix, names, path, ...)."""
        if severity not in SEVERITIES:
            raise ValueError(f"event severity must be one of {SEVERITIES}, got {severity!r}")
        if not kind or not isinstance(kind, str):
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        if kind not in EVENT_KINDS:
            logger.debug("event kind %r is not one of the documented kinds %s", kind, EVENT_KINDS)
        record = {"step": step, "time_s": self.elapsed(), "kind": kind, "severity": severity,
                  "message": str(message), "data": data}
        self._append(self._events, _dumps(record, f"event {kind}"))
        for listener in self.listeners:
            listener("event", record)

    def summary(self, summary: Mapping[str, Any]) -> Path:
        """Write summary.json (steps, wall_s, nonfinite_steps, skipped_steps, final/best loss, status)."""
        return write_json_atomic(self.run_dir / SUMMARY_FILE, summary)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._steps.close()
        self._events.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()



@dataclass(frozen=True)
class Trace:
    """Everything a run folder recorded. `steps` is indexed by step, NaN where the trace had null."""

    run_dir: Path
    meta: dict
    steps: "pd.DataFrame"
    events: list[dict] = field(default_factory=list)
    summary: dict | None = None
    finding: dict | None = None
    capsules: list[Path] = field(default_factory=list)
    truncated: bool = False  # the last line of steps.jsonl was cut mid-write and dropped

    @property
    def matrices(self) -> list[str]:
        return matrix_names(self.steps.columns)

    @property
    def loss_terms(self) -> list[str]:
        return loss_terms(self.steps.columns)

    @property
    def grad_modules(self) -> list[str]:
        return grad_modules(self.steps.columns)

    @property
    def nonfinite_steps(self) -> list[int]:
        """Steps flagged non-finite by the step table or by summary.json (union, sorted)."""
        return _flagged(self, "nonfinite", "nonfinite_steps")

    @property
    def skipped_steps(self) -> list[int]:
        return _flagged(self, "skipped", "skipped_steps")


def _flagged(trace: Trace, column: str, summary_key: str) -> list[int]:
    found: set[int] = set()
    if column in trace.steps.columns:
        found.update(int(s) for s in trace.steps.index[trace.steps[column].astype(bool)])
    if trace.summary:
        found.update(int(s) for s in trace.summary.get(summary_key) or [])
    return sorted(found)


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """Rows of a JSONL file; a cut last line is dropped (returns truncated=True), other bad lines raise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from exc
    rows: list[dict] = []
    truncated = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s: last line is incomplete (the run was killed mid-write); dropped it", path)
                truncated = True
                break
            raise TraceError(
                f"{path} line {number} is not valid JSON ({exc.msg}); only the last line may be cut by a "
                "crash, so the file is corrupt. Re-run the trace or delete the bad line."
            ) from exc
        if not isinstance(row, dict):
            raise TraceError(f"{path} line {number} is a {type(row).__name__}, expected a JSON object")
        rows.append(row)
    return rows, truncated


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TraceError(f"cannot read {path}: {exc}. The file is damaged; delete it or re-run.") from exc
    if not isinstance(value, dict):
        raise TraceError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def read_meta(run_dir: Path) -> dict:
    """meta.json of a run folder, checked against the supported schema and version."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceError(f"{run_dir} is not a run folder (not a directory). Pass the folder `risdiag trace` wrote.")
    meta = _read_json(run_dir / META_FILE)
    if meta is None:
        raise TraceError(
            f"{run_dir} is not a run folder: it has no {META_FILE}. Pass the folder written by "
            "`risdiag trace --out DIR` (it holds meta.json and steps.jsonl)."
        )
    schema, version = meta.get("schema"), meta.get("version")
    if schema != SCHEMA_NAME or version != SCHEMA_VERSION:
        raise TraceError(
            f"{run_dir / META_FILE}: unknown trace schema {schema!r} version {version!r}; this ris-diag "
            f"reads {SCHEMA_NAME!r} version {SCHEMA_VERSION}. Re-run the trace with this version, "
            "or read it with the ris-diag release that wrote it."
        )
    return meta


def _steps_frame(rows: list[dict], source: Path) -> "pd.DataFrame":
    import pandas as pd

    if any("step" not in row for row in rows):
        raise TraceError(f"{source}: a row has no 'step' key; the file was not written by TraceWriter")
    frame = pd.DataFrame.from_records(rows)
    for column in frame.columns:
        if column in BOOL_COLUMNS:
            frame[column] = frame[column].astype("boolean").fillna(False).astype(bool)
        elif column != "step" and (_is_numeric_column(column) or _all_numbers(frame[column])):
            frame[column] = _numeric(frame[column], column, source)
    frame["step"] = frame["step"].astype(int)
    if frame["step"].duplicated().any():
        dups = sorted(set(frame.loc[frame["step"].duplicated(), "step"].tolist()))
        logger.warning("%s: steps %s logged twice; keeping the last row of each", source, dups[:10])
        frame = frame.drop_duplicates("step", keep="last")
    return frame.set_index("step").sort_index()


def _numeric(series: "pd.Series", column: str, source: Path) -> "pd.Series":
    """Float column; null -> NaN, bool -> 0/1. Strings such as "inf" are rejected: the format writes null."""
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(series):
        bad = series[series.map(lambda v: v is not None and not isinstance(v, (int, float)))]
        if len(bad):
            raise TraceError(
                f"{source}: column {column!r} holds non-numbers (e.g. {bad.iloc[0]!r} at row {bad.index[0]}); "
                "trace format v1 stores non-finite values as null. Re-write the trace with TraceWriter."
            )
    return series.astype(float)


def _all_numbers(series: "pd.Series") -> bool:
    """An extra column (e.g. "grad_group/<g>") whose values are numbers or null reads as float too."""
    return bool(series.map(lambda v: v is None or isinstance(v, (int, float))).all())


def _is_numeric_column(column: str) -> bool:
    prefixes = (MAT_PREFIX, LOSS_PREFIX, GRAD_PREFIX, GRAD_NONFINITE_PREFIX, UPDATE_RATIO_PREFIX,
                GRAD_GROUP_PREFIX)
    return column in ("time_s", "lr", "loss") or column.startswith(prefixes)


def _read_steps(run_dir: Path) -> tuple["pd.DataFrame", bool]:
    jsonl, parquet = run_dir / STEPS_FILE, run_dir / STEPS_PARQUET
    if jsonl.exists():
        rows, truncated = _read_jsonl(jsonl)
        if not rows:
            raise TraceError(
                f"{jsonl} is an empty trace: no step was recorded (the run stopped before its first "
                "logged step). Check events.jsonl for the cause and re-run."
            )
        return _steps_frame(rows, jsonl), truncated
    if parquet.exists():
        import pandas as pd

        frame = pd.read_parquet(parquet)
        if frame.empty:
            raise TraceError(f"{parquet} is an empty trace: no step was recorded. Re-run the trace.")
        return frame, False
    raise TraceError(
        f"{run_dir} is an empty trace: it has meta.json but neither {STEPS_FILE} nor {STEPS_PARQUET}. "
        "The run stopped before writing any step; check events.jsonl and re-run."
    )


def read_trace(run_dir: Path) -> Trace:
    """Load a run folder. Raises TraceError for a non-run folder, an unknown schema or an empty trace."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    steps, truncated = _read_steps(run_dir)
    events: list[dict] = []
    if (run_dir / EVENTS_FILE).exists():
        events, _ = _read_jsonl(run_dir / EVENTS_FILE)
    finding = _read_json(run_dir / FINDING_FILE)
    if finding is None:
        finding_events = [e for e in events if e.get("kind") == "finding"]
        finding = dict(finding_events[-1].get("data") or {}) if finding_events else None
    capsule_dir = run_dir / CAPSULE_DIR
    capsules = sorted(capsule_dir.glob("step_*.pt")) if capsule_dir.is_dir() else []
    return Trace(run_dir=run_dir, meta=meta, steps=steps, events=events,
                 summary=_read_json(run_dir / SUMMARY_FILE), finding=finding,
                 capsules=capsules, truncated=truncated)


def to_parquet(run_dir: Path) -> Path:
    """Convert steps.jsonl to steps.parquet (index: step) next to it; returns the Parquet path."""
    trace = read_trace(run_dir)
    target = Path(run_dir) / STEPS_PARQUET
    try:
        trace.steps.to_parquet(target)
    except ImportError as exc:
        raise TraceError(f"writing {target} needs pyarrow: pip install 'ris-diag[parquet]' ({exc})") from exc
    return target



def matrix_names(columns: Iterable[str]) -> list[str]:
    """Sorted names of the matrices with "mat/<name>/<stat>" columns (names may contain '/')."""
    names = {c[len(MAT_PREFIX):].rpartition("/")[0] for c in columns if c.startswith(MAT_PREFIX)}
    return sorted(n for n in names if n)


def matrix_stats(steps: "pd.DataFrame", name: str) -> "pd.DataFrame":
    """The stat columns of one matrix, renamed to the bare stat ("rank", "min_gap", ...)."""
    prefix = f"{MAT_PREFIX}{name}/"
    cols = [c for c in steps.columns if c.startswith(prefix) and "/" not in c[len(prefix):]]
    return steps[cols].rename(columns=lambda c: c[len(prefix):])


def loss_terms(columns: Iterable[str]) -> list[str]:
    """Names of the loss terms ("loss/<term>" columns), in column order."""
    return [c[len(LOSS_PREFIX):] for c in columns if c.startswith(LOSS_PREFIX)]


def grad_modules(columns: Iterable[str]) -> list[str]:
    """Module paths with a "grad/<module>" column, in column order, without the "_total" column."""
    return [c[len(GRAD_PREFIX):] for c in columns if c.startswith(GRAD_PREFIX) and c != GRAD_TOTAL]
