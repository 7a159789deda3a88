"""Optuna sweeps that know about stability (needs the optional ``[sweep]`` extra: optuna).

space.py (search-space files), pruning.py (stability verdicts from the monitor's rows and events, no
Optuna), target.py (what is trained: a generic protocol), trial.py (one trial = one traced run),
storage.py (RDB storages, heartbeats), workers.py (processes), command.py (`risdiag sweep`).
"""

from ris_stability.sweep.pruning import StabilityRules, StabilityWatch, Verdict
from ris_stability.sweep.space import Param, SearchSpace, SpaceError, load_space, parse_space

__all__ = ["Param", "SearchSpace", "SpaceError", "StabilityRules", "StabilityWatch", "Verdict", "load_space",
           "parse_space"]
