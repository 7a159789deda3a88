"""Fault injection (issue #30): a short traced run is killed (SIGKILL) or terminated (SIGTERM) at seeded random
moments; each time the run folder must be readable, `risdiag report` must exit 0, and the step rows must
equal the steps the script completed before the kill (within the one in flight). A SIGTERM'd run is also
flushed: summary.json with status ``terminated`` and exit 143. The default suite runs two kills; the slow run
twenty (the figures in docs/reliability.md: ``pytest -m slow tests/ris_stability/test_faults.py -s``)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ris_stability import cli
from ris_stability.records import read_trace

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    signal: str
    after_steps: int
    delay_s: float
    completed: int  # steps the script finished (its own progress file)
    rows: int  # step rows in the run folder
    readable: bool
    report_code: int
    status: str | None


def kill_once(tmp_path: Path, seed: int, signame: str) -> Outcome:
    rnd = random.Random(seed)
    after, delay = rnd.randint(1, 12), rnd.uniform(0.0, 0.4)
    run_dir, ready, progress = tmp_path / "run", tmp_path / "ready", tmp_path / "progress"
    env = {**os.environ, "RIS_TEST_PROGRESS": str(progress),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ris_stability.cli", "trace", "--no-live", "--out", str(run_dir), "--",
           "python", str(SCRIPTS / "long_train.py"), str(ready), str(after), "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"the traced script did not reach step {after}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    time.sleep(delay)  # a random moment: mid-step, mid-row, between steps
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=300)
    completed = len(progress.read_text().split()) if progress.exists() else 0
    try:
        rows, readable = len(read_trace(run_dir).steps), True
    except Exception as exc:  # the suite counts unreadable folders instead of stopping at the first
        rows, readable = -1, False
        print(f"unreadable: {type(exc).__name__}: {exc}")
    code = cli.main(["report", str(run_dir), "--out", str(tmp_path / "report" / "report.md")])
    summary = run_dir / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    if signame == "SIGTERM":
        assert proc.returncode == 143, err[-3000:]
    return Outcome(signame, after, round(delay, 3), completed, rows, readable, code, status)


def check(o: Outcome) -> None:
    assert o.readable and o.report_code == 0, o
    assert abs(o.rows - o.completed) <= 1, o  # the one step in flight may or may not have its row
    if o.signal == "SIGTERM":
        assert o.status == "terminated", o


@pytest.mark.parametrize("seed,signame", [(1, "SIGKILL"), (2, "SIGTERM")], ids=["sigkill", "sigterm"])
def test_a_killed_traced_run_leaves_a_readable_folder(tmp_path, seed, signame):
    check(kill_once(tmp_path, seed, signame))


@pytest.mark.slow
def test_twenty_seeded_kills(tmp_path):
    outcomes = []
    for seed in range(20):
        signame = "SIGKILL" if seed % 2 == 0 else "SIGTERM"
        outcomes.append(kill_once(tmp_path / f"kill{seed}", 100 + seed, signame))
    print("\nsignal   after  delay_s  completed  rows  readable  report  status")
    for o in outcomes:
        print(f"{o.signal:8} {o.after_steps:5}  {o.delay_s:7}  {o.completed:9}  {o.rows:4}  {o.readable!s:8}  "
              f"{o.report_code:6}  {o.status}")
    lost = sum(max(0, o.completed - 1 - o.rows) for o in outcomes)
    print(f"kills {len(outcomes)}, unreadable folders {sum(not o.readable for o in outcomes)}, report failures "
          f"{sum(o.report_code != 0 for o in outcomes)}, complete rows lost {lost}")
    for o in outcomes:
        check(o)
