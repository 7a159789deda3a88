"""The capsules of one run under a budget: a count and a size in bytes.

A run whose every step goes non-finite would otherwise write a capsule per step (each the size of the
model, its optimizer state, the batch and the gradients). The first capsule is the informative one (the step
where the fault was born) and the most recent shows where the run ended up, so those two are always kept;
over the budget, the oldest capsule between them is deleted (a ``capsule_dropped`` event says which, the
summary how many).

State that did not change between capsules (the model and optimizer state under the skip policy, which
leaves both untouched on a bad step) is written once: each capsule refers to it by digest
(``capsules/state/<digest>.pt``, see :class:`~ris_stability.records.capsule.Capsule`); a state file is
deleted with the last capsule that refers to it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ris_stability.records.capsule import Capsule, capsule_path

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 2 ** 20  # the capsules of one run (state files included)


@dataclass
class CapsuleStore:
    """Write capsules of ``run_dir`` within ``max_count`` capsules and ``max_bytes`` bytes (first and most
    recent always kept: a single capsule over ``max_bytes`` is still written)."""

    run_dir: Path
    max_count: int
    max_bytes: int = DEFAULT_MAX_BYTES
    kept: list[Path] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # steps whose capsules were deleted for the budget
    _refs: dict[Path, tuple[Path, ...]] = field(default_factory=dict)  # capsule -> state files it refers to

    def write(self, capsule: Capsule) -> tuple[Path | None, list[Path]]:
        """Save ``capsule``; returns its path (None when the budget allows no capsule at all) and the
        capsules deleted to make room."""
        if self.max_count < 1:
            return None, []
        if self.max_count == 1 and self.kept:  # room for one: the first stays
            self.dropped.append(capsule.step)
            return None, []
        path = capsule.save(capsule_path(self.run_dir, capsule.step), shared=True)
        if path in self._refs:  # the same step written twice (rewritten in place)
            self.kept.remove(path)
        self.kept.append(path)
        self._refs[path] = capsule.state_files
        return path, self._prune()

    @property
    def bytes(self) -> int:
        files = set(self.kept) | {f for refs in self._refs.values() for f in refs}
        return sum(f.stat().st_size for f in files if f.is_file())

    def _prune(self) -> list[Path]:
        removed = []
        while len(self.kept) > 2 and (len(self.kept) > self.max_count or self.bytes > self.max_bytes):
            victim = self.kept.pop(1)
            refs = self._refs.pop(victim)
            victim.unlink(missing_ok=True)
            still = {f for r in self._refs.values() for f in r}
            for f in refs:
                if f not in still:
                    f.unlink(missing_ok=True)
            self.dropped.append(int(victim.stem.rpartition("_")[2]))
            removed.append(victim)
            log.info("capsule %s deleted: over the run's capsule budget (%d capsules, %d MB)", victim.name,
                     self.max_count, self.max_bytes // 2 ** 20)
        return removed


__all__ = ["CapsuleStore", "DEFAULT_MAX_BYTES"]
