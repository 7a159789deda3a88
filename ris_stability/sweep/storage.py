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


def check_url(url: str, create: bool = True) -> None:
    """Refuse a storage URL before anything is made: unparsable, a missing driver, or (``create=False``,
    e.g. ``risdiag report --sweep``) an SQLite file that does not exist."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (NoSuchModuleError, ImportError) as err:  # NoSuchModuleError is an ArgumentError: first
        raise UsageError(f"--storage {url!r}: no SQLAlchemy dialect or driver for it ({err}); install the driver "
                         "(e.g. psycopg2-binary, pymysql) or use sqlite:///PATH") from None
    except (ArgumentError, ValueError) as err:
        raise UsageError(f"--storage {url!r}: not a database URL ({err}); expected e.g. sqlite:///runs/sweep.db or "
                         "postgresql://user:pass@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") and not create:
        if not Path(parsed.database).is_file():
            raise UsageError(f"--storage {url!r}: no such SQLite file {parsed.database!r} (working directory "
                             f"{Path.cwd()}); nothing was created. Check the path given to risdiag sweep --storage")


def open_storage(url: str, heartbeat_s: int = 10, create: bool = True) -> RDBStorage:
    """An RDBStorage for ``url`` with heartbeats every ``heartbeat_s`` seconds. ``create=False``: never make
    a file or folder (an SQLite file must exist)."""
    if heartbeat_s < 1:
        raise UsageError(f"--heartbeat {heartbeat_s}: must be >= 1 second")
    check_url(url, create)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if create and str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(f"--storage {url!r}: cannot create {path.parent} ({err.strerror or err})") from None
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        # heartbeats are "experimental" since Optuna 2.9; we rely on them (the filter ends with the block)
        with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
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


# The settings that change what a trial computes: a worker joining with any other value is refused.
RESULT_KEYS = ("target", "config_sha256", "overrides", "steps", "command", "space", "metric", "direction", "rules",
               "startup_trials", "report_every")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_settings(study: optuna.Study, settings: Mapping[str, Any]) -> None:
    """Store the sweep's settings on a new study; refuse to join a study that computes something else."""
    stored = study.user_attrs.get(SWEEP_ATTR)
    if stored is None:
        study.set_user_attr(SWEEP_ATTR, dict(settings))
        return
    differ = [k for k in RESULT_KEYS if stored.get(k) != settings.get(k)]
    if differ:
        what = "; ".join(f"{k}: study {_shown(stored.get(k))}, this command {_shown(settings.get(k))}" for k in differ)
        raise UsageError(f"study {study.study_name!r} was created with other settings ({what}); join it with the same "
                         "settings or choose another --study")


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL now, with ``reason`` as its ``error`` attribute; False if it already ended."""
    storage = study._storage  # Optuna keeps the storage here; Study exposes no public accessor
    try:
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        storage.set_trial_user_attr(trial._trial_id, "status", "failed")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    log.error("trial %d of study %s marked FAIL: %s", trial.number, study.study_name, reason)
    return True


def _lost_worker(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    log.warning("trial %d of study %s: its worker stopped beating (killed?); marked FAIL", trial.number,
                study.study_name)


def fail_stale(study: optuna.Study) -> None:
    """Mark trials whose worker stopped beating (killed, machine lost) as FAIL."""
    # "experimental" since Optuna 2.9; the sweep depends on it deliberately (the filter ends with the block)
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
        fail_stale_trials(study)
