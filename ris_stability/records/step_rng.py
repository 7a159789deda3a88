"""The RNG states at the start of each training step, for capsules and precision audits, at a cost near zero.

torch's generator states are copied at every step start (a few kilobytes: about a microsecond). Python's
``random`` holds 625 words whose copy costs 10-60 us, a large share of a monitor's fixed cost per step, and
most training steps never draw from it. So :class:`StepRng` copies it at every step start only while it has to:

* for the first ``still_steps`` steps, and for good once the state is seen to move between two copies
  (a script drawing from ``random`` in its steps);
* on every step the caller asks it to check (the monitor's sampled steps);
* otherwise the copy from the last check stands in for it, and :meth:`verified`, called when a capsule is
  written, compares it with the live state: equal, the copy is the step's exact start state (nothing drew
  from ``random`` since it was taken); different, ``random`` moved since the last check (a shuffle at an epoch
  boundary, say), and the capsule carries the live state, which is exact unless the step itself drew from
  ``random``, and says so; copies are then taken at every step for the rest of the run.
"""
from __future__ import annotations

import random
from typing import Any

import torch

Snapshot = tuple[torch.Tensor, tuple, Any]  # (torch CPU state, Python random state, CUDA states or None)


def _cuda_states() -> Any:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() and torch.cuda.is_available() else None


class StepRng:
    """Step-start RNG snapshots (see the module doc). ``start`` at each step start, ``verified`` when the
    snapshot is used."""

    def __init__(self, still_steps: int = 3):
        if still_steps < 1:
            raise ValueError(f"StepRng: still_steps={still_steps} must be >= 1 (steps copied before reusing a copy)")
        self.still_steps = still_steps
        self.moves = False  # random moved between two copies: copied at every step from now on
        self.copies = 0  # Python random states copied (the costly part), for tests and benchmarks
        self._python: tuple | None = None  # the last copy of Python's random state
        self._still = 0  # step starts at which it had not moved (until it moves once)
        # Whether the snapshot's Python state is the step's exact start state: True (copied at the start or
        # verified since), False (random had moved: the live state stands in), None (a reused copy, not verified).
        self._exact: bool | None = True
        self.snapshot: Snapshot | None = None

    def _copy(self) -> tuple:
        self.copies += 1
        return random.getstate()

    def start(self, check: bool = False) -> Snapshot:
        """The RNG states at this step's start; ``check``: copy Python's state even if it stands still."""
        if self.moves or check or self._python is None or self._still < self.still_steps:
            now = self._copy()
            if self._python is not None:
                if now != self._python:
                    self.moves = True
                else:
                    self._still += 1
            self._python, self._exact = now, True
        else:
            self._exact = None
        self.snapshot = (torch.get_rng_state(), self._python, _cuda_states())
        return self.snapshot

    def verified(self) -> tuple[Snapshot, bool]:
        """(the snapshot of the current step, whether its Python state is exactly the step's start state).
        Not exact: ``random`` moved since the last check; the snapshot then holds its live state."""
        if self.snapshot is None:
            raise RuntimeError("StepRng.verified() before any start(): no step has started")
        if self._exact is not None:
            return self.snapshot, self._exact
        now = self._copy()
        if now == self._python:
            self._exact = True
            return self.snapshot, True
        self.moves, self._python, self._exact = True, now, False
        self.snapshot = (self.snapshot[0], now, self.snapshot[2])
        return self.snapshot, False
