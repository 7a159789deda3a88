"""Sinks, checked through what a user sees in each tool: which events become incidents or findings, the
status a run ends with, the steps scalars land on, and what is published at the end. The tools' writers
are replaced by recorders (fast, no server, no event files); the sink code itself runs unchanged."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import pytest

from ris_stability.records import TraceWriter
from ris_stability.records.listeners import current_observer, observing_runs
from ris_stability.sinks import open_sinks
from ris_stability.sinks.base import SinkSet, also_listen, current_sinks, markdown_event, safe_name, scalar_tags
from tests.ris_stability.sink_fakes import EVENTS, publishable, run_folder, tbmod


# --- recorders standing in for each tool's writer -----------------------------------------------------------
class FakeSummaryWriter:
    made: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.texts, self.images, self.closed = log_dir, [], [], [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))

    def add_image(self, tag, pixels, dataformats="CHW"):
        self.images.append((tag, pixels.shape, dataformats))

    def close(self):
        self.closed = True

    def text(self, tag: str) -> list[str]:
        return [t for g, t, _ in self.texts if g == tag]


@pytest.fixture
def tb(monkeypatch):
    if tbmod is None:
        pytest.skip("the tensorboard extra is not installed")
    FakeSummaryWriter.made = []
    monkeypatch.setattr(tbmod, "SummaryWriter", FakeSummaryWriter)
    return FakeSummaryWriter.made


# --- the shared routing --------------------------------------------------------------------------------------
def test_markdown_event_names_kind_severity_step_and_message() -> None:
    assert markdown_event({"kind": "nonfinite_loss", "severity": "error", "step": 7, "message": "loss is nan"}) \
        == "**nonfinite_loss** (error, step 7): loss is nan"
    assert markdown_event({"kind": "run_end", "severity": "info", "step": None, "message": "m"}) \
        == "**run_end** (info, run): m"
    assert markdown_event({"kind": "k", "severity": "info", "step": 0, "message": "m"}) == "**k** (info, step 0): m"


def test_scalar_tags_cover_every_family_and_skip_unknown_matrix_stats() -> None:
    row = {"grad_group/decoder": 1.0, "update_ratio_group/decoder": 2.0, "grad_nonfinite/enc": 1, "param/enc": 3.0,
           "skipped": False, "nonfinite": True, "mat/site/log10_cond": 4.0, "mat/site/max_cluster": 2,
           "mat/site/n": 8, "mat/min_gap": 1.0, "grad/x": float("nan"), "other/x": 1.0, "loss": None, "lr": "nan",
           "mat/enc/a:eigh/rank": 3}
    tags = scalar_tags(row)
    assert tags == {"grad_norm_group/decoder": 1.0, "update_ratio_group/decoder": 2.0, "grad_nonfinite/enc": 1.0,
                    "param_norm/enc": 3.0, "train/skipped": 0.0, "train/nonfinite": 1.0,
                    "matrix/site/log10_cond": 4.0, "matrix/site/max_cluster": 2.0, "grad_norm/x": pytest.approx(
                        float("nan"), nan_ok=True), "matrix/enc/a:eigh/rank": 3.0}
    assert all(type(v) is float for v in tags.values())
    assert safe_name("val/a b@c(d)") == "val/a b_c_d_" and safe_name("x-y.z:w/_v") == "x-y.z:w/_v"


class Recorder:
    """A backend whose runs record every call."""

    def __init__(self, name: str = "rec", fail_on: str = "") -> None:
        self.name, self.fail_on, self.runs, self.calls = name, fail_on, {}, []

    def check(self) -> None:
        if self.fail_on == "check":
            raise RuntimeError("no server")

    def open_run(self, run_dir, meta):
        if self.fail_on == "open":
            raise RuntimeError("cannot open")
        self.runs[Path(run_dir).name] = meta
        return self

    def step(self, step, scalars):
        self.calls.append(("step", step, dict(scalars)))
        if self.fail_on == "step":
            raise OSError("disk full")

    def event(self, record):
        self.calls.append(("event", record["kind"]))
        if self.fail_on == "event":
            raise OSError("event refused")

    def publish(self, run_dir):
        self.calls.append(("publish", Path(run_dir).name))
        if self.fail_on == "publish":
            raise OSError("upload refused")

    def close(self, status):
        self.calls.append(("close", status))
        if self.fail_on == "close":
            raise OSError("close refused")


def test_sink_set_routes_rows_events_metrics_and_the_summary_status(tmp_path: Path) -> None:
    rec = Recorder()
    sinks = SinkSet([rec])
    with observing_runs(sinks):
        assert current_sinks() is sinks
        with TraceWriter(tmp_path / "r1", {"command": "c"}) as writer:
            writer.step({"step": 4, "loss": 2.0, "note": "x"})
            sinks.metric("val loss", 0.5)  # at the last logged step, name made safe
            sinks.metric("acc", 0.9, step=0)  # an explicit step 0 stays 0
            writer.event("finding", "info", "found", step=4)
            writer.summary({"steps": 1, "status": "crashed"})
    sinks.publish()
    assert rec.runs["r1"]["command"] == "c"
    assert rec.calls == [("step", 4, {"loss/total": 2.0}), ("step", 4, {"val/val loss": 0.5}),
                         ("step", 0, {"val/acc": 0.9}), ("event", "finding"), ("publish", "r1"), ("close", "crashed")]
    sinks.publish()  # each run is closed once
    assert rec.calls[-1] == ("close", "crashed") and len(rec.calls) == 6


def test_sink_set_without_summary_closes_clean_and_metric_before_any_step_goes_to_step_0(tmp_path: Path) -> None:
    rec = Recorder()
    sinks = SinkSet([rec])
    listen = sinks.start_run(tmp_path / "r", {})
    sinks.metric("m", 1.0)
    listen("other", {})
    sinks.publish()
    assert rec.calls == [("step", 0, {"val/m": 1.0}), ("publish", "r"), ("close", "clean")]


def test_a_failing_backend_is_dropped_alone_with_one_warning(tmp_path: Path, caplog) -> None:
    good, bad_check, bad_open, bad_step = Recorder("good"), Recorder("c", "check"), Recorder("o", "open"), \
        Recorder("s", "step")
    with caplog.at_level(logging.WARNING, logger="ris_stability.sinks.base"):
        sinks = SinkSet([bad_check, good, bad_open, bad_step])
        assert [b.name for b in sinks.backends] == ["good", "o", "s"]
        listen = sinks.start_run(tmp_path / "r", {})
        for step in range(3):
            listen("step", {"step": step, "loss": 1.0})
        sinks.publish()
    assert [c[1] for c in good.calls if c[0] == "step"] == [0, 1, 2] and good.calls[-1] == ("close", "clean")
    assert [c[1] for c in bad_step.calls if c[0] == "step"] == [0] and ("close", "clean") not in bad_step.calls
    messages = [r.getMessage() for r in caplog.records]
    assert sum("c sink disabled (start failed)" in m for m in messages) == 1
    assert sum("o sink disabled (opening a run failed)" in m for m in messages) == 1
    assert sum("s sink disabled (writing a step failed)" in m for m in messages) == 1


@pytest.mark.parametrize("stage, what", [("event", "writing an event"), ("step", "writing a metric"),
                                         ("publish", "publishing the report"), ("close", "closing")])
def test_each_stage_a_sink_fails_at_is_named_in_its_one_warning(tmp_path: Path, caplog, stage, what) -> None:
    rec = Recorder("flaky", stage)
    sinks = SinkSet([rec])
    with caplog.at_level(logging.WARNING, logger="ris_stability.sinks.base"):
        listen = sinks.start_run(tmp_path / "r", {})
        listen("event", {"kind": "finding", "step": 1})
        sinks.metric("m", 1.0)
        listen("summary", {"steps": 1})  # no status: the run closes as clean
        sinks.publish()
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"flaky sink disabled ({what} failed): OSError: ")
    if stage == "close":
        assert rec.calls[-1] == ("close", "clean")


def test_open_sinks_without_backends_installs_nothing_and_also_listen_calls_sinks_first(tmp_path: Path) -> None:
    with open_sinks() as none:
        assert none is None and current_observer() is None
    order: list[str] = []
    rec = Recorder()
    rec.event = lambda record: order.append("sink")
    sinks = SinkSet([rec])
    made: list = []

    def make(run_dir, meta):
        made.append((run_dir, meta["command"]))
        return lambda kind, r: order.append(f"mine {kind} {r['message']}")

    with observing_runs(sinks), also_listen(make):
        assert current_sinks() is sinks  # seen through the sweep's extra listener
        with TraceWriter(tmp_path / "r", {"command": "cmd"}) as writer:
            writer.event("finding", "info", "m")
    assert order == ["sink", "mine event m"]
    assert made == [(tmp_path / "r", "cmd")] and isinstance(made[0][0], Path)
    assert rec.runs["r"]["command"] == "cmd"  # the sinks under it got the meta too
    with observing_runs(types.SimpleNamespace(start_run=lambda run_dir, meta: lambda kind, r: None)):
        assert current_sinks() is None  # another kind of observer is not a sink set
    with also_listen(lambda run_dir, meta: lambda kind, r: order.append(kind)):
        assert current_sinks() is None
        with TraceWriter(tmp_path / "r2", {}) as writer:
            writer.step({"step": 0})
    assert order[-1] == "step"


# --- TensorBoard ------------------------------------------------------------------------------------------
def test_tensorboard_incidents_are_warnings_and_errors_findings_by_kind(tmp_path: Path, tb) -> None:
    with open_sinks(tensorboard=tmp_path / "tb"):
        run_folder(tmp_path / "run", status="nonfinite")
    (writer,) = tb
    assert writer.log_dir == str(tmp_path / "tb" / "run")
    assert writer.text("command") == ["`risdiag trace x`"]
    assert [(t, s) for g, t, s in writer.texts if g == "incidents"] == [
        ("**nonfinite_loss** (error, step 3): nonfinite_loss message", 3),
        ("**gradient_spike** (warning, step 4): gradient_spike message", 4)]
    assert [(t.split("**")[1], s) for g, t, s in writer.texts if g == "findings"] == [
        ("finding", 5), ("precision_audit", 6)]
    assert writer.text("status") == ["nonfinite"] and writer.closed
    assert [(v, s) for tag, v, s in writer.scalars if tag == "loss/total"] == [(1.0, 0), (2.0, 1), (3.0, 2)]
    assert {tag for tag, _, _ in writer.scalars} == {"loss/total", "grad_norm/total"}


def test_tensorboard_run_event_without_step_is_at_step_0_and_publish_adds_report_figures_capsules(
        tmp_path: Path, tb) -> None:
    with open_sinks(tensorboard=tmp_path / "tb"):
        run_folder(tmp_path / "run", events=[("instrument_error", "error", None)])
        publishable(tmp_path / "run")
    (writer,) = tb
    assert [(g, s) for g, _, s in writer.texts if g == "incidents"] == [("incidents", 0)]
    assert writer.text("report") == ["# the report\n"]
    assert writer.images == [("figures/a_grad", (3, 5, 3), "HWC"), ("figures/b_loss", (3, 5, 3), "HWC")]
    assert writer.text("capsules") == ["- `run/capsules/step_3.pt`"]


def test_tensorboard_publish_of_a_bare_folder_adds_only_the_status(tmp_path: Path, tb) -> None:
    with open_sinks(tensorboard=tmp_path / "tb"):
        with TraceWriter(tmp_path / "run", {}) as writer:
            writer.summary({"status": "clean"})
        (tmp_path / "run" / "figures").mkdir()
        (tmp_path / "run" / "capsules").mkdir()
    (writer,) = tb
    assert [g for g, _, _ in writer.texts] == ["status"] and writer.images == []


def test_tensorboard_check_creates_the_folder_and_refuses_an_unwritable_one(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from ris_stability.sinks.tensorboard import TensorBoardBackend

    TensorBoardBackend(tmp_path / "a" / "b").check()
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(OSError):
            TensorBoardBackend(tmp_path / "ro").check()


def test_tensorboard_check_names_the_extra_when_tensorboard_is_missing(monkeypatch, tmp_path: Path) -> None:
    from ris_stability.sinks.tensorboard import TensorBoardBackend

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError) as err:
        TensorBoardBackend(tmp_path / "tb").check()
    assert str(err.value) == "the tensorboard package is not installed: pip install 'ris-diag[tensorboard]'"


def test_tensorboard_check_tries_a_file_in_the_log_folder_itself(tmp_path: Path, monkeypatch) -> None:
    """A folder that refuses new files (read-only mount, quota) fails the check at start; the folder may
    already exist (a second run of the command)."""
    import tempfile

    from ris_stability.sinks.tensorboard import TensorBoardBackend

    if tbmod is None:
        pytest.skip("the tensorboard extra is not installed")
    (tmp_path / "tb").mkdir()
    refusing = tmp_path / "tb"
    real = tempfile.NamedTemporaryFile

    def named(*args, **kwargs):
        if Path(kwargs.get("dir") or tempfile.gettempdir()) == refusing:
            raise PermissionError(13, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", named)
    with pytest.raises(PermissionError):
        TensorBoardBackend(refusing).check()
    TensorBoardBackend(tmp_path / "other").check()
    TensorBoardBackend(tmp_path / "other").check()  # an existing folder is fine


def test_tensorboard_figures_are_rgb_and_every_capsule_is_listed(tmp_path: Path, tb) -> None:
    import numpy as np
    from PIL import Image

    with open_sinks(tensorboard=tmp_path / "tb"):
        run_folder(tmp_path / "run", events=[])
        (tmp_path / "run" / "figures").mkdir()
        Image.fromarray(np.zeros((4, 6), dtype=np.uint8), mode="L").save(tmp_path / "run" / "figures" / "gray.png")
        (tmp_path / "run" / "capsules").mkdir()
        for step in (3, 12):
            (tmp_path / "run" / "capsules" / f"step_{step:06d}.pt").write_bytes(b"x")
    (writer,) = tb
    assert writer.images == [("figures/gray", (4, 6, 3), "HWC")]
    assert writer.text("capsules") == ["- `run/capsules/step_000003.pt`\n- `run/capsules/step_000012.pt`"]


