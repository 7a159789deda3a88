"""Run-folder records, third part: the writer as a user of its folder meets it (where it may be created, what
meta.json and summary.json look like, each row's time, what an observer installed around the run hears, the
words of its refusals) and the appender's own file (its permissions, disk syncs, a first line cut short, a
close that fails). Through the public writer and appender, no training."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import stat
import time
from pathlib import Path

import pytest

from ris_stability.records import TraceError, TraceWriter
from ris_stability.records import appender as appender_mod
from ris_stability.records.appender import AppendFile
from ris_stability.records.listeners import observing_runs

META = {"command": "test", "dtype": "float32"}


def test_the_run_folder_may_be_nested_or_already_there_but_not_hold_a_run(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "a" / "b" / "run", META) as w:  # missing parents are made
        w.step({"step": 0})
    (tmp_path / "empty").mkdir()
    with TraceWriter(tmp_path / "empty", META) as w:  # an existing empty folder is used
        w.step({"step": 0})
    with pytest.raises(TraceError, match=re.escape("Choose another output folder or delete the old run.") + "$"):
        TraceWriter(tmp_path / "empty", META)


def test_meta_and_summary_are_sorted_indented_json_with_a_utc_creation_time(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    with TraceWriter(tmp_path / "r", {"zeta": 1, "alpha": [1, 2]}) as w:
        w.summary({"steps": 3, "status": "clean", "best": {"loss": 0.5}})
    for name in ("meta.json", "summary.json"):
        text = (tmp_path / "r" / name).read_text()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"  # for a person reading it
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    created = dt.datetime.fromisoformat(meta["created"])
    assert meta["created"].endswith("+00:00") and before <= created <= dt.datetime.now(dt.timezone.utc)
    assert meta["zeta"] == 1 and meta["schema"] == "risdiag-trace"


def test_each_row_holds_its_time_since_the_run_opened_on_a_compact_line(tmp_path: Path) -> None:
    started = time.monotonic()
    with TraceWriter(tmp_path / "r", META) as w:
        w.step({"step": 0, "nested": {"a": math.nan, "b": [math.inf, 1.0]}})
        w.step({"step": 1, "time_s": 42.0})
    took = time.monotonic() - started
    lines = (tmp_path / "r" / "steps.jsonl").read_text().splitlines()
    for line in lines:
        assert line == json.dumps(json.loads(line), separators=(",", ":"))
    first, second = map(json.loads, lines)
    assert isinstance(first["time_s"], float) and 0.0 <= first["time_s"] <= took
    assert second["time_s"] == 42.0  # a row's own time stays
    assert first["nested"] == {"a": "nan", "b": ["inf", 1.0]}  # NaN and inf stay apart inside a step value too


def test_refusals_name_the_value_and_say_what_to_pass(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "r", META) as w:
        with pytest.raises(ValueError, match=re.escape("integer 'step' key, got True")):
            w.step({"step": True})
        with pytest.raises(TypeError, match=re.escape("trace value 'pair[1]' has type object")):
            w.step({"step": 0, "pair": [1, object()]})
        with pytest.raises(TypeError, match=re.escape(
                "pass a Python number, bool, str, None, list or dict (call .item() on 0-d tensors)") + "$"):
            w.step({"step": 0, "x": object()})
        with pytest.raises(TypeError, match=re.escape("trace value 'summary.json.x'")):
            w.summary({"x": object()})
    with pytest.raises(ValueError, match=r"TraceWriter for .* is closed"):
        w.step({"step": 1})


def test_an_observer_installed_around_the_run_hears_it_next_to_its_own_listeners(tmp_path: Path) -> None:
    opened, heard, own = [], [], []

    class Observer:
        def start_run(self, run_dir, meta):
            opened.append((run_dir, dict(meta)))
            return lambda kind, record: heard.append(kind)

    with observing_runs(Observer()):
        with TraceWriter(tmp_path / "r", META, listeners=[lambda kind, record: own.append(kind)]) as w:
            w.step({"step": 0})
            w.event("run_start", "info", "m")
            w.summary({"status": "clean"})
    ((run_dir, meta),) = opened
    assert run_dir == tmp_path / "r" and meta["command"] == "test" and meta["schema"] == "risdiag-trace"
    assert heard == own == ["step", "event", "summary"]
    with TraceWriter(tmp_path / "s", META) as w:  # outside the block: nobody else
        w.step({"step": 0})
    assert len(opened) == 1


def test_lines_are_synced_to_disk_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    with TraceWriter(tmp_path / "plain", META) as w:
        w.step({"step": 0})
        w.event("run_start", "info", "m")
    plain = AppendFile(tmp_path / "plain.jsonl")
    plain.write("x")
    plain.close()
    assert synced == [] and not w.fsync
    with TraceWriter(tmp_path / "synced", META, fsync=True) as w:
        w.step({"step": 0})
        w.event("run_start", "info", "m")
    assert len(synced) == 2 and w.fsync is True  # each line of each file


def test_record_files_are_not_executable(tmp_path: Path) -> None:
    f = AppendFile(tmp_path / "x.jsonl")
    f.write("x")
    f.close()
    mode = stat.S_IMODE((tmp_path / "x.jsonl").stat().st_mode)
    assert mode & 0o111 == 0 and mode & 0o600 == 0o600 and f.error == ""


def test_a_first_line_cut_short_by_a_dead_disk_leaves_an_empty_file(tmp_path: Path, monkeypatch) -> None:
    real = appender_mod._write
    calls = {"n": 0}

    def disk(fd, data):
        calls["n"] += 1
        return real(fd, data[:3]) if calls["n"] == 1 else 0  # 3 bytes, then none at all

    monkeypatch.setattr(appender_mod, "_write", disk)
    f = AppendFile(tmp_path / "z.jsonl", on_error=lambda _: None)
    f.write("torn line")
    assert f.error == "OSError: the disk took no byte" and f.retry() is False
    f.close()
    assert (tmp_path / "z.jsonl").read_text() == ""
    assert f.losses() == {"error": "OSError: the disk took no byte", "lines_lost": 1, "lines_dropped": 0,
                          "lines_unwritten": 1}


def test_a_close_the_disk_refuses_is_recorded_not_raised(tmp_path: Path, monkeypatch) -> None:
    errors: list = []
    f = AppendFile(tmp_path / "x.jsonl", on_error=errors.append)
    f.write("x")
    real = os.close

    def close(fd):
        real(fd)
        raise OSError(5, "Input/output error")  # e.g. a network mount gone at the last flush

    monkeypatch.setattr(os, "close", close)
    f.close()
    monkeypatch.setattr(os, "close", real)
    assert errors == [f] and f.error == "OSError: Input/output error"
    assert f.losses() == {"error": "OSError: Input/output error", "lines_lost": 0, "recovered": True}
