"""MLflow and W&B sinks, checked through what a user sees in each tool: the run's end status, incidents.md,
the metric batches and params, the W&B tables, figures and files. The tools' clients are recorders."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from ris_stability.records import TraceWriter
from ris_stability.records.listeners import observing_runs
from ris_stability.sinks import open_sinks
from ris_stability.sinks.base import SinkSet
from tests.ris_stability.sink_fakes import EVENTS, mlflow, publishable, run_folder


# --- MLflow -----------------------------------------------------------------------------------------------
class FakeMlflowClient:
    """MlflowClient's calls the sink makes, recorded."""

    def __init__(self, experiments=None, tracking_uri: str = "sqlite:///x.db") -> None:
        self.experiments = dict(experiments or {})
        self.tracking_uri = tracking_uri
        self.batches, self.texts, self.artifacts, self.tags, self.terminated, self.created = [], [], [], [], [], []
        self.env_during_calls: list[str | None] = []

    def get_experiment_by_name(self, name):
        self.env_during_calls.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
        return types.SimpleNamespace(experiment_id=self.experiments[name]) if name in self.experiments else None

    def create_experiment(self, name, artifact_location=None):
        self.created.append((name, artifact_location))
        return "exp-new"

    def create_run(self, experiment_id, run_name, tags):
        self.run_args = (experiment_id, run_name, tags)
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

    def log_batch(self, run_id, metrics=(), params=()):
        self.batches.append((run_id, list(metrics), list(params)))

    def log_text(self, run_id, text, name):
        self.texts.append((run_id, name, text))

    def log_artifact(self, run_id, path):
        assert run_id == "run-1"
        self.artifacts.append(Path(path).name)

    def log_artifacts(self, run_id, path, artifact_path=None):
        assert run_id == "run-1"
        self.artifacts.append((Path(path).name, artifact_path))

    def set_tag(self, run_id, key, value):
        self.tags.append((run_id, key, value))

    def set_terminated(self, run_id, status):
        self.terminated.append((run_id, status))

    def metrics(self):
        return [(m.key, m.value, m.step) for _, ms, _ in self.batches for m in ms]

    def timestamps(self):
        return [m.timestamp for _, ms, _ in self.batches for m in ms]

    def params(self):
        return {p.key: p.value for _, _, ps in self.batches for p in ps}


@pytest.fixture
def fake_mlflow(monkeypatch):
    if mlflow is None:
        pytest.skip("the mlflow extra is not installed")
    holder: dict[str, FakeMlflowClient] = {}

    def make():
        holder["client"] = FakeMlflowClient(holder.get("experiments"))
        return holder["client"]

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", make)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    return holder


@pytest.mark.parametrize("status,terminated", [("crashed", "FAILED"), ("clean", "FINISHED"),
                                               ("nonfinite", "FINISHED"), ("stopped", "FINISHED")])
def test_mlflow_run_ends_failed_only_when_crashed_and_tags_the_status(tmp_path, fake_mlflow, status,
                                                                     terminated) -> None:
    with open_sinks(mlflow=True):
        run_folder(tmp_path / "run", status=status)
    client = fake_mlflow["client"]
    assert client.terminated == [("run-1", terminated)]
    assert client.tags == [("run-1", "risdiag.status", status)]


def test_mlflow_incidents_md_holds_warnings_errors_and_every_finding(tmp_path, fake_mlflow) -> None:
    with open_sinks(mlflow=True):
        run_folder(tmp_path / "run")
    ((run_id, name, text),) = fake_mlflow["client"].texts
    assert (run_id, name) == ("run-1", "incidents.md")
    assert text == ("**nonfinite_loss** (error, step 3): nonfinite_loss message\n\n"
                    "**gradient_spike** (warning, step 4): gradient_spike message\n\n"
                    "**finding** (info, step 5): finding message\n")  # an info-level finding too; other info left out


def test_mlflow_clean_run_without_incidents_writes_no_incidents_file(tmp_path, fake_mlflow) -> None:
    with open_sinks(mlflow=True):
        run_folder(tmp_path / "run", events=[("run_start", "info", None)])
    assert fake_mlflow["client"].texts == []


def test_mlflow_metrics_batch_every_flush_every_steps_and_flush_at_the_end(tmp_path, fake_mlflow) -> None:
    from ris_stability.sinks.mlflow import MLflowBackend

    sinks = SinkSet([MLflowBackend("e", flush_every=2)])
    with observing_runs(sinks):
        run_folder(tmp_path / "run", steps=5, events=[], extra={"mat/m@f.py:1/rank": 3})
    client = fake_mlflow["client"]
    metric_batches = [len(ms) for _, ms, _ in client.batches if ms]
    assert metric_batches == [6, 6]  # steps 0-1 and 2-3 (3 scalars each); step 4 waits for the end
    sinks.publish()
    assert [len(ms) for _, ms, _ in client.batches if ms] == [6, 6, 3]
    assert [(k, v, s) for k, v, s in client.metrics() if k == "loss/total"] == [
        ("loss/total", float(s + 1), s) for s in range(5)]
    assert ("matrix/m_f.py:1/rank", 3.0, 0) in client.metrics()  # the name MLflow accepts
    stamps = client.timestamps()  # milliseconds since the epoch, as MLflow expects (not seconds)
    assert all(type(t) is int and t > 10**12 for t in stamps) and stamps == sorted(stamps)
    assert {run_id for run_id, _, _ in client.batches} == {"run-1"}


def test_mlflow_large_batches_are_split_at_the_server_limits() -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from ris_stability.sinks.mlflow import MLflowRun

    client = FakeMlflowClient()
    run = MLflowRun(client, "r", flush_every=10)
    run.step(0, {f"m{i}": float(i) for i in range(2500)})
    assert client.batches == []
    run.flush()
    assert [len(ms) for _, ms, _ in client.batches] == [1000, 1000, 500]
    assert [m.key for _, ms, _ in client.batches for m in ms] == [f"m{i}" for i in range(2500)]
    run.flush()
    assert len(client.batches) == 3  # nothing pending, nothing sent


def test_mlflow_run_params_experiment_and_artifacts(tmp_path, fake_mlflow) -> None:
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.resolved.toml").write_text('seed = 3\n[data]\nbatch_size = 4\nname = "' + "x" * 600 + '"\n'
                                                 "[data.sub]\nk = true\n")
    with open_sinks(mlflow=True, mlflow_experiment="mine"):
        with TraceWriter(run_dir, {"command": "c" * 600, "device": "cpu", "torch": None}) as writer:
            writer.step({"step": 0, "loss": 1.0})
            writer.summary({"status": "clean"})
        publishable(run_dir)
        (run_dir / "finding.json").write_text("{}")
    client = fake_mlflow["client"]
    assert client.created == [("mine", (tmp_path / "runs" / "mlflow-artifacts").as_uri())]
    assert client.run_args == ("exp-new", "run", {"risdiag.run_folder": "run"})
    params = client.params()
    assert params["meta.command"] == "c" * 500 and params["meta.device"] == "cpu" and "meta.torch" not in params
    assert params["seed"] == "3" and params["data.batch_size"] == "4" and params["data.sub.k"] == "True"
    assert params["data.name"] == "x" * 500
    assert client.artifacts == ["report.md", "summary.json", "events.jsonl", "finding.json",
                                ("figures", "figures"), ("capsules", "capsules")]


def test_mlflow_joins_an_existing_experiment_named_by_the_environment(tmp_path, fake_mlflow, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    fake_mlflow["experiments"] = {"team": "exp-7"}
    with open_sinks(mlflow=True):
        run_folder(tmp_path / "run")
    client = fake_mlflow["client"]
    assert client.created == [] and client.run_args[0] == "exp-7"
    assert client.env_during_calls == ["0"]  # MLflow's retries off during the sink's calls
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # and the user's environment restored


def test_mlflow_many_params_go_in_batches_of_100(tmp_path, fake_mlflow) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.toml").write_text("".join(f"p{i} = {i}\n" for i in range(250)))
    fake_mlflow["experiments"] = {"risdiag": "e"}
    with open_sinks(mlflow=True):
        with TraceWriter(run_dir, {}) as writer:
            writer.summary({"status": "clean"})
    client = fake_mlflow["client"]
    assert [len(ps) for _, _, ps in client.batches if ps] == [100, 100, 50]  # 250 params, no meta
    assert client.params()["p249"] == "249"
    assert client.created == [] and client.run_args[0] == "e"  # the default experiment, "risdiag", joined


def test_mlflow_flushes_every_20_steps_by_default(tmp_path, fake_mlflow) -> None:
    with open_sinks(mlflow=True):
        run_folder(tmp_path / "run", steps=20, events=[])
        assert [len(ms) for _, ms, _ in fake_mlflow["client"].batches if ms] == [40]  # 20 steps x 2 scalars
    assert [len(ms) for _, ms, _ in fake_mlflow["client"].batches if ms] == [40]


def test_mlflow_check_names_the_extra_when_mlflow_is_missing(monkeypatch) -> None:
    from ris_stability.sinks.mlflow import MLflowBackend

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError) as err:
        MLflowBackend().check()
    assert str(err.value) == "the mlflow package is not installed: pip install 'ris-diag[mlflow]'"


def test_mlflow_file_store_keeps_its_own_artifact_location(tmp_path) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from ris_stability.sinks.mlflow import MLflowBackend

    backend = MLflowBackend("e")
    backend.client = FakeMlflowClient(tracking_uri="file:///tmp/mlruns")
    backend.open_run(tmp_path / "run", {})
    assert backend.client.created == [("e", None)] and backend.experiment_id == "exp-new"
    backend.open_run(tmp_path / "run2", {})
    assert len(backend.client.created) == 1  # created once, then reused


def test_flat_params_and_quick_requests_restore_the_environment(monkeypatch) -> None:
    from ris_stability.sinks.mlflow import QuickClient, flat_params, quick_requests

    assert flat_params({"a": {"b": {"c": 1}}, "d": [1, 2]}, "x.") == {"x.a.b.c": "1", "x.d": "[1, 2]"}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with pytest.raises(KeyError):
        with quick_requests():
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
            raise KeyError("inside")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    client = QuickClient(FakeMlflowClient(tracking_uri="http://h"))
    assert client.tracking_uri == "http://h" and client.failed == ""
    assert client.get_experiment_by_name("none") is None


# --- Weights & Biases ---------------------------------------------------------------------------------------
class FakeWandbRun:
    def __init__(self, folder: Path) -> None:
        self.dir, self.logged, self.summary, self.exit_code = str(folder), [], {}, None
        folder.mkdir(parents=True, exist_ok=True)

    def log(self, data, step=None, commit=None):
        self.logged.append((step, dict(data), commit))

    def finish(self, exit_code=None):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    fake = types.ModuleType("wandb")
    fake.inits = []
    fake.Table = lambda columns, data: ("table", tuple(columns), [list(r) for r in data])
    fake.Image = lambda path: ("image", Path(path).name)
    fake.Settings = lambda **kw: kw

    def init(**kwargs):
        fake.inits.append(kwargs)
        fake.run = FakeWandbRun(tmp_path / "wandb-files")
        return fake.run

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return fake


@pytest.mark.parametrize("status,code", [("crashed", 1), ("clean", 0), ("nonfinite", 0)])
def test_wandb_run_exit_code_and_status(tmp_path, fake_wandb, status, code) -> None:
    with open_sinks(wandb=True):
        run_folder(tmp_path / "run", status=status)
    assert fake_wandb.run.exit_code == code and fake_wandb.run.summary == {"risdiag.status": status}


def test_wandb_tables_steps_figures_files_and_config(tmp_path, fake_wandb) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.toml").write_text("[data]\nbatch_size = 4\n")
    with open_sinks(wandb=True):
        with TraceWriter(run_dir, {"command": "c", "device": None}) as writer:
            for step in (0, 5, 2):  # out of order: the end is after the largest step
                writer.step({"step": step, "loss": float(step)})
            for kind, severity, step in EVENTS:
                writer.event(kind, severity, f"{kind} message", step=step)
            writer.summary({"status": "clean"})
        publishable(run_dir)
    (init,) = fake_wandb.inits
    assert init["project"] == "risdiag" and init["name"] == "run" and init["dir"] == str(run_dir)
    assert init["config"] == {"meta.command": "c", "data.batch_size": "4"}
    assert init["settings"] == {"console": "off", "silent": True, "disable_git": True, "save_code": False,
                                "x_disable_stats": True}  # the training process looks as it did
    assert init["reinit"] == "create_new"  # one W&B run per run folder, also for a second run of the process
    logged = fake_wandb.run.logged
    assert [(s, d, c) for s, d, c in logged[:3]] == [(0, {"loss/total": 0.0}, True), (5, {"loss/total": 5.0}, True),
                                                      (2, {"loss/total": 2.0}, True)]
    step, media, _ = logged[3]
    assert step == 6 and len(logged) == 4
    columns = ("step", "kind", "severity", "message")
    assert media["incidents"] == ("table", columns, [[3, "nonfinite_loss", "error", "nonfinite_loss message"],
                                                     [4, "gradient_spike", "warning", "gradient_spike message"]])
    assert media["findings"] == ("table", columns, [[5, "finding", "info", "finding message"],
                                                    [6, "precision_audit", "info", "precision_audit message"]])
    assert media["figures/a_grad"] == ("image", "a_grad.png") and media["figures/b_loss"] == ("image", "b_loss.png")
    assert media["capsules"] == ("table", ("capsule",), [["run/capsules/step_3.pt"]])
    files = Path(fake_wandb.run.dir)
    assert sorted(p.name for p in files.iterdir()) == ["events.jsonl", "report.md", "summary.json"]


def test_wandb_bare_run_logs_nothing_at_the_end_and_uses_wandb_dir(tmp_path, fake_wandb, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wd" / "nested"))
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    with open_sinks(wandb=True):
        run_folder(tmp_path / "run", events=[("run_start", "info", None)], steps=0)
        (tmp_path / "run" / "figures").mkdir()
        (tmp_path / "run" / "capsules").mkdir()
    (init,) = fake_wandb.inits
    assert init["dir"] == str(tmp_path / "wd" / "nested") and (tmp_path / "wd" / "nested").is_dir()
    assert init["project"] == "proj"
    assert fake_wandb.run.logged == []


def test_wandb_check_names_the_extra_when_wandb_is_missing(monkeypatch) -> None:
    from ris_stability.sinks.wandb import WandbBackend

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError) as err:
        WandbBackend().check()
    assert str(err.value) == "the wandb package is not installed: pip install 'ris-diag[wandb]'"
    assert WandbBackend("p").project == "p"


def test_wandb_end_of_a_one_step_run_is_logged_at_step_1(tmp_path, fake_wandb) -> None:
    with open_sinks(wandb=True):
        run_folder(tmp_path / "run", steps=1, events=[("nonfinite_loss", "error", 0)])
    assert [step for step, _, _ in fake_wandb.run.logged] == [0, 1]
    assert list(fake_wandb.run.logged[1][1]) == ["incidents"]
