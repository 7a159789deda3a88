"""The CLI's own log output: a handler on the toolkit's loggers (and the few others a command names), never on
the root logger, so a traced script that configures the root logger itself configures its own logging exactly as under
plain ``python`` (its records reach its handlers; ours reach ours)."""
from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

TOOLKIT = "ris_stability"


class CliLogging:
    """Install once per command (:meth:`install`), add loggers a command brings (:meth:`route`), remove at exit."""

    def __init__(self) -> None:
        self.handler: logging.Handler | None = None
        self._routed: dict[str, tuple[int, bool]] = {}

    def install(self, level: int, err: Console) -> "CliLogging":
        if err.is_terminal:  # records go through rich, so they print above the live dashboard, not through it
            handler: logging.Handler = RichHandler(console=err, show_path=False)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.handler = handler
        self.route(TOOLKIT, level)
        return self

    def route(self, name: str, level: int) -> None:
        """Show the records of logger ``name`` (and its children) at ``level`` and above through this CLI."""
        logger = logging.getLogger(name)
        if name not in self._routed:
            self._routed[name] = (logger.level, logger.propagate)
        logger.setLevel(level)
        logger.propagate = False  # the script's root handlers are the script's business
        if self.handler is not None and self.handler not in logger.handlers:
            logger.addHandler(self.handler)

    def remove(self) -> None:
        for name, (level, propagate) in self._routed.items():
            logger = logging.getLogger(name)
            if self.handler in logger.handlers:
                logger.removeHandler(self.handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._routed = {}


CLI_LOGGING = CliLogging()


__all__ = ["CLI_LOGGING", "CliLogging", "TOOLKIT"]
