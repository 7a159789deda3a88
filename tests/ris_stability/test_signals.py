"""Termination signals flush a traced run as Ctrl-C does (issue #30): SIGTERM (and SIGUSR1 with --flush-on)
end the script, and the run folder gets its summary (status ``terminated``) and report, with exit 128 + N; a
script's own SIGTERM handler is left to it; a second signal is handled as without the toolkit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ris_stability.records import read_trace

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]


def start(tmp_path: Path, *options: str, script_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path, Path]:
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ris_stability.cli", "trace", "--no-live", "--out", str(run_dir), *options, "--",
           "python", str(SCRIPTS / "long_train.py"), str(ready), "4", "100000", *script_args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, run_dir, ready


def wait_for(proc: subprocess.Popen, path: Path, limit_s: float = 240.0) -> None:
    """Until ``path`` exists (the script's 4th step is done); a process that ended first fails the test."""
    end = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the traced script ended before its 4th step: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the traced script did not reach its 4th step")
        time.sleep(0.05)


@pytest.mark.parametrize("signame,options", [("SIGTERM", ()), ("SIGUSR1", ("--flush-on", "SIGUSR1"))],
                         ids=["sigterm", "sigusr1-flush-on"])
def test_a_signalled_trace_is_flushed_as_terminated_with_a_report(tmp_path, signame, options):
    proc, run_dir, ready = start(tmp_path, *options)
    wait_for(proc, ready)
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "terminated"
    assert (run_dir / "report.md").is_file()
    t = read_trace(run_dir)
    assert len(t.steps) >= 4 and len(t.steps) == summary["steps"]  # every completed step has its row
    assert f"{signame} received" in err and "Traceback" not in err


def test_a_scripts_own_sigterm_handler_is_kept(tmp_path):
    proc, run_dir, ready = start(tmp_path, "--no-report", script_args=("--own-handler",))
    wait_for(proc, ready)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "own handler: stopped cleanly" in out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "clean"


def test_a_signal_during_the_flush_lets_it_finish_and_a_second_is_handled_as_without_the_toolkit():
    """Once the script has ended, a first signal asks for the flush already under way: it goes on (and waits
    on other ranks end, asked_to_end). A second signal gets the handling it has without the toolkit: the
    default action (the process ends by the signal), or the handler that was installed before ours."""
    code = ("import os, signal, sys, time\n"
            "from ris_stability.attach.signals import FlushOnSignals, asked_to_end\n"
            "if sys.argv[1] == 'outer':\n"
            "    signal.signal(signal.SIGTERM, lambda *a: (print('outer handler', flush=True), os._exit(7)))\n"
            "with FlushOnSignals([signal.SIGTERM]) as s:\n"
            "    s.flushing()\n"
            "    assert not asked_to_end()\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    print('flush went on', asked_to_end(), flush=True)\n"
            "    if sys.argv[1] != 'once':\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(60)\n"
            "print('done', asked_to_end())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, timeout=120)

    once = run("once")
    assert once.returncode == 0, once.stderr
    assert once.stdout.split("\n")[:2] == ["flush went on True", "done False"]
    assert "SIGTERM received while the run is being written" in once.stderr
    twice = run("twice")
    assert twice.returncode == -signal.SIGTERM and twice.stdout == "flush went on True\n"
    outer = run("outer")
    assert outer.returncode == 7 and outer.stdout == "flush went on True\nouter handler\n"


def test_handlers_are_installed_only_for_the_run():
    from ris_stability.attach.signals import FlushOnSignals, signal_numbers

    before = signal.getsignal(signal.SIGTERM)
    with FlushOnSignals(signal_numbers(["SIGTERM", "USR1"])):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ValueError, match="--flush-on 'SIGKILL'"):
        signal_numbers(["SIGKILL"])


def test_a_python_handler_is_put_back_exactly_and_one_installed_outside_python_is_left_alone(monkeypatch):
    from ris_stability.attach import signals as sig

    def own(signum, frame):  # the script's own handler, installed before the run
        pass

    previous = signal.signal(signal.SIGUSR1, own)
    try:
        with sig.FlushOnSignals([signal.SIGUSR1]):
            assert signal.getsignal(signal.SIGUSR1) is not own
        assert signal.getsignal(signal.SIGUSR1) is own
        real = signal.getsignal  # a handler installed from C reads as None: Python could never restore it
        monkeypatch.setattr(sig.signal, "getsignal", lambda n: None if n == signal.SIGUSR1 else real(n))
        with sig.FlushOnSignals([signal.SIGUSR1]):
            assert real(signal.SIGUSR1) is own  # not replaced
        assert real(signal.SIGUSR1) is own
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_every_handler_installed_is_put_back_when_installing_fails_midway(monkeypatch):
    from ris_stability.attach import signals as sig

    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1)}
    real = signal.signal

    def failing(signum, handler):  # the second install is interrupted (e.g. Ctrl-C at that moment)
        if signum == signal.SIGUSR1 and handler not in before.values():
            raise KeyboardInterrupt
        return real(signum, handler)

    monkeypatch.setattr(sig.signal, "signal", failing)
    with pytest.raises(KeyboardInterrupt):
        with sig.FlushOnSignals([signal.SIGTERM, signal.SIGUSR1]):
            pass
    assert {n: signal.getsignal(n) for n in before} == before  # SIGTERM's handler is ours no more


def test_a_signal_during_a_read_point_takes_effect_once_every_taken_row_is_written():
    """A SIGTERM that arrives while a read point writes its rows (here: inside the first row's function) waits
    until every part taken off the queue has run; then the run ends with Terminated, and nothing is half done."""
    import torch

    from ris_stability.attach.signals import FlushOnSignals, Terminated
    from ris_stability.monitor.readback import ReadBack

    reads, done = ReadBack(), []

    def first(values):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode: inside the read point
        done.append(("first", values))

    reads.add(torch.tensor([1.0]), first)
    reads.add(torch.tensor([2.0, 3.0]), lambda values: done.append(("second", values)))
    with FlushOnSignals([signal.SIGTERM]):
        with pytest.raises(Terminated):
            reads.read()
    assert done == [("first", [1.0]), ("second", [2.0, 3.0])] and len(reads) == 0


def test_outside_a_read_point_the_signal_acts_at_once():
    from ris_stability.attach.signals import FlushOnSignals, Terminated
    from ris_stability.observe.critical import critical

    seen = []
    with FlushOnSignals([signal.SIGTERM]):
        with pytest.raises(Terminated):
            with critical():
                seen.append("in")
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("after")  # not reached: the signal ended the block at once
    assert seen == ["in"]
