"""What a sweep trains: the target protocol and how a target is named on the command line.

A target turns a trial's parameters (dotted config keys -> values) into one traced run. It is built by a
factory ``factory(config, overrides, steps) -> SweepTarget`` named ``module:function`` or
``path/to/file.py:function``; the default is the showcase pipeline's (``ris_stability.integrations.ris:sweep_target``).
The sweep package itself knows nothing of any model, config format or training loop.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from ris_stability.records import UsageError

DEFAULT_TARGET = "ris_stability.integrations.ris:sweep_target"


class SweepTarget(Protocol):
    """The contract between the generic sweep and a training pipeline."""

    name: str  # short label for run folders and reports
    metrics: tuple[str, ...]  # the validation metrics run() returns (--metric is checked against them up front)

    def check(self, key: str, value: Any) -> None:
        """Raise UsageError (naming ``key``) when ``key=value`` is not a valid override of the config."""

    def run(self, params: Mapping[str, Any], run_dir: Path, hooks: Any) -> Mapping[str, float]:
        """Train with ``params`` applied, traced into ``run_dir`` by a StabilityMonitor whose listeners include
        ``hooks.observe``; call ``hooks.on_step_end(ctx)`` after the monitor's step end (ctx offers
        ``request_stop``) and ``hooks.report(step, metrics, ctx)`` after each validation. Return the final
        validation metrics (name -> value)."""

    def resolved_toml(self, params: Mapping[str, Any]) -> str:
        """The full configuration with ``params`` applied, as TOML ready for ``risdiag trace --config``."""


TargetFactory = Callable[[str, Sequence[str], "int | None"], SweepTarget]


def _module(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"--target {spec!r}: file {module_name!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"_risdiag_target_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UsageError(f"--target {spec!r}: cannot import {module_name!r} ({err}); check PYTHONPATH or pass "
                         "path/to/file.py:function") from None


def load_target(spec: str, config: str, overrides: Sequence[str], steps: int | None) -> SweepTarget:
    """Build the target named ``spec`` ("module:function" or "file.py:function")."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--target {spec!r}: expected module:function or path/to/file.py:function")
    factory = getattr(_module(spec, module_name), attr, None)
    if not callable(factory):
        raise UsageError(f"--target {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory(config, list(overrides), steps)
