"""Everything a monitored run keeps on disk (trace format v1): the format, the writer, the tolerant reader.

Parts: ``schema`` (file names, column families, errors), ``writer`` (TraceWriter, atomic JSON),
``reader`` (read_trace, Trace, to_parquet), all importable from ``ris_stability.records``; and, imported
from their modules: ``capsule`` (one step saved for replay), ``shards`` (a data-parallel run folder's
per-rank shards and the waits on them), ``listeners`` (the run observers a command installs, e.g. sinks).
"""

from ris_stability.records.reader import (Trace, list_capsules, read_finding, read_meta, read_summary, read_trace,
                                          to_parquet)
from ris_stability.records.schema import (BOOL_COLUMNS, CAPSULE_DIR, EVENT_KINDS, EVENTS_FILE, FINDING_FILE,
                                          GRAD_GROUP_PREFIX, GRAD_NONFINITE_PREFIX, GRAD_PREFIX, GRAD_TOTAL,
                                          LOSS_PREFIX, MAT_PREFIX, META_FILE, SCHEMA_NAME, SCHEMA_VERSION,
                                          SEVERITIES, STEPS_FILE, STEPS_PARQUET, SUMMARY_FILE, SettingError,
                                          UPDATE_RATIO_PREFIX, TraceError, UsageError, grad_modules, loss_terms,
                                          matrix_names, matrix_stats)
from ris_stability.records.writer import TraceWriter, write_finding, write_json_atomic

__all__ = ["BOOL_COLUMNS", "CAPSULE_DIR", "EVENT_KINDS", "EVENTS_FILE", "FINDING_FILE", "GRAD_GROUP_PREFIX",
           "GRAD_NONFINITE_PREFIX", "GRAD_PREFIX", "GRAD_TOTAL", "LOSS_PREFIX", "MAT_PREFIX", "META_FILE",
           "SCHEMA_NAME", "SCHEMA_VERSION", "SEVERITIES", "STEPS_FILE", "SettingError", "STEPS_PARQUET", "SUMMARY_FILE",
           "Trace", "TraceError", "TraceWriter", "UPDATE_RATIO_PREFIX", "UsageError", "grad_modules",
           "list_capsules", "loss_terms", "matrix_names", "matrix_stats", "read_finding", "read_meta", "read_summary", "read_trace", "to_parquet",
           "write_finding", "write_json_atomic"]
