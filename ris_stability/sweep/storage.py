"""Optuna storages shared by workers: RDB URLs with heartbeats, the study and the sweep's own settings.

Any SQLAlchemy URL Optuna accepts works: ``sqlite:///runs/sweep.db`` for the workers of one machine,
``postgresql://user:pass@db-host/optuna`` or ``mysql+pymysql://user:pass@db-host/optuna`` for workers on
several machines. Every worker beats a heartbeat while it runs a trial; a trial whose heartbeat is older
than the grace period (its worker was killed) is marked FAIL by the next worker that looks, so a dead
worker never leaves the study stuck.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.storages import RDBStorage, fail_stale_trials
from sqlalchemy.exc import SQLAlchemyError

from ris_stability.records import UsageError

log = logging.getLogger(__name__)

SWEEP_ATTR = "risdiag_sweep"  # study user attribute holding the sweep's settings (target, config, space)
GRACE_BEATS = 3  # a trial is stale after this many missed heartbeats
SQLITE_TIMEOUT_S = 60  # several processes share one SQLite file: wait for its lock instead of failing


def open_storage(url: str, heartbeat_s: int = 10) -> RDBStorage:
    """An RDBStorage for ``url`` with heartbeats every ``heartbeat_s`` seconds."""
    if heartbeat_s < 1:
        raise UsageError(f"--heartbeat {heartbeat_s}: must be >= 1 second")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(f"--storage {url!r}: cannot create {path.parent} ({err.strerror or err})") from None
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9; we rely on them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                              grace_period=GRACE_BEATS * heartbeat_s, heartbeat_stale_trial_callback=_lost_worker)
    except (ImportError, ValueError, SQLAlchemyError) as err:
        raise UsageError(f"--storage {url!r}: cannot open it ({type(err).__name__}: {err}); expected an SQLAlchemy "
                         "URL such as sqlite:///runs/sweep.db or postgresql://user:pass@host/db (with its driver "
                         "installed)") from None


def load_study(storage: RDBStorage, name: str, **kwargs: Any) -> optuna.Study:
    """An existing study, or a UsageError listing the studies the storage holds."""
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise UsageError(f"study {name!r} is not in the storage; it holds: {', '.join(names) or 'no study'}. "
                         "Start it with risdiag sweep --study NAME") from None


def check_settings(study: optuna.Study, settings: Mapping[str, Any]) -> None:
    """Store the sweep's settings on a new study; refuse to join a study that runs something else."""
    stored = study.user_attrs.get(SWEEP_ATTR)
    if stored is None:
        study.set_user_attr(SWEEP_ATTR, dict(settings))
        return
    for key in ("target", "space", "metric", "direction"):
        if stored.get(key) != settings.get(key):
            raise UsageError(f"study {study.study_name!r} was created with another {key} ({stored.get(key)!r}, this "
                             f"command: {settings.get(key)!r}); join it with the same command or choose another --study")


def _lost_worker(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    log.warning("trial %d of study %s: its worker stopped beating (killed?); marked FAIL", trial.number,
                study.study_name)


def fail_stale(study: optuna.Study) -> None:
    """Mark trials whose worker stopped beating (killed, machine lost) as FAIL."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9; the sweep depends on it deliberately
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
