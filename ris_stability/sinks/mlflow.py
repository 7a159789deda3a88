"""MLflow sink: one MLflow run per run folder with metrics, params and the report as artifacts.

The tracking server is MLflow's usual choice: ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db``,
or a file store), the experiment ``MLFLOW_EXPERIMENT_NAME`` or "risdiag". Params are the run's resolved
config (config.resolved.toml, flattened to dotted keys) and its metadata (command, torch, device, dtype);
metrics carry the same slash-grouped names as the TensorBoard sink, with characters MLflow rejects
replaced by '_'. Metrics are sent in batches (every ``flush_every`` steps and at the end), so a step pays
no round trip to the server. Needs the ``mlflow`` package (extra ``ris-diag[mlflow]``).

A sink never holds training: every call of this sink runs with MLflow's HTTP retries off and a
``REQUEST_TIMEOUT_S`` timeout (MLflow's own defaults, 7 retries with exponential backoff and 120 s, cost
~255 s per call to a dead server), and the first failure stops the backend (one warning; later runs of the
command do not try again). The user's own MLflow calls keep their settings: the variables are set only
for the duration of our calls. Store caveats: MLflow 3 refuses ``file:`` tracking URIs (use
``sqlite:///mlflow.db`` or a server), and with a ``sqlite:`` URI the artifacts (report, figures, capsules)
go to ``./mlruns`` of the working directory.
"""

from __future__ import annotations

import contextlib
import os
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ris_stability.sinks.base import markdown_event, safe_name

_MAX_PARAM = 500  # characters of one param value (MLflow's limit is larger; long values are commands)
_META_PARAMS = ("command", "torch", "device", "dtype", "config_path", "config_hash")
REQUEST_TIMEOUT_S = 3  # seconds per HTTP request of this sink (MLflow's default: 120)
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}


class MLflowUnavailable(RuntimeError):
    """An earlier call of this sink failed: the backend makes no more attempts in this command."""


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests in the block: no retry, a short timeout (the previous values are restored)."""
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class QuickClient:
    """An MlflowClient whose every call runs under ``quick_requests``; after one failure every call raises
    MLflowUnavailable at once (no second wait on a dead server)."""

    def __init__(self, client: Any):
        self._client, self.failed = client, ""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        if not callable(method):  # a plain attribute (e.g. tracking_uri): no call to guard
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                raise MLflowUnavailable(f"MLflow is not used for the rest of this command: {self.failed}")
            try:
                with quick_requests():
                    return method(*args, **kwargs)
            except Exception as exc:  # noted, then re-raised: the sink set turns it into its one warning
                self.failed = f"{type(exc).__name__} in {name}"
                raise
        return call


def flat_params(table: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


class MLflowRun:
    def __init__(self, client: Any, run_id: str, flush_every: int):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._metrics: list[Any] = []
        self._incidents: list[str] = []
        self._steps = 0

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(safe_name(k), v, now, step) for k, v in scalars.items())
        self._steps += 1
        if self._steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])

    def event(self, record: Mapping[str, Any]) -> None:
        if record.get("severity") in ("warning", "error") or record.get("kind") == "finding":
            self._incidents.append(markdown_event(record))

    def publish(self, run_dir: Path) -> None:
        self.flush()
        if self._incidents:
            self.client.log_text(self.run_id, "\n\n".join(self._incidents) + "\n", "incidents.md")
        for name in ("report.md", "summary.json", "events.jsonl", "finding.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for folder in ("figures", "capsules"):
            if (run_dir / folder).is_dir() and any((run_dir / folder).iterdir()):
                self.client.log_artifacts(self.run_id, str(run_dir / folder), artifact_path=folder)

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_tag(self.run_id, "risdiag.status", status)
        self.client.set_terminated(self.run_id, status="FAILED" if status == "crashed" else "FINISHED")


class MLflowBackend:
    name = "mlflow"

    def __init__(self, experiment: str | None = None, flush_every: int = 20):
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "risdiag"
        self.flush_every = flush_every
        self.client: Any = None
        self.experiment_id = ""

    def check(self) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError("the mlflow package is not installed: pip install 'ris-diag[mlflow]'") from exc
        self.client = QuickClient(MlflowClient())  # MLFLOW_TRACKING_URI, as every MLflow user has it set
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else ""

    def open_run(self, run_dir: Path, meta: Mapping[str, Any]) -> MLflowRun:
        from mlflow.entities import Param

        if not self.experiment_id:  # a database store would put artifacts in ./mlruns of the cwd: beside the runs
            where = None if self.client.tracking_uri.startswith("file:") else \
                (run_dir.resolve().parent / "mlflow-artifacts").as_uri()
            self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=where)
        run = self.client.create_run(self.experiment_id, run_name=run_dir.name,
                                     tags={"risdiag.run_folder": run_dir.name})
        params = {f"meta.{k}": str(meta[k])[:_MAX_PARAM] for k in _META_PARAMS if meta.get(k) is not None}
        resolved = run_dir / "config.resolved.toml"
        if resolved.is_file():
            params.update(flat_params(tomllib.loads(resolved.read_text(encoding="utf-8"))))
        items = [Param(safe_name(k), v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch param limit
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return MLflowRun(self.client, run.info.run_id, self.flush_every)


__all__ = ["MLflowBackend", "MLflowRun", "MLflowUnavailable", "QuickClient", "REQUEST_TIMEOUT_S", "flat_params",
           "quick_requests"]
