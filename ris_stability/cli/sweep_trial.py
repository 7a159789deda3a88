"""The process of one script trial: ``risdiag trace --out TRIALDIR -- COMMAND`` plus the sweep's ear.

``python -m ris_stability.cli.sweep_trial SPEC.json -- python train.py --lr 0.01`` is what a sweep worker
starts for each trial of a script sweep (see ``ris_stability.sweep.script_trial``): the user's command runs
exactly as under ``risdiag trace`` (unmodified, in this process, the monitor attached by hooks, the trace
and report in the trial's run folder, the summary on stderr), with a ``sweep.trial_ear.TrialEar`` added to
the trace writer (``sinks.also_listen``) and to ``report_metric``. The outcome goes to ``SPEC["result"]``
as JSON for the worker, which owns the trial's state in the storage. Exit 0, or 2 when the rendered
command cannot run at all.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from ris_stability.cli.logs import CLI_LOGGING
from ris_stability.records import UsageError
from ris_stability.sweep.metrics import add_handler
from ris_stability.sweep.pruning import StabilityRules
from ris_stability.sweep.trial_ear import TrialEar

log = logging.getLogger(__name__)


def _optuna_trial(spec: Mapping[str, Any]) -> Any:
    """The running trial in the storage, with the study's median pruner (None when the spec has no storage)."""
    if not spec.get("storage"):
        return None
    import optuna

    from ris_stability.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"], spec["heartbeat_s"]),
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=spec["startup_trials"]))
    return optuna.trial.Trial(study, spec["trial_id"])


def run(spec: Mapping[str, Any], argv: list[str]) -> int:
    """Trace ``argv`` into ``spec["run_dir"]`` with the trial's ear; write the result file."""
    from rich.console import Console

    from ris_stability.attach.script import trace_script
    from ris_stability.cli.script_summary import report_to
    from ris_stability.sinks import open_sinks
    from ris_stability.sinks.base import also_listen

    ear = TrialEar(spec["metric"], StabilityRules(**spec["rules"]), _optuna_trial(spec), spec.get("parent_pid"),
                   spec.get("report_every", 1))
    remove = add_handler(ear.on_metric)
    err = Console(file=sys.stderr, soft_wrap=True)
    out: dict[str, Any] = {}
    code = 0
    try:
        with open_sinks(tensorboard=spec.get("tensorboard"), mlflow=spec.get("mlflow", False)), \
                also_listen(lambda run_dir, meta: ear):
            traced = trace_script(argv, spec["run_dir"], on_nonfinite=spec.get("on_nonfinite", "skip"))
            report_to(traced, err, err, report=spec.get("reports", True))
        w = traced.watcher
        out = {"code": traced.code, "status": w.status, "steps": w.steps, "message": traced.message,
               "error": f"{type(traced.error).__name__}: {traced.error}" if traced.error is not None else ""}
    except UsageError as exc:  # the rendered command cannot run (e.g. a placeholder made a missing path)
        log.error("the trial's command cannot run: %s", exc)
        out, code = {"code": 2, "status": "usage", "error": f"{type(exc).__name__}: {exc}"}, 2
    finally:
        remove()
        out.update(ear.result())
        Path(spec["result"]).write_text(json.dumps(out, allow_nan=True, indent=1))
    return code


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: python -m ris_stability.cli.sweep_trial SPEC.json -- COMMAND...\n")
        return 2
    from rich.console import Console

    CLI_LOGGING.install(logging.WARNING, Console(stderr=True))  # the toolkit's loggers only: the script's are its own
    try:
        spec = json.loads(Path(args[0]).read_text())
        return run(spec, args[2:])
    finally:
        CLI_LOGGING.remove()


if __name__ == "__main__":
    sys.exit(main())
