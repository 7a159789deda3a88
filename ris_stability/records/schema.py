"""Trace format v1: file names, schema id, column families, event kinds, and the trace errors.

A run folder holds meta.json, steps.jsonl (one flat JSON object per logged step), events.jsonl,
optional summary.json / finding.json / capsules/. In steps.jsonl a non-finite float is the string "nan",
"inf" or "-inf" and null means "not recorded"; the other JSON files write non-finite floats as null. Step columns are grouped by prefix: "mat/<name>/<stat>",
"loss/<term>", "grad/<module>", "grad_nonfinite/<module>", "update_ratio/<module>", "grad_group/<g>",
"update_ratio_group/<g>", "param/<module>" (parameter norms before the update).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pandas is heavy and only needed by readers
    import pandas as pd

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
    "finding", "finding_elsewhere", "no_process_group", "gradient_spike", "precision_audit", "eig_hermitian_input", "eig_backward_rounding", "pinv_cutoff",
    "locate_diverged", "capsule_dropped",
    "gradient_explosion", "explosion_origin",
    "instrument_error", "capsule_not_written",
)
# steps.jsonl stores non-finite floats as these strings (JSON has no NaN/inf literals); null means "not
# recorded". The reader turns them back into floats, so NaN (a poisoned value), +inf (e.g. a singular
# matrix, an exact tie's infinite amplification) and -inf stay apart.
NONFINITE_TEXT = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

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


class SettingError(UsageError, ValueError):
    """An invalid setting of a config object (MonitorConfig, SpectralProbe, ...). A ValueError for API
    callers; a UsageError, so the CLI exits 2 with one line for any option that feeds such an object."""


class TraceError(UsageError):
    """A run folder or one of its trace files cannot be read or written."""


class EmptyTraceError(TraceError):
    """A run folder whose run stopped before its first logged step: meta.json and events, no step rows."""


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
