"""Workers: processes that claim trials of one batch (see claims.py) until it holds ``--trials``.

``--workers W`` starts W processes of this machine (each a ``risdiag sweep --workers 1`` of the same
batch) and watches them: a worker that dies -- killed by any signal, out of memory, or an exit code other
than 0 -- is reported at once, its running trial marked FAIL with the reason (and the trial's own process,
for a script sweep, ended), and the command exits non-zero; the surviving workers claim the trials it would
have run. The same command with the same storage on another machine is another batch in the same study
(Optuna's TPE sees every finished trial, whichever worker ran it). Each trial keeps a heartbeat; before
each trial a worker fails the trials of dead workers elsewhere (storage.fail_stale).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import optuna

from ris_stability.sweep.claims import WORKER_ATTR, claim, heartbeat
from ris_stability.sweep.storage import fail_stale, fail_trial

log = logging.getLogger(__name__)

POLL_S = 0.2
EXIT_WORKER_LOST = 1  # a worker died or exited with an error: some trial failed or was not run
EXIT_USAGE = 2  # a worker stopped on a usage error (e.g. the metric missing from a finished trial)


def run_worker(study: optuna.Study, run_trial: Callable[[optuna.Trial], None], batch: str, goal: int,
               folder: Path, seed: int | None, make_sampler: Callable[[int | None], optuna.samplers.BaseSampler]) -> int:
    """Claim and run trials of ``batch`` in this process until it holds ``goal``; the number run here."""
    ran = 0
    while True:
        fail_stale(study)
        trial = claim(study, batch, goal, folder, seed, make_sampler)
        if trial is None:
            return ran
        with heartbeat(study, trial):
            run_trial(trial)
        ran += 1


def signal_name(code: int) -> str:
    """``SIGKILL (signal 9)`` for a Popen return code -9."""
    try:
        return f"{signal.Signals(-code).name} (signal {-code})"
    except ValueError:
        return f"signal {-code}"


def death_reason(pid: int, code: int) -> str:
    if code < 0:
        hint = "; the kernel's out-of-memory killer sends it too (see dmesg)" if code == -signal.SIGKILL else ""
        return f"its worker (pid {pid}) was killed by {signal_name(code)} during this trial{hint}"
    return f"its worker (pid {pid}) exited with code {code} during this trial (see the sweep's log)"


def _end_trial_process(pid: int | None) -> None:
    """The script trial a dead worker started (our grandchild, by its recorded pid) is ended too."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return  # already gone (it also stops by itself at its next step once its parent is gone)


def fail_orphans(study: optuna.Study, pid: int, code: int) -> list[int]:
    """Mark the RUNNING trials of worker ``pid`` FAIL with the reason; returns their numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(WORKER_ATTR) == pid:
            _end_trial_process(t.user_attrs.get("trial_pid"))
            if fail_trial(study, t, death_reason(pid, code)):
                failed.append(t.number)
    return failed


def launch(commands: Sequence[list[str]], load_study: Callable[[], optuna.Study]) -> int:
    """Start one worker process per command and wait for all; 0 when every worker exited 0."""
    procs = [subprocess.Popen(cmd) for cmd in commands]
    log.info("started %d worker processes: pids %s", len(procs), [p.pid for p in procs])
    code = 0
    running = list(procs)
    try:
        while running:
            for p in list(running):
                rc = p.poll()
                if rc is None:
                    continue
                running.remove(p)
                if rc == 0:
                    continue
                code = max(code, EXIT_USAGE if rc == EXIT_USAGE else EXIT_WORKER_LOST)
                failed = fail_orphans(load_study(), p.pid, rc)
                how = f"was killed by {signal_name(rc)}" if rc < 0 else f"exited with code {rc}"
                log.error("worker pid %d %s; %s; %s", p.pid, how,
                          f"its trial(s) {failed} marked FAIL" if failed else "it was running no trial",
                          f"{len(running)} other worker(s) take over its remaining trials" if running else
                          "no other worker is left to run its remaining trials")
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for p in procs:  # our own children, by pid: their running trials fail by heartbeat
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    return code


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``risdiag`` with ``argv`` in a fresh interpreter (same Python, same path)."""
    return [sys.executable, "-m", "ris_stability.cli", *argv]


__all__ = ["EXIT_WORKER_LOST", "death_reason", "fail_orphans", "launch", "run_worker", "signal_name", "worker_command"]
