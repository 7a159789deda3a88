"""The command template of a script sweep: ``risdiag sweep --space S.toml -- python train.py --lr {lr}``.

Each ``{name}`` in an argument is replaced by the trial's value of the space parameter ``name`` (``{{`` and
``}}`` are literal braces); every parameter is also exported to the trial's process as an environment
variable ``RISDIAG_PARAM_<NAME>`` (upper case, other characters than letters and digits as ``_``), for
scripts that read a config file. Values are written as Python writes them (``0.0123``, ``64``, ``relu``),
booleans as ``true`` / ``false``. The template is checked against the space before any trial runs: a
placeholder that is not a parameter is an error; a parameter the arguments never use is reported once (it
reaches the script through its environment variable only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ris_stability.records import UsageError

log = logging.getLogger(__name__)

ENV_PREFIX = "RISDIAG_PARAM_"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


class TemplateError(UsageError):
    """The command after ``--`` does not fit the search space (the message names the placeholder)."""


def env_name(param: str) -> str:
    """``RISDIAG_PARAM_<NAME>`` for a parameter name (``weight_decay`` -> ``RISDIAG_PARAM_WEIGHT_DECAY``)."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", param).upper()


def value_text(value: Any) -> str:
    """A parameter value as one command-line argument."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def placeholders(arg: str) -> list[str]:
    """The ``{name}`` placeholders of one argument, in order (``{{`` / ``}}`` are literal braces)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(arg) if m.group(1) is not None]


def _fill(arg: str, values: Mapping[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return values[m.group(1)]
    return _PLACEHOLDER.sub(sub, arg)


@dataclass(frozen=True)
class CommandTemplate:
    """The user's command with placeholders, e.g. ``("python", "train.py", "--lr", "{lr}")``."""

    argv: tuple[str, ...]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> "CommandTemplate":
        argv = list(argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            raise TemplateError("nothing to run after '--'; expected: risdiag sweep --space SPACE.toml [options] -- "
                                "python train.py --lr {lr}")
        for arg in argv:
            for name in placeholders(arg):
                if not _NAME.match(name):
                    raise TemplateError(f"command argument {arg!r}: placeholder {{{name}}} is not a parameter name "
                                        "(letters, digits, '_', '.', '-'); write literal braces as {{ and }}")
        return cls(tuple(argv))

    @property
    def names(self) -> list[str]:
        seen: list[str] = []
        for arg in self.argv:
            seen += [n for n in placeholders(arg) if n not in seen]
        return seen

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    def check(self, keys: Sequence[str], source: str) -> None:
        """Every placeholder must be a parameter of the space; unused parameters are logged once."""
        missing = [n for n in self.names if n not in keys]
        if missing:
            raise TemplateError(f"command {self.text!r}: placeholder {{{missing[0]}}} is not a parameter of the space "
                                f"file {source} (its parameters: {', '.join(keys)}); add [params.{missing[0]}] to "
                                "the space or fix the placeholder")
        unused = [k for k in keys if k not in self.names]
        if unused:
            log.warning("parameter(s) %s appear in no argument of the command; the script receives them only as "
                        "environment variables (%s)", ", ".join(unused), ", ".join(env_name(k) for k in unused))

    def render(self, params: Mapping[str, Any]) -> list[str]:
        """The command of one trial."""
        values = {k: value_text(v) for k, v in params.items()}
        return [_fill(arg, values) for arg in self.argv]

    def env(self, params: Mapping[str, Any]) -> dict[str, str]:
        return {env_name(k): value_text(v) for k, v in params.items()}

    def script_path(self) -> Path | None:
        """The script file the command runs (``python train.py`` or ``python -m pkg.mod``), when found."""
        from ris_stability.attach.script import ScriptError, parse_command

        try:
            cmd = parse_command(self.argv)
        except ScriptError:
            return None
        if cmd.kind == "path":
            return Path(cmd.target)
        import importlib.util
        import os
        import sys

        saved = list(sys.path)
        sys.path.insert(0, os.getcwd())
        try:
            spec = importlib.util.find_spec(cmd.target)
        except (ImportError, ValueError):
            return None
        finally:
            sys.path[:] = saved
        return Path(spec.origin) if spec is not None and spec.origin else None


def shell_text(argv: Sequence[str]) -> str:
    """A command as one line the shell runs unchanged."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


__all__ = ["CommandTemplate", "ENV_PREFIX", "TemplateError", "env_name", "placeholders", "shell_text", "value_text"]
