"""Optuna sweeps that know about stability (needs the optional ``[sweep]`` extra: optuna).

Two forms: a script sweep (``risdiag sweep ... -- python train.py --lr {lr}``) and a config sweep
(``--config C [--target T]``). One idea per file:

space.py (search-space files), template.py (a script's command template), metrics.py (where the objective
comes from; ``report_metric``), pruning.py (stability verdicts from the monitor's rows and events, no
Optuna), target.py (a config sweep's target protocol), trial.py (one in-process trial of a target; telling
the study), script_trial.py (one script trial, the worker's side), trial_ear.py (one script trial, the
traced process's side: the in-script pruner), claims.py (which worker runs the next trial; sampler seeds;
heartbeats), storage.py (RDB storages, settings checked on join), workers.py (processes, dead workers),
command.py (`risdiag sweep`: checks, study, workers), report.py / map.py (`risdiag report --sweep`).
"""

from ris_stability.sweep.pruning import StabilityRules, StabilityWatch, Verdict
from ris_stability.sweep.space import Param, SearchSpace, SpaceError, load_space, parse_space

__all__ = ["Param", "SearchSpace", "SpaceError", "StabilityRules", "StabilityWatch", "Verdict", "load_space",
           "parse_space"]
