"""An append-only record file that a full or failing disk cannot turn into a failed training run.

Lines go to the file descriptor with ``os.write`` (no Python buffer, so what failed to reach the file is known
to the byte). The first OSError (ENOSPC, EIO, a vanished network mount) becomes one warning; from then on
the bytes not written are kept in a bounded memory buffer and retried before each later line and at close,
so a disk that frees up gets every line, in order, with no torn or doubled line. Past the bound whole lines
are dropped and counted: :meth:`AppendFile.losses` says what was not written, for the run's summary.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 16 << 20  # memory kept for lines a failing disk refused (then whole lines are dropped)
_write = os.write  # one place for the fault-injection tests to make the disk fail


class AppendFile:
    """One append-only file of a run folder (steps.jsonl, events.jsonl). ``fsync``: force each line to disk."""

    def __init__(self, path: Path, fsync: bool = False, max_pending: int = MAX_PENDING_BYTES,
                 on_error: Callable[["AppendFile"], None] | None = None):
        """``on_error(self)``: called at the first OSError (default: one warning naming this file)."""
        self.path, self.fsync, self.max_pending = Path(path), fsync, max_pending
        self.on_error = on_error or warn
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending: deque[bytes] = deque()  # unwritten bytes, in order (the first may be a line's tail)
        self._pending_bytes = 0
        self.error: str = ""  # the first OSError, as text ("" while the disk has taken every line)
        self.dropped = 0  # whole lines dropped past max_pending
        self._torn_at: int | None = None  # where the line a short write cut begins (cut off again at close)

    def write(self, line: str) -> None:
        """Append ``line`` and a newline; never raises for the disk (see the module docstring)."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed; no more lines can be written")
        data = (line + "\n").encode("utf-8")
        if self._pending and not self._drain():
            self._keep(data)
            return
        self._keep(data)
        self._drain()

    def _keep(self, data: bytes) -> None:
        if self._pending_bytes + len(data) > self.max_pending:
            self.dropped += 1
            return
        self._pending.append(data)
        self._pending_bytes += len(data)

    def _drain(self) -> bool:
        """Write what is pending; False when the disk refused (the rest stays pending)."""
        while self._pending:
            data = self._pending[0]
            try:
                written = _write(self._fd, data)
                if self.fsync:
                    os.fsync(self._fd)
            except OSError as err:
                self._failed(err)
                return False
            self._pending_bytes -= written
            if written < len(data):  # cut short: the tail goes first next time (every chunk ends a line)
                if self._torn_at is None:
                    self._torn_at = os.fstat(self._fd).st_size - written
                self._pending[0] = data[written:]
                if written == 0:
                    self._failed(OSError(0, "the disk took no byte"))
                    return False
                continue
            self._pending.popleft()
            self._torn_at = None  # that line is whole now
        return True

    def _failed(self, err: OSError) -> None:
        if not self.error:
            self.error = f"{type(err).__name__}: {err.strerror or err}"
            self.on_error(self)

    def retry(self) -> bool:
        """Write what a failing disk refused so far; True when nothing is pending any more."""
        return self._drain() if self._fd is not None else not self._pending

    def losses(self) -> dict[str, object] | None:
        """What did not reach the file (None: everything did)."""
        if not self.error:
            return None
        pending_lines = sum(chunk.count(b"\n") for chunk in self._pending)
        if not pending_lines and not self.dropped:
            return {"error": self.error, "lines_lost": 0, "recovered": True}
        return {"error": self.error, "lines_lost": pending_lines + self.dropped, "lines_dropped": self.dropped,
                "lines_unwritten": pending_lines}

    def close(self) -> None:
        if self._fd is None:
            return
        if self._pending:
            self._drain()  # a last try: the disk may have room again
        if self._pending and self._torn_at is not None:
            try:  # the head of a line the disk cut short goes: the file ends with a whole line
                os.ftruncate(self._fd, self._torn_at)
            except OSError as err:
                log.debug("%s: the cut line at byte %d stays (%s); readers skip it", self.path, self._torn_at, err)
        try:
            os.close(self._fd)
        except OSError as err:
            self._failed(err)
        self._fd = None


def warn(failed: AppendFile) -> None:
    """The one warning of a failing disk (the trace writer gives it once for all its files)."""
    log.warning("cannot write %s (%s); the training goes on, the records are kept in memory (up to %d MiB) and "
                "written when the disk takes them again; the run's summary says what was lost. Free space on that "
                "disk or pass another --out.", failed.path, failed.error, failed.max_pending >> 20)


__all__ = ["AppendFile", "MAX_PENDING_BYTES", "warn"]
