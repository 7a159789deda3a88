"""Tolerant reader of a run folder and the Parquet converter (pandas is imported here only).

The reader drops a truncated last line of steps.jsonl (a run killed mid-write), turns the strings
"nan"/"inf"/"-inf" back into floats and reads null ("not recorded") as NaN. A damaged folder (garbage bytes,
a cut or enormous line in the middle, values of the wrong type, a damaged summary.json) is read for what is
sound, what was skipped counted in ``Trace.skipped`` with one warning per file (naming the byte offset); a
folder with nothing sound (no meta.json, no step row) is refused with one line naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ris_stability.records.atomic import atomic_path
from ris_stability.records.capsule_writer import wait_all
from ris_stability.records.schema import (BOOL_COLUMNS, CAPSULE_DIR, EVENTS_FILE, FINDING_FILE, GRAD_GROUP_PREFIX,
                                          GRAD_NONFINITE_PREFIX, GRAD_PREFIX, LOSS_PREFIX, MAT_PREFIX, META_FILE,
                                          NONFINITE_TEXT,
                                          SCHEMA_NAME, SCHEMA_VERSION, STEPS_FILE, STEPS_PARQUET, SUMMARY_FILE,
                                          UPDATE_RATIO_PREFIX, EmptyTraceError, TraceError, grad_modules, loss_terms,
                                          matrix_names)

if TYPE_CHECKING:  # pandas is heavy and only needed by readers
    import pandas as pd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trace:
    """Everything a run folder recorded. `steps` is indexed by step; NaN where the trace had "nan" or
    null (not recorded), +-inf where it had "inf"/"-inf"."""

    run_dir: Path
    meta: dict
    steps: "pd.DataFrame"
    events: list[dict] = field(default_factory=list)
    summary: dict | None = None
    finding: dict | None = None
    capsules: list[Path] = field(default_factory=list)
    truncated: bool = False  # the last line of steps.jsonl was cut mid-write and dropped
    skipped: dict[str, int] = field(default_factory=dict)  # damaged lines / values / files left out, per file

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


MAX_LINE_BYTES = 8 << 20  # a record line longer than this is damage (a real row is a few kB), skipped unparsed


def _read_jsonl(path: Path, skipped: dict[str, int] | None = None) -> tuple[list[dict], bool]:
    """Rows of a JSONL file: a cut last line is dropped (truncated=True); a damaged line elsewhere (garbage,
    not UTF-8, not a JSON object, enormous) is skipped and counted in ``skipped[file name]``, with one warning
    naming the file and the byte offset of the first one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from exc
    rows: list[dict] = []
    truncated, bad, first_bad = False, 0, -1
    offset = 0
    lines = data.split(b"\n")
    last = len(lines) - 1 if lines and lines[-1].strip() else len(lines) - 2  # the last non-empty line's index
    for index, raw in enumerate(lines):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        row = _parse(raw)
        if row is None:
            if index == last and not data.endswith(b"\n"):  # cut mid-write by a kill: expected, not damage
                logger.warning("%s: last line is incomplete (the run was killed mid-write); dropped it", path)
                truncated = True
                continue
            bad += 1
            first_bad = start if first_bad < 0 else first_bad
            continue
        rows.append(row)
    if bad:
        logger.warning("%s: skipped %d damaged line(s) (first at byte %d); read the %d sound ones", path, bad,
                       first_bad, len(rows))
        if skipped is not None:
            skipped[path.name] = skipped.get(path.name, 0) + bad
    return rows, truncated


def _parse(raw: bytes) -> dict | None:
    """One record line as a JSON object, or None when it is damage."""
    if len(raw) > MAX_LINE_BYTES:
        return None
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TraceError(f"cannot read {path}: {exc}. The file is damaged; delete it or re-run.") from exc
    if not isinstance(value, dict):
        raise TraceError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def _read_optional(path: Path, skipped: dict[str, int]) -> dict | None:
    """summary.json / finding.json: a damaged one is skipped (counted, one warning), the trace still reads."""
    try:
        return _read_json(path)
    except TraceError as err:
        logger.warning("%s; read the run without it", str(err).splitlines()[0])
        skipped[path.name] = 1
        return None


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


def _steps_frame(rows: list[dict], source: Path, skipped: dict[str, int] | None = None) -> "pd.DataFrame":
    import pandas as pd

    sound = [row for row in rows if type(row.get("step")) is int and row["step"] >= 0]
    if len(sound) < len(rows):
        logger.warning("%s: skipped %d row(s) without an integer step", source, len(rows) - len(sound))
        if skipped is not None:
            skipped[source.name] = skipped.get(source.name, 0) + len(rows) - len(sound)
    if not sound:
        raise TraceError(f"{source}: no row has an integer 'step' key; the file was not written by TraceWriter")
    frame = pd.DataFrame.from_records(sound)
    for column in frame.columns:
        if column in BOOL_COLUMNS:
            flags = frame[column].map(lambda v: v if isinstance(v, bool) else None)  # damage reads as unset
            frame[column] = flags.astype("boolean").fillna(False).astype(bool)
        elif column != "step" and (_is_numeric_column(column) or _all_numbers(frame[column])):
            frame[column] = _numeric(frame[column], column, source, skipped)
    frame["step"] = frame["step"].astype(int)
    if frame["step"].duplicated().any():
        dups = sorted(set(frame.loc[frame["step"].duplicated(), "step"].tolist()))
        logger.warning("%s: steps %s logged twice; keeping the last row of each", source, dups[:10])
        frame = frame.drop_duplicates("step", keep="last")
    return frame.set_index("step").sort_index()


def _numeric(series: "pd.Series", column: str, source: Path, skipped: dict[str, int] | None = None) -> "pd.Series":
    """Float column; null -> NaN, "nan"/"inf"/"-inf" -> the float, bool -> 0/1. Any other value is damage: read
    as not recorded (NaN, as null) and counted, with one warning naming the column and the first row."""
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(series):
        bad = series[series.map(lambda v: not _is_number(v))]
        if len(bad):
            logger.warning("%s: column %r holds %d non-number(s) (e.g. %r at step row %s); read as not recorded",
                           source, column, len(bad), str(bad.iloc[0])[:40], bad.index[0])
            if skipped is not None:
                skipped[f"{source.name}:{column}"] = len(bad)
        series = series.map(lambda v: NONFINITE_TEXT[v] if isinstance(v, str) and v in NONFINITE_TEXT
                            else v if _is_number(v) else None)
    return series.astype(float)


def _is_number(value: object) -> bool:
    return value is None or isinstance(value, (int, float)) or (isinstance(value, str) and value in NONFINITE_TEXT)


def _all_numbers(series: "pd.Series") -> bool:
    """An extra column (e.g. "grad_group/<g>") whose values are numbers, non-finite strings or null reads
    as float too."""
    return bool(series.map(_is_number).all())


def _is_numeric_column(column: str) -> bool:
    prefixes = (MAT_PREFIX, LOSS_PREFIX, GRAD_PREFIX, GRAD_NONFINITE_PREFIX, UPDATE_RATIO_PREFIX,
                GRAD_GROUP_PREFIX)
    return column in ("time_s", "lr", "loss") or column.startswith(prefixes)


def _read_steps(run_dir: Path, skipped: dict[str, int] | None = None) -> tuple["pd.DataFrame", bool]:
    jsonl, parquet = run_dir / STEPS_FILE, run_dir / STEPS_PARQUET
    if jsonl.exists():
        rows, truncated = _read_jsonl(jsonl, skipped)
        if not rows:
            raise EmptyTraceError(
                f"{jsonl} is an empty trace: no step was recorded (the run stopped before its first "
                "logged step). Check events.jsonl for the cause and re-run."
            )
        return _steps_frame(rows, jsonl, skipped), truncated
    if parquet.exists():
        import pandas as pd

        frame = pd.read_parquet(parquet)
        if frame.empty:
            raise EmptyTraceError(f"{parquet} is an empty trace: no step was recorded. Re-run the trace.")
        return frame, False
    raise EmptyTraceError(
        f"{run_dir} is an empty trace: it has meta.json but neither {STEPS_FILE} nor {STEPS_PARQUET}. "
        "The run stopped before writing any step; check events.jsonl and re-run."
    )


def read_trace(run_dir: Path) -> Trace:
    """Load a run folder. Raises TraceError for a non-run folder, an unknown schema or an empty trace."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    skipped: dict[str, int] = {}
    steps, truncated = _read_steps(run_dir, skipped)
    events: list[dict] = []
    if (run_dir / EVENTS_FILE).exists():
        events, _ = _read_jsonl(run_dir / EVENTS_FILE, skipped)
        sound = [e for e in events if isinstance(e.get("kind"), str) and isinstance(e.get("data", {}), dict)
                 and (e.get("step") is None or type(e.get("step")) is int)]
        if len(sound) < len(events):
            logger.warning("%s: skipped %d event(s) of the wrong shape", run_dir / EVENTS_FILE, len(events) - len(sound))
            skipped[EVENTS_FILE] = skipped.get(EVENTS_FILE, 0) + len(events) - len(sound)
        events = sound
    finding = _read_optional(run_dir / FINDING_FILE, skipped)
    if finding is None:
        finding_events = [e for e in events if e.get("kind") == "finding"]
        finding = dict(finding_events[-1].get("data") or {}) if finding_events else None
    return Trace(run_dir=run_dir, meta=meta, steps=steps, events=events,
                 summary=_read_optional(run_dir / SUMMARY_FILE, skipped), finding=finding,
                 capsules=list_capsules(run_dir), truncated=truncated, skipped=skipped)


def read_finding(run_dir: Path) -> dict | None:
    """The run folder's finding.json (None when it has none)."""
    return _read_json(Path(run_dir) / FINDING_FILE)


def read_summary(run_dir: Path) -> dict | None:
    """The run folder's summary.json (None while the run has not ended)."""
    return _read_json(Path(run_dir) / SUMMARY_FILE)


def list_capsules(run_dir: Path) -> list[Path]:
    """The run folder's capsules, in step order (those this process is still writing: once on disk)."""
    wait_all()
    capsule_dir = Path(run_dir) / CAPSULE_DIR
    return sorted(capsule_dir.glob("step_*.pt")) if capsule_dir.is_dir() else []


def to_parquet(run_dir: Path) -> Path:
    """Convert steps.jsonl to steps.parquet (index: step) next to it; returns the Parquet path."""
    trace = read_trace(run_dir)
    target = Path(run_dir) / STEPS_PARQUET
    try:
        with atomic_path(target) as tmp:  # a kill mid-conversion leaves no half Parquet file that reads as the trace
            trace.steps.to_parquet(tmp)
    except ImportError as exc:
        raise TraceError(f"writing {target} needs pyarrow: pip install 'ris-diag[parquet]' ({exc})") from exc
    return target


def read_outline(run_dir: Path) -> tuple[dict, list[dict], dict | None]:
    """meta.json, the sound events and summary.json of a run folder, whether or not it recorded a step."""
    run_dir = Path(run_dir)
    skipped: dict[str, int] = {}
    events = _read_jsonl(run_dir / EVENTS_FILE, skipped)[0] if (run_dir / EVENTS_FILE).exists() else []
    events = [e for e in events if isinstance(e.get("kind"), str)]
    return read_meta(run_dir), events, _read_optional(run_dir / SUMMARY_FILE, skipped)
