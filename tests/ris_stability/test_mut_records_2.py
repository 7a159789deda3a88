"""Run-folder records, second part: what a failing disk costs a whole run (one warning, the summary's
account), the appender's bound and recovery seen line by line, the exact edges of the reader (a line of the
largest size, the byte offset of the first damage, a blank line in the middle), the refusals' advice, and
the capsule budget at exactly its size. Through the public writer / reader / store, no training."""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from ris_stability.records import TraceError, TraceWriter, read_trace, to_parquet
from ris_stability.records import appender as appender_mod
from ris_stability.records.appender import AppendFile
from ris_stability.records.capsule import Capsule, capture_rng
from ris_stability.records.capsule_store import CapsuleStore
from ris_stability.records.reader import MAX_LINE_BYTES, read_outline
from ris_stability.records.writer import append_event

META = {"command": "test", "dtype": "float32"}
FULL = "No space left on device"


def _failing_disk(monkeypatch, state: dict) -> None:
    real = appender_mod._write

    def disk(fd, data):
        if state["fail"]:
            raise OSError(28, FULL)
        return real(fd, data)

    monkeypatch.setattr(appender_mod, "_write", disk)


def _run(tmp_path: Path, rows: list[str], name: str = "r") -> Path:
    """A run folder whose steps.jsonl holds exactly ``rows`` (raw text)."""
    with TraceWriter(tmp_path / name, META):
        pass
    (tmp_path / name / "steps.jsonl").write_text("".join(rows))
    return tmp_path / name


# --- a failing disk under a whole run ------------------------------------------------------------------------
def test_a_full_disk_warns_once_for_the_run_and_the_summary_says_what_each_file_lost(tmp_path, monkeypatch,
                                                                                    caplog) -> None:
    state = {"fail": True}
    _failing_disk(monkeypatch, state)
    heard: list = []
    with caplog.at_level(logging.WARNING):
        with TraceWriter(tmp_path / "r", META, listeners=[lambda kind, rec: heard.append((kind, rec))]) as w:
            w.step({"step": 0, "loss": 1.0})
            w.event("run_start", "info", "m")
            w.step({"step": 1, "loss": 1.0})
            w.summary({"status": "clean"})
    warned = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warned) == 1 and "steps.jsonl" in warned[0].getMessage()  # the first file the disk refused
    lost = json.loads((tmp_path / "r" / "summary.json").read_text())["not_written"]
    assert lost == {"steps.jsonl": {"error": f"OSError: {FULL}", "lines_lost": 2, "lines_dropped": 0,
                                    "lines_unwritten": 2},
                    "events.jsonl": {"error": f"OSError: {FULL}", "lines_lost": 1, "lines_dropped": 0,
                                     "lines_unwritten": 1}}
    assert heard[-1] == ("summary", {"status": "clean", "not_written": lost})


def test_a_disk_that_recovers_before_the_summary_lost_nothing(tmp_path, monkeypatch) -> None:
    state = {"fail": True}
    _failing_disk(monkeypatch, state)
    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0, "loss": 1.0})
        state["fail"] = False
        w.summary({"status": "clean"})
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["not_written"] == {"steps.jsonl": {"error": f"OSError: {FULL}", "lines_lost": 0, "recovered": True}}
    assert list(read_trace(tmp_path / "r").steps.index) == [0]


# --- the appender line by line -------------------------------------------------------------------------------
def test_the_memory_bound_holds_to_the_byte_and_counts_every_dropped_line(tmp_path, monkeypatch) -> None:
    state = {"fail": False}
    _failing_disk(monkeypatch, state)
    f = AppendFile(tmp_path / "x.jsonl", max_pending=20, on_error=lambda _: None)
    f.write("w" * 19)  # 20 bytes written while the disk works: nothing is left pending
    state["fail"] = True
    for ch in "abcd":
        f.write(ch * 9)  # 10 bytes each: two fill the 20-byte bound exactly, the next two are dropped
    assert f.losses() == {"error": f"OSError: {FULL}", "lines_lost": 4, "lines_dropped": 2, "lines_unwritten": 2}
    assert f.retry() is False  # the disk still refuses
    state["fail"] = False
    f.write("e")  # the disk is back: the kept lines and this one reach the file at once, in order
    assert (tmp_path / "x.jsonl").read_text() == "w" * 19 + "\n" + "a" * 9 + "\n" + "b" * 9 + "\ne\n"
    assert f.retry() is True
    f.close()
    assert f.retry() is True  # closed with nothing pending


def test_a_file_closed_on_a_dead_disk_still_has_its_lines_pending(tmp_path, monkeypatch) -> None:
    state = {"fail": True}
    _failing_disk(monkeypatch, state)
    f = AppendFile(tmp_path / "x.jsonl", on_error=lambda _: None)
    f.write("lost")
    f.close()
    state["fail"] = False  # the disk is back, but the file is closed: nothing more is written
    assert f.retry() is False and f.losses()["lines_unwritten"] == 1
    assert (tmp_path / "x.jsonl").read_text() == ""


# --- the writer's event lines -------------------------------------------------------------------------------
def test_event_lines_are_compact_and_an_unstorable_value_is_named_by_its_event(tmp_path, caplog) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        with caplog.at_level(logging.DEBUG, logger="ris_stability.records.writer"):
            w.event("run_start", "info", "documented", step=0, x=1)
            assert "documented kinds" not in caplog.text
            w.event("my_kind", "info", "undocumented", step=1)
            assert "event kind 'my_kind' is not one of the documented kinds" in caplog.text
    append_event(tmp_path / "r", "finding", "error", "later", step=2, op="aten.log")
    lines = (tmp_path / "r" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:  # one line per event, as compact as the step rows: `grep '"kind":"finding"'` finds it
        assert line == json.dumps(json.loads(line), separators=(",", ":"))
    assert '"kind":"finding"' in lines[2]
    with pytest.raises(TypeError, match=re.escape("trace value 'event finding.data.t'")):
        append_event(tmp_path / "r", "finding", "error", "m", t=torch.ones(2))


# --- the reader's edges --------------------------------------------------------------------------------------
def test_a_line_of_exactly_the_largest_size_is_read_and_one_byte_more_is_damage(tmp_path) -> None:
    def row(step: int, size: int) -> str:
        head = json.dumps({"step": step, "pad": ""}, separators=(",", ":"))
        return head[:-2] + "y" * (size - len(head)) + head[-2:]

    exact, over = row(1, MAX_LINE_BYTES), row(2, MAX_LINE_BYTES + 1)
    assert len(exact) == MAX_LINE_BYTES and json.loads(exact)["step"] == 1
    trace = read_trace(_run(tmp_path, ['{"step":0}\n', exact + "\n", over + "\n", '{"step":3}\n']))
    assert list(trace.steps.index) == [0, 1, 3] and trace.skipped == {"steps.jsonl": 1}


def test_damage_is_counted_line_by_line_and_the_warning_names_the_first_offset(tmp_path, caplog) -> None:
    rows = ["garbage\n", '{"step":0}\n', "\n", '{"step":1}\n', "more garbage\n", '{"step":2}\n']
    with caplog.at_level(logging.WARNING, logger="ris_stability.records.reader"):
        trace = read_trace(_run(tmp_path, rows))
    assert list(trace.steps.index) == [0, 1, 2]  # a blank line in the middle ends nothing
    assert trace.skipped == {"steps.jsonl": 2} and not trace.truncated
    assert "skipped 2 damaged line(s) (first at byte 0)" in caplog.text
    caplog.clear()
    rows = ['{"step":0}\n', "bad\n", '{"step":1}\n', "worse\n"]
    with caplog.at_level(logging.WARNING, logger="ris_stability.records.reader"):
        read_trace(_run(tmp_path, rows, "s"))
    assert f"(first at byte {len(rows[0])})" in caplog.text


def test_a_cut_last_line_followed_by_stray_whitespace_is_still_a_cut(tmp_path) -> None:
    rows = ['{"step":0}\n', '{"step":1}\n', '{"step":2,"lo', "\n  "]
    trace = read_trace(_run(tmp_path, rows))
    assert trace.truncated and list(trace.steps.index) == [0, 1] and trace.skipped == {}


def test_rows_without_an_integer_step_alone_are_counted_exactly(tmp_path) -> None:
    trace = read_trace(_run(tmp_path, ['{"step":0}\n', '{"step":"1"}\n', '{"step":1.5}\n', '{"step":2}\n']))
    assert list(trace.steps.index) == [0, 2] and trace.skipped == {"steps.jsonl": 2}


def test_columns_read_as_recorded_numbers_flags_and_text(tmp_path) -> None:
    rows = [{"step": 0, "lr": 0.1, "time_s": 1.0, "mine": 1.0, "skipped": False, "note": "a"},
            {"step": 1, "lr": "oops", "time_s": "late", "mine": "nan", "skipped": True, "note": "b"},
            {"step": 2, "lr": 0.1, "time_s": 3.0, "mine": None, "skipped": "yes", "note": "c"}]
    run = _run(tmp_path, [json.dumps(r) + "\n" for r in rows])
    with warnings.catch_warnings(action="error"):  # no deprecation of pandas on the way (an error in pandas 4)
        trace = read_trace(run)
    steps = trace.steps
    assert trace.run_dir == run and steps.index.name == "step"
    assert list(steps.columns) == ["lr", "time_s", "mine", "skipped", "note"]
    assert math.isnan(steps.loc[1, "lr"]) and math.isnan(steps.loc[1, "time_s"]) and steps.loc[2, "lr"] == 0.1
    assert trace.skipped == {"steps.jsonl:lr": 1, "steps.jsonl:time_s": 1}
    assert steps["mine"].dtype == float and steps["mine"].isna().tolist() == [False, True, True]
    assert steps["skipped"].dtype == bool and list(steps[steps["skipped"]].index) == [1]
    assert steps["note"].tolist() == ["a", "b", "c"]


def test_events_damage_is_counted_with_the_events_of_the_wrong_shape(tmp_path) -> None:
    run = _run(tmp_path, ['{"step":0}\n'])
    (run / "events.jsonl").write_text('not json\n{"kind": 3}\n{"kind": "run_start", "step": null}\n')
    trace = read_trace(run)
    assert trace.skipped == {"events.jsonl": 2} and [e["kind"] for e in trace.events] == ["run_start"]


def test_a_folder_without_events_reads_with_none(tmp_path) -> None:
    run = _run(tmp_path, ['{"step":0}\n'])
    (run / "events.jsonl").unlink()
    trace = read_trace(run)
    assert trace.events == [] and trace.finding is None
    meta, events, summary = read_outline(run)
    assert meta["command"] == "test" and events == [] and summary is None


def test_refusals_say_what_to_do(tmp_path) -> None:
    run = _run(tmp_path, [])
    with pytest.raises(TraceError, match=re.escape("logged step). Check events.jsonl for the cause and re-run.") + "$"):
        read_trace(run)
    (run / "steps.jsonl").unlink()
    with pytest.raises(TraceError,
                       match=re.escape("The run stopped before writing any step; check events.jsonl and re-run.") + "$"):
        read_trace(run)
    (run / "steps.jsonl").mkdir()  # not a file: unreadable
    with pytest.raises(TraceError, match=r"cannot read .*steps\.jsonl"):
        read_trace(run)
    (run / "meta.json").write_text(json.dumps({"schema": "risdiag-trace", "version": 9}))
    with pytest.raises(TraceError, match=re.escape("or read it with the ris-diag release that wrote it.") + "$"):
        read_trace(run)
    (run / "meta.json").unlink()
    with pytest.raises(TraceError,
                       match=re.escape("`risdiag trace --out DIR` (it holds meta.json and steps.jsonl).") + "$"):
        read_trace(run)


def test_a_parquet_trace_is_never_truncated_and_an_empty_one_is_refused(tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="steps.parquet needs the optional extra ris-diag[parquet]")
    run = _run(tmp_path, ['{"step":0,"loss":1.0}\n', '{"step":1,"loss":2.0}\n', '{"step":2,"lo'])
    assert read_trace(run).truncated
    to_parquet(run)
    (run / "steps.jsonl").unlink()
    trace = read_trace(run)
    assert not trace.truncated and trace.steps["loss"].tolist() == [1.0, 2.0]
    trace.steps.iloc[0:0].to_parquet(run / "steps.parquet")
    with pytest.raises(TraceError, match=re.escape("steps.parquet is an empty trace: no step was recorded. Re-run")):
        read_trace(run)


# --- the capsule budget at its edges ---------------------------------------------------------------------------
def _capsule(step: int) -> Capsule:
    return Capsule(step=step, batch={"x": torch.ones(2)}, model_state={"w": torch.full((50,), float(step))},
                   optimizer_state=None, rng=capture_rng())


def test_capsules_exactly_at_the_byte_budget_all_stay(tmp_path) -> None:
    free = CapsuleStore(tmp_path / "a", max_count=10, max_bytes=1 << 40)
    for step in range(3):
        free.write(_capsule(step))
    exact = CapsuleStore(tmp_path / "b", max_count=10, max_bytes=free.bytes)
    for step in range(3):
        exact.write(_capsule(step))
    assert exact.bytes == free.bytes and len(exact.kept) == 3 and exact.dropped == []
    exact.write(_capsule(3))  # one more is over: the oldest between first and latest goes
    assert exact.dropped == [1]


def test_a_capsule_deleted_by_hand_is_no_error_when_the_budget_drops_it(tmp_path) -> None:
    store = CapsuleStore(tmp_path, max_count=3)
    state_dir = tmp_path / "capsules" / "state"
    store.write(_capsule(0))
    first = set(state_dir.iterdir())
    middle, _ = store.write(_capsule(1))
    for path in (middle, *(set(state_dir.iterdir()) - first)):
        path.unlink()  # the user cleared some space: the capsule of step 1 and its own state file
    store.write(_capsule(2))
    _, removed = store.write(_capsule(3))
    assert removed == [middle] and store.dropped == [1]
    assert [p.name for p in store.kept] == ["step_000000.pt", "step_000002.pt", "step_000003.pt"]
