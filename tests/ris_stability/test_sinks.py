"""Sinks: TensorBoard event files and MLflow runs hold what the trace holds; a broken sink never fails a run."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability.records import read_trace
from ris_stability.sinks import scalar_tags
from ris_stability.sinks.base import safe_name


class Whitening(nn.Module):
    """An outside-style layer whose loss goes through eigh of a 4x4 covariance."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        cov = z.T @ z / len(z) + 1e-3 * torch.eye(4)
        evals, evecs = torch.linalg.eigh(cov)
        return (z @ evecs[:, -2:]).pow(2).mean() + evals.sum() * 1e-3


def _train(out: Path, steps: int = 5, **sinks) -> None:
    import ris_stability

    torch.manual_seed(0)
    model = Whitening()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with ris_stability.watch(model, opt, out=out, **sinks):
        for _ in range(steps):
            loss = model(torch.randn(16, 6))
            loss.backward()
            opt.step()
            opt.zero_grad()


def test_scalar_tags_group_by_kind_and_leave_other_columns_out() -> None:
    row = {"step": 3, "time_s": 1.0, "loss": 2.0, "loss/mse": 1.5, "grad/_total": 4.0, "grad/enc.layer": 3.0,
           "update_ratio/enc": 1e-3, "lr": 0.1, "mat/m.a:linalg.eigh@x.py:3/min_gap": 1e-4,
           "mat/m.a:linalg.eigh@x.py:3/n": 8.0, "mat/m.a:linalg.eigh@x.py:3/rank": 7.0, "note": "x", "missing": None}
    tags = scalar_tags(row)
    assert tags == {"loss/total": 2.0, "loss/mse": 1.5, "grad_norm/total": 4.0, "grad_norm/enc.layer": 3.0,
                    "update_ratio/enc": 1e-3, "train/lr": 0.1, "matrix/m.a:linalg.eigh@x.py:3/min_gap": 1e-4,
                    "matrix/m.a:linalg.eigh@x.py:3/rank": 7.0}
    assert safe_name("matrix/m.a:linalg.eigh@x.py:3/rank") == "matrix/m.a:linalg.eigh_x.py:3/rank"


def test_tensorboard_events_hold_every_logged_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path / "run", tensorboard=tmp_path / "tb")
    trace = read_trace(tmp_path / "run")
    steps = sorted(int(s) for s in trace.steps.index)
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    matrix_tags = [t for t in tags if t.startswith("matrix/") and t.endswith("/min_gap")]
    assert matrix_tags and "grad_norm/total" in tags and "loss/total" in tags
    for tag in ("grad_norm/total", "loss/total", matrix_tags[0]):
        assert sorted(e.step for e in acc.Scalars(tag)) == steps, tag
    first = trace.steps.iloc[0]
    assert acc.Scalars("loss/total")[0].value == pytest.approx(float(first["loss"]), rel=1e-6)
    assert any(t.startswith("figures/") for t in acc.Tags()["images"])  # the report's figures, at the end


def test_tensorboard_text_names_the_finding_of_a_planted_fault(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import ris_stability

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", tensorboard=tmp_path / "tb"):
        for step in range(4):
            h = model(torch.randn(8, 4))
            scale = torch.sqrt((h * 0).pow(2).sum(-1, keepdim=True)) if step >= 1 else 1.0  # sqrt of a zero norm: NaN in backward
            (h * scale).sum().backward()
            opt.step()
            opt.zero_grad()
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {tag: " ".join(e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag))
             for tag in acc.Tags()["tensors"]}
    found = " ".join(v for k, v in texts.items() if k.startswith("findings"))
    assert "SqrtBackward0" in found
    assert "nonfinite" in " ".join(v for k, v in texts.items() if k.startswith("incidents"))


def test_mlflow_run_holds_metrics_params_and_report(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sinks-test")
    _train(tmp_path / "run", steps=4, mlflow=True)
    client = MlflowClient()
    exp = client.get_experiment_by_name("sinks-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["risdiag.status"] == "clean"
    assert run.data.params["meta.command"] == "ris_stability.watch"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    trace = read_trace(tmp_path / "run")
    assert sorted(m.step for m in history) == [int(s) for s in trace.steps.index]
    assert max(history, key=lambda m: m.step).value == pytest.approx(float(trace.steps["loss"].iloc[-1]), rel=1e-6)
    assert any(k.startswith("matrix/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "figures", "events.jsonl"} <= artifacts


def test_mlflow_run_of_a_crashed_loop_is_failed_and_holds_its_incidents(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient
    import ris_stability

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "crash-test")
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="data loader died"):
        with ris_stability.watch(model, opt, out=tmp_path / "run", mlflow=True):
            for step in range(3):
                model(torch.randn(8, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
            raise RuntimeError("data loader died")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("crash-test").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["risdiag.status"] == "crashed"
    assert len(client.get_metric_history(run.info.run_id, "loss/total")) == 3  # the steps before the crash


def test_a_config_trace_writes_params_of_the_resolved_config(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from mlflow.tracking import MlflowClient
    from ris_stability.cli import main

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"
    code = main(["trace", "--config", str(config), "--steps", "2", "--no-live", "--no-report", "--out",
                 str(tmp_path / "q"), "--set", "data.batch_size=4", "--set", "train.val_every=0", "--set", "data.n_val=0",
                 "--tensorboard", str(tmp_path / "tb"), "--mlflow"])
    assert code == 0
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("risdiag").experiment_id])
    assert run.data.params["data.batch_size"] == "4" and "loss/total" in run.data.metrics
    assert any(k.startswith("loss/") and k != "loss/total" for k in run.data.metrics)  # the loss terms
    assert any((tmp_path / "tb" / "q").glob("events.out.tfevents.*"))


def test_unwritable_tensorboard_dir_warns_once_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ris_stability.sinks.base"):
        _train(tmp_path / "run", steps=3, tensorboard=blocker / "tb")
    warnings = [r for r in caplog.records if "tensorboard sink disabled" in r.getMessage()]
    assert len(warnings) == 1 and "start" in warnings[0].getMessage()
    assert len(read_trace(tmp_path / "run").steps) == 3


def test_missing_extra_warns_once_and_the_run_goes_on(tmp_path: Path, caplog, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with caplog.at_level(logging.WARNING, logger="ris_stability.sinks.base"):
        _train(tmp_path / "run", steps=3, mlflow=True)
    (warning,) = [r.getMessage() for r in caplog.records if "mlflow sink disabled" in r.getMessage()]
    assert "pip install 'ris-diag[mlflow]'" in warning
    assert len(read_trace(tmp_path / "run").steps) == 3


def test_a_sink_that_fails_mid_run_is_dropped_and_the_trace_is_complete(tmp_path: Path, caplog) -> None:
    from ris_stability.records.listeners import observing_runs
    from ris_stability.sinks.base import SinkSet

    class Flaky:
        name = "flaky"
        calls = 0

        def check(self) -> None:
            pass

        def open_run(self, run_dir, meta):
            return self

        def step(self, step, scalars):
            Flaky.calls += 1
            raise OSError("disk full")

        def event(self, record):
            pass

        def publish(self, run_dir):
            pass

        def close(self, status):
            pass

    sinks = SinkSet([Flaky()])
    try:
        with observing_runs(sinks), caplog.at_level(logging.WARNING, logger="ris_stability.sinks.base"):
            _train(tmp_path / "run", steps=4)
    finally:
        sinks.publish()
    assert Flaky.calls == 1  # dropped after the first failure
    assert sum("flaky sink disabled" in r.getMessage() for r in caplog.records) == 1
    assert len(read_trace(tmp_path / "run").steps) == 4
    assert not math.isnan(float(read_trace(tmp_path / "run").steps["loss"].iloc[-1]))


def _wandb_records(run_file: Path):
    """The records of a W&B offline run file (a LevelDB-style log of protobuf records), read back
    without a server: 7-byte file header ':W&B' + magic + version, 32 KiB blocks, 7-byte chunk headers."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left  # block padding
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def _wait_for_exit_record(run_file: Path, polls: int = 240) -> None:
    """W&B's service process writes the run file behind the SDK: wait until it holds the run's exit record."""
    import time

    for _ in range(polls):
        if any(rec.WhichOneof("record_type") == "exit" for rec in _wandb_records(run_file)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_file} has no exit record: the W&B run was not finished")


def test_wandb_offline_run_holds_scalars_tables_figures_and_files(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_PROJECT", "sinks-test")
    _train(tmp_path / "run", steps=4, wandb=True)
    (run_file,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    _wait_for_exit_record(run_file)
    history: dict[int, dict] = {}
    config, summary = {}, {}
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            assert rec.run.display_name == "run" and rec.run.project == "sinks-test"
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
    trace = read_trace(tmp_path / "run")
    steps = [int(s) for s in trace.steps.index]
    assert sorted(s for s, row in history.items() if "loss/total" in row) == steps  # every logged step, at its step
    first, last = trace.steps.iloc[0], history[steps[-1]]
    assert history[min(history)]["loss/total"] == pytest.approx(float(first["loss"]), rel=1e-6)
    tb_tags = {k for k, v in scalar_tags(trace.steps.iloc[-1].to_dict()).items() if not math.isnan(v)}  # the TensorBoard sink's tags, same names
    assert tb_tags and tb_tags <= set(last)
    assert any(k.startswith("matrix/") and k.endswith("/min_gap") for k in last)
    end = history[steps[-1] + 1]  # what exists only at the end: one step after the last
    figures = {k.split("/")[1] for k in end if k.startswith("figures/") and k.endswith("/_type")}
    assert figures == {p.stem for p in (tmp_path / "run" / "figures").glob("*.png")} and figures
    assert config["meta.command"] == "ris_stability.watch"
    assert summary["risdiag.status"] == "clean"
    files = run_file.parent / "files"
    assert (files / "report.md").is_file() and (files / "events.jsonl").is_file()


def test_wandb_tables_hold_the_finding_of_a_planted_fault(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    import json
    import ris_stability

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: under the run folder, not the cwd
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", wandb=True):
        for step in range(4):
            h = model(torch.randn(8, 4))
            scale = torch.sqrt((h * 0).pow(2).sum(-1, keepdim=True)) if step >= 1 else 1.0  # NaN in backward
            (h * scale).sum().backward()
            opt.step()
            opt.zero_grad()
    assert not (tmp_path / "wandb").exists()
    tables = {p.name.split("_")[0]: json.loads(p.read_text())
              for p in (tmp_path / "run").glob("wandb/offline-run-*/files/media/table/*.table.json")}
    assert tables["findings"]["columns"] == ["step", "kind", "severity", "message"]
    assert "SqrtBackward0" in " ".join(str(r) for r in tables["findings"]["data"])
    assert "nonfinite" in " ".join(str(r) for r in tables["incidents"]["data"])


def test_mlflow_with_a_database_uri_leaves_no_mlruns_in_the_cwd(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "db-test")
    _train(tmp_path / "runs" / "run", steps=2, mlflow=True)
    assert not (tmp_path / "mlruns").exists()
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("db-test").experiment_id])
    assert "report.md" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert any((tmp_path / "runs" / "mlflow-artifacts").rglob("report.md"))
