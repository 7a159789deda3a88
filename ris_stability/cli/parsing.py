"""The argument parsing of `risdiag`: one-line usage errors (exit 2), validating number types, and the
exit-code line at the end of every command's --help."""

from __future__ import annotations

import argparse
from typing import Any, Callable

EXIT_USAGE = 2

# The exit-code line of each command's --help (a command added later gets the general line).
EXIT_CODES = {
    "risdiag": "exit codes: 0 success, 1 non-finite steps / misaligned config, 2 usage error, 3 capsule not "
               "reproduced, 4 traced script raised (see each command's --help)",
    "trace": "exit codes: 0 clean run, 1 non-finite steps occurred, 2 usage error (one line, no traceback), "
             "4 the traced script raised (its traceback is shown)",
    "bisect": "exit codes: 0 finding located (or precision audited), 2 usage error (bad path, corrupted capsule), "
              "3 the capsule does not reproduce its non-finite step",
    "report": "exit codes: 0 report written, 2 usage error (not a run folder, unknown study)",
    "compare": "exit codes: 0 comparison written, 2 usage error (not a run folder, bad labels)",
    "align": "exit codes: 0 loss and inference consume the same matrices, 1 misaligned, 2 usage error",
    "sweep": "exit codes: 0 study run, 2 usage error (bad config or space), otherwise the worst worker's code",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2; subparsers inherit it.
    Every parser's help ends with its command's exit codes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.epilog is None:
            name = self.prog.split()[-1]
            self.epilog = EXIT_CODES.get(name, EXIT_CODES["risdiag"])

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _checked(cast: Callable[[str], Any], noun: str, ok: Callable[[Any], bool], rule: str):
    """argparse type: ``cast(text)`` that satisfies ``ok``, else one line naming ``rule``; every numeric option
    uses one, so a bad value exits 2 at parse time."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{noun} {rule}"
    return parse


def _int_at_least(low: int):
    """argparse type: an integer >= low."""
    return _checked(int, "an integer", lambda v: v >= low, f">= {low}")


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def _float_above(low: float):
    """argparse type: a finite number > low."""
    return _checked(float, "a number", lambda v: low < v < float("inf"), f"a finite number > {low:g}")


__all__ = ["EXIT_CODES", "nonnegative_int", "positive_int"]
