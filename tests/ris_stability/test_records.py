import json
import math

import numpy as np
import pandas as pd
import pytest

from ris_stability import records
from ris_stability.records import (
    SCHEMA_VERSION, Trace, TraceError, TraceWriter, UsageError, grad_modules, loss_terms,
    matrix_names, matrix_stats, read_trace, to_parquet, write_finding,
)
from tests.ris_stability.trace_factory import (
    DEFAULT_META, make_run, make_seed_nan_like, set_meta, truncate_trace,
)


def test_writer_keeps_nan_inf_and_minus_inf_apart(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        w.step({"step": 0, "loss": float("nan"), "loss/a": float("inf"), "loss/b": -float("inf"),
                "mat/R/cond": np.float32("inf"), "mat/R/rank": np.int64(7), "mat/R/amplification": None,
                "grad_group/0": float("-inf"), "skipped": False})
        w.step({"step": 1, "loss": 2.5, "loss/a": 1.0, "loss/b": 3.0, "mat/R/cond": 4.0,
                "mat/R/rank": 8, "mat/R/amplification": 2.0, "grad_group/0": 1.0, "skipped": True})
    raw = (tmp_path / "run" / records.STEPS_FILE).read_text().splitlines()
    first = json.loads(raw[0])
    assert (first["loss"], first["loss/a"], first["loss/b"], first["mat/R/cond"]) == ("nan", "inf", "-inf", "inf")
    assert first["mat/R/amplification"] is None  # not recorded, which is not NaN
    assert first["mat/R/rank"] == 7 and "time_s" in first
    trace = read_trace(tmp_path / "run")
    assert isinstance(trace, Trace)
    assert list(trace.steps.index) == [0, 1] and trace.steps.index.name == "step"
    row = trace.steps.loc[0]
    assert math.isnan(row["loss"]) and row["loss/a"] == math.inf and row["loss/b"] == -math.inf
    assert row["mat/R/cond"] == math.inf and row["grad_group/0"] == -math.inf
    assert math.isnan(row["mat/R/amplification"])
    assert trace.steps.loc[1, "loss"] == 2.5 and trace.steps.loc[1, "mat/R/cond"] == 4.0
    assert trace.steps["skipped"].tolist() == [False, True]
    assert trace.steps["loss/a"].dtype == float and trace.steps["grad_group/0"].dtype == float
    assert trace.meta["version"] == SCHEMA_VERSION and trace.meta["dtype"] == "complex64"
    assert trace.summary is None and trace.truncated is False


def test_events_summary_finding_capsules(tmp_path):
    run = make_seed_nan_like(tmp_path / "run")
    write_finding(run, {"step": 3, "op": "aten::linalg_eigh", "verdict": "float64 finite"})
    trace = read_trace(run)
    kinds = [e["kind"] for e in trace.events]
    assert kinds[0] == "run_start" and "nonfinite_loss" in kinds and kinds[-1] == "run_end"
    tied = next(e for e in trace.events if e["kind"] == "tied_eigenvalues")
    assert tied["data"]["max_cluster"] == 118 and tied["severity"] == "warning" and tied["step"] == 0
    assert trace.summary["status"] == "nonfinite" and trace.summary["nonfinite_steps"] == [3]
    assert trace.finding["op"] == "aten::linalg_eigh"
    assert [p.name for p in trace.capsules] == ["step_000003.pt"]
    assert trace.nonfinite_steps == [3] and trace.skipped_steps == [3]


def test_finding_from_event_when_no_file(tmp_path):
    with TraceWriter(tmp_path / "r", DEFAULT_META) as w:
        w.step({"step": 0, "loss": 1.0})
        w.event("finding", "error", "first bad op", step=0, op="aten::linalg_eigh", step_index=0)
    assert read_trace(tmp_path / "r").finding == {"op": "aten::linalg_eigh", "step_index": 0}


def test_truncated_last_line_is_dropped(tmp_path):
    run = make_run(tmp_path / "run", n_steps=6)
    truncate_trace(run)
    trace = read_trace(run)
    assert trace.truncated is True and list(trace.steps.index) == [0, 1, 2, 3, 4]
    assert trace.summary is None


def test_corrupt_middle_line_is_skipped_and_counted(tmp_path, caplog):
    """Issue #30: a damaged line in the middle is left out, counted, and named by its byte offset."""
    run = make_run(tmp_path / "run", n_steps=4)
    path = run / records.STEPS_FILE
    lines = path.read_text().splitlines()
    offset = len(lines[0]) + 1
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    trace = read_trace(run)
    assert list(trace.steps.index) == [0, 2, 3] and trace.skipped == {"steps.jsonl": 1}
    assert f"first at byte {offset}" in caplog.text


def test_string_in_numeric_column_reads_as_not_recorded(tmp_path):
    trace = read_trace(_string_in_numeric_column(tmp_path))
    assert math.isnan(trace.steps.loc[0, "mat/R/cond"]) and trace.skipped == {"steps.jsonl:mat/R/cond": 1}


def _not_a_dir(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    return path


def _no_meta(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"step": 0}\n')
    return tmp_path


def _future_version(tmp_path):
    run = make_run(tmp_path / "run", n_steps=2)
    set_meta(run, version=99)
    return run


def _other_schema(tmp_path):
    run = make_run(tmp_path / "run", n_steps=2)
    set_meta(run, schema="something-else")
    return run


def _empty_steps(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        w.event("run_start", "info", "started")
    return tmp_path / "run"


def _no_steps_file(tmp_path):
    run = make_run(tmp_path / "run", n_steps=2)
    (run / records.STEPS_FILE).unlink()
    return run


def _bad_meta_json(tmp_path):
    run = make_run(tmp_path / "run", n_steps=2)
    (run / records.META_FILE).write_text("{not json")
    return run


def _string_in_numeric_column(tmp_path):
    run = tmp_path / "run"
    with TraceWriter(run, DEFAULT_META) as w:
        w.step({"step": 0, "mat/R/cond": "infinite"})
    return run


@pytest.mark.parametrize("make_input, message", [
    pytest.param(lambda p: p / "missing", "not a run folder", id="missing-folder"),
    pytest.param(_not_a_dir, "not a run folder", id="file-not-folder"),
    pytest.param(_no_meta, "no meta.json", id="folder-without-meta"),
    pytest.param(_future_version, "unknown trace schema .* version 99", id="unknown-version"),
    pytest.param(_other_schema, "unknown trace schema 'something-else'", id="unknown-schema"),
    pytest.param(_empty_steps, "empty trace", id="empty-steps-file"),
    pytest.param(_no_steps_file, "empty trace", id="no-steps-file"),
    pytest.param(_bad_meta_json, "meta.json", id="corrupt-meta"),
])
def test_bad_input_raises_trace_error(tmp_path, make_input, message):
    path = make_input(tmp_path)
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert isinstance(info.value, UsageError)
    assert str(path) in str(info.value) or path.name in str(info.value)


def test_writer_refuses_existing_run_and_unwritable_dir(tmp_path):
    make_run(tmp_path / "run", n_steps=1)
    with pytest.raises(TraceError, match="already holds a trace"):
        TraceWriter(tmp_path / "run", DEFAULT_META)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(TraceError, match="cannot create the run folder"):
        TraceWriter(blocker / "run", DEFAULT_META)


@pytest.mark.parametrize("call, error", [
    pytest.param(lambda w: w.step({"loss": 1.0}), ValueError, id="step-without-step"),
    pytest.param(lambda w: w.step({"step": True}), ValueError, id="bool-step"),
    pytest.param(lambda w: w.step({"step": 0, "x": object()}), TypeError, id="unstorable-value"),
    pytest.param(lambda w: w.event("nonfinite_loss", "fatal", "m"), ValueError, id="bad-severity"),
])
def test_writer_rejects_malformed_rows(tmp_path, call, error):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        with pytest.raises(error):
            call(w)


def test_write_after_close_raises(tmp_path):
    w = TraceWriter(tmp_path / "run", DEFAULT_META)
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.step({"step": 0})


def test_each_step_is_on_disk_before_close(tmp_path):
    w = TraceWriter(tmp_path / "run", DEFAULT_META, fsync=True)
    w.step({"step": 0, "loss": 1.0})
    w.step({"step": 1, "loss": 0.5})
    trace = read_trace(tmp_path / "run")  # a second reader sees both rows while the writer is open
    assert trace.steps["loss"].tolist() == [1.0, 0.5]
    w.close()


def test_column_helpers(tmp_path):
    run = make_seed_nan_like(tmp_path / "run")
    trace = read_trace(run)
    assert matrix_names(trace.steps.columns) == ["R_blend", "R_pred", "loss.subspace:linalg.eigh"]
    assert trace.matrices == matrix_names(trace.steps.columns)
    assert loss_terms(trace.steps.columns) == ["cov_nmse", "subspace", "orth", "k_ce"]
    assert grad_modules(trace.steps.columns) == ["encoder", "heads.angle", "heads.range", "heads.k"]
    stats = matrix_stats(trace.steps, "R_blend")
    assert stats["max_cluster"].tolist() == [118] * 10 and stats["min_gap_noise"].eq(0).all()
    assert (matrix_stats(trace.steps, "R_pred")["log10_cond"] == math.inf).all()  # singular: +inf, not missing


def test_matrix_names_with_slashes():
    cols = ["mat/a/rank", "mat/a/b/rank", "mat/a/b/cond", "loss", "grad/_total", "grad/x"]
    assert matrix_names(cols) == ["a", "a/b"]
    frame = pd.DataFrame({c: [1.0] for c in cols})
    assert list(matrix_stats(frame, "a").columns) == ["rank"]
    assert grad_modules(cols) == ["x"]


def test_to_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow", reason="steps.parquet needs the optional extra ris-diag[parquet]")
    run = make_seed_nan_like(tmp_path / "run")
    path = to_parquet(run)
    assert path == run / "steps.parquet"
    back = pd.read_parquet(path)
    original = read_trace(run).steps
    pd.testing.assert_frame_equal(back, original)
    (run / records.STEPS_FILE).unlink()
    from_parquet = read_trace(run)  # the reader falls back to the Parquet table
    assert math.isnan(from_parquet.steps.loc[3, "loss"]) and len(from_parquet.steps) == 10
    # the singular matrix's cond and an exact tie's amplification stay +inf, not "not recorded"
    assert (from_parquet.steps["mat/R_pred/cond"] == math.inf).all()
    assert (from_parquet.steps["mat/R_blend/amplification"] == math.inf).all()


def test_to_parquet_keeps_minus_inf(tmp_path):
    pytest.importorskip("pyarrow", reason="steps.parquet needs the optional extra ris-diag[parquet]")
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        w.step({"step": 0, "loss": -math.inf, "loss/a": math.inf, "loss/b": math.nan})
    steps = pd.read_parquet(to_parquet(tmp_path / "run"))
    assert steps.loc[0, "loss"] == -math.inf and steps.loc[0, "loss/a"] == math.inf
    assert math.isnan(steps.loc[0, "loss/b"])


def test_to_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", n_steps=2)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda *a, **k: (_ for _ in ()).throw(ImportError("pyarrow")))
    with pytest.raises(TraceError, match=r"ris-diag\[parquet\]"):
        to_parquet(run)


def test_extra_numeric_columns_read_as_float(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        w.step({"step": 0, "grad_group/0": None, "note": "warm-up", "custom": None})
        w.step({"step": 1, "grad_group/0": 2.0, "note": "main", "custom": 3})
    steps = read_trace(tmp_path / "run").steps
    assert steps["grad_group/0"].dtype == float and math.isnan(steps.loc[0, "grad_group/0"])
    assert steps["custom"].tolist()[1] == 3.0 and steps["note"].tolist() == ["warm-up", "main"]
