"""Output folders a command is told to write into, checked before any slow work: one line (exit 2) that names
the option, the folder and why it cannot be written, with the next step."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ris_stability.records.schema import UsageError


def writable_folder(path: str | Path, option: str, hint: str) -> Path:
    """``path`` created (with parents) and proven writable, else a UsageError naming ``option``; ``hint``: what
    to pass instead."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a probe of this call's own (the ranks of a data-parallel run check the same --out at the same time)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{option} {str(folder)!r}: cannot write there ({err.strerror or err}); {hint}") from None
    return folder


def run_folder(out: str | None, stem: str) -> Path:
    """``--out`` when given, else ``runs/<stem>-<time>``; checked with :func:`writable_folder`."""
    path = Path(out) if out else Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return writable_folder(path, "--out", "choose a writable folder, e.g. --out runs/my-run")


__all__ = ["run_folder", "writable_folder"]
