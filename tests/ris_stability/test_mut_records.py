"""Run-folder records, checked by what a reader of the folder sees: which row of a step wins, what the JSON
files hold for a non-finite value, what a damaged line costs, which capsules survive the budget, and what a
failing disk loses. Through the public writer / reader / store, no training."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from ris_stability.records import TraceError, TraceWriter, read_trace
from ris_stability.records import appender as appender_mod
from ris_stability.records.appender import AppendFile
from ris_stability.records.capsule import Capsule, capture_rng
from ris_stability.records.capsule_store import CapsuleStore
from ris_stability.records.reader import list_capsules, read_finding, read_outline, read_summary
from ris_stability.records.writer import append_event, write_finding, write_json_atomic

META = {"command": "test", "dtype": "float32"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_step_logged_twice_reads_as_its_last_row(tmp_path: Path, caplog) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        for step, loss in ((0, 1.0), (1, 2.0), (1, 3.0), (2, 4.0), (1, 5.0)):
            w.step({"step": step, "loss": loss})
    with caplog.at_level(logging.WARNING, logger="ris_stability.records.reader"):
        trace = read_trace(tmp_path / "r")
    assert list(trace.steps.index) == [0, 1, 2]  # sorted by step
    assert trace.steps["loss"].tolist() == [1.0, 5.0, 4.0]
    assert "steps [1] logged twice; keeping the last row of each" in caplog.text


def test_events_and_json_files_store_nonfinite_values_as_json_null(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0, "loss": math.nan, "grad/_total": math.inf, "lr": -math.inf})
        w.event("nonfinite_loss", "error", "loss is nan", step=0, loss=math.nan, norms=[1.0, math.inf],
                where={"max": -math.inf})
        w.summary({"status": "nonfinite", "final_loss": math.nan, "best": [math.inf]})
    raw_event = (tmp_path / "r" / "events.jsonl").read_text()
    assert "NaN" not in raw_event and "Infinity" not in raw_event and '"nan"' not in raw_event
    (event,) = _lines(tmp_path / "r" / "events.jsonl")
    assert event["data"] == {"loss": None, "norms": [1.0, None], "where": {"max": None}}
    assert event["step"] == 0 and event["kind"] == "nonfinite_loss" and event["severity"] == "error"
    assert event["message"] == "loss is nan" and isinstance(event["time_s"], float)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary == {"status": "nonfinite", "final_loss": None, "best": [None]}
    (row,) = _lines(tmp_path / "r" / "steps.jsonl")  # step rows keep NaN and +-inf apart, as strings
    assert (row["loss"], row["grad/_total"], row["lr"]) == ("nan", "inf", "-inf")
    trace = read_trace(tmp_path / "r")
    assert trace.events[0]["data"]["loss"] is None and trace.summary["final_loss"] is None


def test_values_of_other_types_are_stored_plainly_or_refused(tmp_path: Path) -> None:
    import numpy as np

    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0, "n": np.int64(3), "x": np.float32(0.5), "flag": True, "path": Path("a/b"),
                "pair": (1, math.nan), "none": None})
        w.event("finding", "info", 42, step=None, path=Path("x.py"), count=np.int32(2), ok=False)
        with pytest.raises(TypeError, match=r"trace value 'obj' has type object"):
            w.step({"step": 1, "obj": object()})
        with pytest.raises(TypeError, match=r"event finding"):
            w.event("finding", "info", "m", t=torch.ones(2))
    (row,) = _lines(tmp_path / "r" / "steps.jsonl")
    assert row["n"] == 3 and row["x"] == 0.5 and row["flag"] is True and row["path"] == "a/b"
    assert row["pair"] == [1, "nan"] and row["none"] is None
    (event,) = _lines(tmp_path / "r" / "events.jsonl")
    assert event["message"] == "42" and event["step"] is None
    assert event["data"] == {"path": "x.py", "count": 2, "ok": False}


@pytest.mark.parametrize("kind, severity, error", [("finding", "fatal", "severity must be one of"),
                                                   ("", "info", "kind must be a non-empty string")])
def test_writer_refuses_bad_events(tmp_path: Path, kind, severity, error) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        with pytest.raises(ValueError, match=error):
            w.event(kind, severity, "m")
        with pytest.raises(ValueError, match="integer 'step'"):
            w.step({"step": True})
        w.event("my_own_kind", "info", "undocumented kinds are written")
    assert _lines(tmp_path / "r" / "events.jsonl")[0]["kind"] == "my_own_kind"


def test_meta_and_listeners_see_each_record_in_order(tmp_path: Path) -> None:
    heard: list = []
    with TraceWriter(tmp_path / "r", {"command": "c", "schema": "mine", "created": "then"},
                     listeners=[lambda kind, rec: heard.append((kind, dict(rec)))]) as w:
        w.step({"step": 0, "loss": 1.0, "time_s": 9.0})
        w.event("finding", "warning", "m", step=0)
        w.summary({"status": "clean"})
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["schema"] == "risdiag-trace" and meta["version"] == 1 and meta["created"] == "then"
    assert [k for k, _ in heard] == ["step", "event", "summary"]
    assert heard[0][1] == {"step": 0, "loss": 1.0, "time_s": 9.0}
    assert heard[1][1]["kind"] == "finding" and heard[2][1] == {"status": "clean"}
    w.close()  # a second close is harmless


def test_append_event_finding_and_atomic_json(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0})
    append_event(tmp_path / "r", "finding", "error", "aten.log made the NaN", step=4, op="aten.log", score=math.nan)
    (event,) = _lines(tmp_path / "r" / "events.jsonl")
    assert event == {"step": 4, "time_s": None, "kind": "finding", "severity": "error",
                     "message": "aten.log made the NaN", "data": {"op": "aten.log", "score": None}}
    with pytest.raises(ValueError, match="severity"):
        append_event(tmp_path / "r", "finding", "bad", "m")
    write_finding(tmp_path / "r", {"op": "aten.log", "value": math.inf})
    assert read_finding(tmp_path / "r") == {"op": "aten.log", "value": None}
    assert read_summary(tmp_path / "r") is None and read_trace(tmp_path / "r").finding["op"] == "aten.log"
    with pytest.raises(TraceError, match="cannot write"):
        write_json_atomic(tmp_path / "missing" / "x.json", {})


def test_reader_skips_damage_counts_it_and_keeps_the_sound_rest(tmp_path: Path, caplog) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        for step in range(3):
            w.step({"step": step, "loss": float(step), "note": "n", "grad_group/g": 1.0})
        w.event("finding", "info", "ok", step=1, op="x")
        w.summary({"status": "clean", "nonfinite_steps": [7], "skipped_steps": [2]})
    steps = tmp_path / "r" / "steps.jsonl"
    text = steps.read_text()
    steps.write_text(text + '[1, 2]\n{"step": -1}\n{"step": "4"}\n{"step": 5, "loss": "many", "skipped": 1}\n')
    events = tmp_path / "r" / "events.jsonl"
    events.write_text(events.read_text() + '{"kind": 3}\n{"kind": "k", "step": "2"}\n{"kind": "k", "data": [1]}\n'
                      '{"kind": "run_end", "step": null}\n')
    with caplog.at_level(logging.WARNING):
        trace = read_trace(tmp_path / "r")
    assert list(trace.steps.index) == [0, 1, 2, 5]
    assert math.isnan(trace.steps.loc[5, "loss"]) and trace.steps.loc[2, "loss"] == 2.0
    assert trace.steps["skipped"].tolist() == [False, False, False, False]  # 1 is not a flag: unset
    assert trace.steps["grad_group/g"].dtype == float and trace.steps["note"].tolist()[0] == "n"
    assert trace.skipped == {"steps.jsonl": 3, "steps.jsonl:loss": 1, "events.jsonl": 3}
    assert [e["kind"] for e in trace.events] == ["finding", "run_end"]
    assert trace.finding == {"op": "x"}
    assert trace.nonfinite_steps == [7] and trace.skipped_steps == [2]
    assert "skipped 1 damaged line(s) (first at byte" in caplog.text
    assert "column 'loss' holds 1 non-number(s) (e.g. 'many'" in caplog.text


def test_a_cut_last_line_is_dropped_but_a_cut_middle_line_is_damage(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        for step in range(3):
            w.step({"step": step, "loss": 1.0})
    steps = tmp_path / "r" / "steps.jsonl"
    full = steps.read_text()
    steps.write_text(full[:-5])  # killed mid-write
    trace = read_trace(tmp_path / "r")
    assert trace.truncated and list(trace.steps.index) == [0, 1] and trace.skipped == {}
    steps.write_text(full[:-5] + "\n")  # the same cut, then a newline: damage, not a cut
    trace = read_trace(tmp_path / "r")
    assert not trace.truncated and trace.skipped == {"steps.jsonl": 1}
    steps.write_text(full + "\n\n")  # blank lines at the end are nothing
    assert list(read_trace(tmp_path / "r").steps.index) == [0, 1, 2]


def test_damaged_summary_and_finding_are_skipped_and_other_refusals(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0})
        w.event("run_start", "info", "m")
    (tmp_path / "r" / "summary.json").write_text("{cut")
    (tmp_path / "r" / "finding.json").write_text("[1]")
    trace = read_trace(tmp_path / "r")
    assert trace.summary is None and trace.finding is None
    assert trace.skipped == {"finding.json": 1, "summary.json": 1}
    meta, events, summary = read_outline(tmp_path / "r")
    assert meta["command"] == "test" and [e["kind"] for e in events] == ["run_start"] and summary is None
    with pytest.raises(TraceError, match="holds a list, expected a JSON object"):
        read_finding(tmp_path / "r")
    (tmp_path / "r" / "steps.jsonl").write_text('{"step": "x"}\n')
    with pytest.raises(TraceError, match="no row has an integer 'step' key"):
        read_trace(tmp_path / "r")
    (tmp_path / "r" / "steps.jsonl").write_text("")
    with pytest.raises(TraceError, match="empty trace: no step was recorded"):
        read_trace(tmp_path / "r")
    (tmp_path / "r" / "steps.jsonl").unlink()
    with pytest.raises(TraceError, match="neither steps.jsonl nor steps.parquet"):
        read_trace(tmp_path / "r")
    meta_path = tmp_path / "r" / "meta.json"
    meta_path.write_text(json.dumps({"schema": "risdiag-trace", "version": 2}))
    with pytest.raises(TraceError, match="unknown trace schema 'risdiag-trace' version 2"):
        read_trace(tmp_path / "r")


def test_capsules_are_listed_in_step_order(tmp_path: Path) -> None:
    (tmp_path / "capsules").mkdir()
    for name in ("step_000010.pt", "step_000002.pt", "other.pt"):
        (tmp_path / "capsules" / name).write_bytes(b"")
    assert [p.name for p in list_capsules(tmp_path)] == ["step_000002.pt", "step_000010.pt"]
    assert list_capsules(tmp_path / "none") == []


# --- the capsule budget -------------------------------------------------------------------------------------
def _capsule(step: int, size: int = 10, value: float = 0.0) -> Capsule:
    return Capsule(step=step, batch={"x": torch.ones(2)}, model_state={"w": torch.full((size,), value)},
                   optimizer_state=None, rng=capture_rng())


def test_a_budget_of_one_keeps_the_first_and_of_zero_keeps_none(tmp_path: Path) -> None:
    none = CapsuleStore(tmp_path / "a", max_count=0)
    assert none.write(_capsule(0)) == (None, []) and none.kept == [] and none.dropped == []
    one = CapsuleStore(tmp_path / "b", max_count=1)
    path, removed = one.write(_capsule(3))
    assert path.name == "step_000003.pt" and path.is_file() and removed == []
    assert one.write(_capsule(4)) == (None, []) and one.write(_capsule(5)) == (None, [])
    assert one.kept == [path] and one.dropped == [4, 5]


def test_over_the_count_the_oldest_between_first_and_latest_goes(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path, max_count=3)
    removed = [store.write(_capsule(s, value=float(s)))[1] for s in (1, 4, 6, 9)]
    assert removed[:3] == [[], [], []] and [p.name for p in removed[3]] == ["step_000004.pt"]
    assert [p.name for p in store.kept] == ["step_000001.pt", "step_000006.pt", "step_000009.pt"]
    assert store.dropped == [4] and not (tmp_path / "capsules" / "step_000004.pt").exists()
    path, _ = store.write(_capsule(9, value=2.0))  # the same step again: rewritten, not counted twice
    assert [p.name for p in store.kept] == ["step_000001.pt", "step_000006.pt", "step_000009.pt"]
    assert Capsule.load(path).model_state["w"][0].item() == 2.0


def test_over_the_bytes_the_first_and_latest_stay_and_state_leaves_with_its_last_capsule(tmp_path: Path) -> None:
    small = CapsuleStore(tmp_path / "s", max_count=10, max_bytes=1)
    for step in range(4):
        small.write(_capsule(step, size=1000, value=float(step)))
    assert [p.name for p in small.kept] == ["step_000000.pt", "step_000003.pt"] and small.dropped == [1, 2]
    state_dir = tmp_path / "s" / "capsules" / "state"
    assert len(list(state_dir.glob("*.pt"))) == 2  # the dropped capsules' own state files went with them
    assert small.bytes == sum(p.stat().st_size for p in (tmp_path / "s" / "capsules").rglob("*.pt"))
    shared = CapsuleStore(tmp_path / "h", max_count=10, max_bytes=1)
    for step in range(4):
        shared.write(_capsule(step, size=1000))  # unchanged state: one file shared by all
    assert len(list((tmp_path / "h" / "capsules" / "state").glob("*.pt"))) == 1
    assert Capsule.load(shared.kept[-1]).model_state["w"].shape == (1000,)


# --- a failing disk ---------------------------------------------------------------------------------------
def test_a_failing_disk_keeps_lines_in_order_and_says_what_was_lost(tmp_path: Path, monkeypatch) -> None:
    real = appender_mod._write
    state = {"fail": True, "calls": 0}

    def disk(fd, data):
        state["calls"] += 1
        if state["fail"]:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(appender_mod, "_write", disk)
    errors: list = []
    f = AppendFile(tmp_path / "x.jsonl", max_pending=25, on_error=errors.append)
    f.write("a" * 9)
    f.write("b" * 9)
    f.write("c" * 9)  # 30 bytes pending would be over the 25-byte bound: dropped whole
    assert errors == [f] and f.error == "OSError: No space left on device"
    assert f.losses() == {"error": "OSError: No space left on device", "lines_lost": 3, "lines_dropped": 1,
                          "lines_unwritten": 2}
    state["fail"] = False
    f.write("d" * 3)
    f.close()
    assert (tmp_path / "x.jsonl").read_text() == "a" * 9 + "\n" + "b" * 9 + "\n" + "ddd\n"
    assert f.losses()["lines_lost"] == 1 and len(errors) == 1
    with pytest.raises(ValueError, match="is closed"):
        f.write("e")


def test_a_short_write_is_finished_and_a_recovered_disk_lost_nothing(tmp_path: Path, monkeypatch) -> None:
    real = appender_mod._write
    plan = ["short", "fail"]

    def disk(fd, data):
        step = plan.pop(0) if plan else "ok"
        if step == "short":
            return real(fd, data[:4])
        if step == "fail":
            raise OSError(5, "Input/output error")
        return real(fd, data)

    monkeypatch.setattr(appender_mod, "_write", disk)
    f = AppendFile(tmp_path / "y.jsonl", on_error=lambda _: None)
    f.write("0123456789")  # 4 bytes, then the disk fails: the tail waits
    assert f.retry() is True
    assert f.losses() == {"error": "OSError: Input/output error", "lines_lost": 0, "recovered": True}
    f.close()
    assert (tmp_path / "y.jsonl").read_text() == "0123456789\n"


def test_a_line_cut_by_a_disk_that_never_recovers_is_cut_off_at_close(tmp_path: Path, monkeypatch) -> None:
    real = appender_mod._write
    calls = {"n": 0}

    def disk(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, data)
        if calls["n"] == 2:
            return real(fd, data[:3])
        return 0  # the disk takes no byte any more

    monkeypatch.setattr(appender_mod, "_write", disk)
    f = AppendFile(tmp_path / "z.jsonl", on_error=lambda _: None)
    f.write("whole")
    f.write("torn line")
    f.close()
    assert (tmp_path / "z.jsonl").read_text() == "whole\n"  # no half line left for the reader
    assert f.losses()["lines_lost"] == 1 and "the disk took no byte" in f.error
