"""An MLflow tracking server that is down never holds the run: the sink's requests go out once each,
without MLflow's retries (7 by default, ~255 s of backoff per call), and the first failure stops the sink
with one warning. Counted in connection attempts, not seconds."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from ris_stability.records import TraceWriter
from ris_stability.sinks import open_sinks
from ris_stability.sinks.mlflow import MLflowUnavailable, QuickClient


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_dead_mlflow_server_costs_one_attempt_and_one_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import urllib3.util.connection as connection

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    # The user's own MLflow settings: many retries, no backoff (so a sink that retried would fail this test
    # quickly, by its count, instead of waiting). The sink keeps them for the user's calls and restores them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    attempts: list[tuple] = []
    real = connection.create_connection

    def counting(address, *args, **kwargs):
        attempts.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(connection, "create_connection", counting)
    with caplog.at_level(logging.WARNING, logger="ris_stability.sinks"):
        with open_sinks(mlflow=True):
            with TraceWriter(tmp_path / "run", {"command": "test"}) as writer:
                for step in range(30):
                    writer.step({"step": step, "loss": 1.0 / (step + 1)})
                writer.summary({"steps": 30, "status": "clean"})
    assert 1 <= len(attempts) <= 2, attempts  # MLflow's defaults would make 8 per call
    warnings = [r.getMessage() for r in caplog.records if "mlflow sink disabled" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # the user's setting is back
    assert (tmp_path / "run" / "steps.jsonl").read_text().count("\n") == 30  # the run folder is complete


def test_quick_client_makes_no_second_attempt_after_a_failure() -> None:
    calls: list[str] = []

    class Flaky:
        def log_batch(self, *args, **kwargs):
            calls.append(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
            raise ConnectionError("connection refused")

    client = QuickClient(Flaky())
    with pytest.raises(ConnectionError):
        client.log_batch("run")
    with pytest.raises(MLflowUnavailable, match="ConnectionError in log_batch"):
        client.log_batch("run")
    assert calls == ["0"]  # one attempt, made with MLflow's retries off
