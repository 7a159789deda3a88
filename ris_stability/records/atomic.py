"""Atomic artefacts: a file of a run folder (summary.json, finding.json, report.md, figures, capsules, Parquet) is
written under a temporary name next to it and renamed into place, so a kill, a crash or a full disk never leaves
a half-written file that a later command would trust; on failure the temporary file is removed."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_name(path: Path) -> Path:
    """``.NAME.PID.tmp`` beside ``path``: hidden from the folder's globs (``step_*.pt``, ``*.png``), one per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on a clean exit it becomes ``p`` in one rename."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = ["atomic_path", "temporary_name", "write_text_atomic"]
