"""LoopContext: the one typed record of the step in progress that the monitor reads, and NonFiniteError, the
one exception the toolkit raises to end a run under the ``stop`` policy.

Every front door (hooks, ``watch``, MonitorSession, Lightning, HF Trainer, a loop's callback protocol) feeds
the step driver (``ris_stability.attach.driver``), which owns the run's LoopContext and resets it once per
step (:meth:`LoopContext.begin`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


PARAMS_REFRESH = 32  # steps between two listings of the model's parameters (a parameter added later is seen then)


class NonFiniteError(RuntimeError):
    """The run was ended by the ``stop`` policy after a non-finite step (raised at the step's end)."""

    passes_guard = True  # the policy's own end of the run: observe.guard lets it through


@dataclass
class LoopContext:
    """What the monitor knows of the step in progress."""

    model: torch.nn.Module
    optimizer: Any = None  # one optimizer or a sequence of them (all step together)
    loss_fn: torch.nn.Module | None = None
    scaler: Any = None  # a GradScaler under fp16 AMP (given or discovered): its overflow steps are routine
    roots: dict[str, torch.nn.Module] | None = None  # names of the module paths (default {"model": model})
    micro_batches: int = 0  # losses recorded this step (gradient accumulation)
    step: int = 0
    lr: float = math.nan
    batch: Any = None
    signal_dims: Any = None
    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    grads_finite: bool | None = None
    born_grads: dict[str, torch.Tensor] | None = None  # copies of non-finite gradients as backward made them
    born_screen: torch.Tensor | None = None  # device value, finite when the gradients were as backward made them
    born_covers: bool = False  # the check at backward saw the step's gradients as they are now: no second screen
    born_grads_fn: Any = None  # () -> (names of non-finite, copies or None) as backward made them; bad steps only
    born_names: list[str] | None = None  # the gradients non-finite as backward made them (a bad step)
    skipped: bool = False
    skip_reason: str = ""
    skip_requested: str = ""
    stop_requested: str = ""
    locating: bool = False  # the step runs under the locator (armed after a fault): no matrix sampling
    _params: list[torch.Tensor] | None = field(default=None, repr=False)
    _begun: int = field(default=0, repr=False)

    def begin(self, step: int, batch: Any = None, lr: float = math.nan, signal_dims: Any = None,
              locating: bool = False) -> None:
        """Reset the per-step fields for ``step`` (the one place a step's context is cleared)."""
        self.step, self.batch, self.lr, self.signal_dims, self.locating = step, batch, lr, signal_dims, locating
        self.loss, self.terms, self.grads_finite, self.micro_batches = None, {}, None, 0
        self.born_grads, self.born_screen, self.born_grads_fn, self.born_names = None, None, None, None
        self.born_covers, self.skipped, self.skip_reason, self.skip_requested = False, False, "", ""
        self._begun += 1
        if self._begun <= 2 or self._begun % PARAMS_REFRESH == 0:
            self._params = None

    def params(self) -> list[torch.Tensor]:
        """The model's parameters, listed again at the first two steps and every ``PARAMS_REFRESH`` steps
        (walking the module tree each step cost more than the finiteness screen of a small model)."""
        if self._params is None:
            self._params = list(self.model.parameters())
        return self._params

    def add_loss(self, loss: torch.Tensor | None, terms: dict[str, torch.Tensor] | None = None) -> None:
        """One micro-batch's loss: under gradient accumulation the step's loss and terms are their sums."""
        terms = {k: v.detach() for k, v in (terms or {}).items()}
        if self.micro_batches == 0 or self.loss is None:
            self.loss, self.terms = loss, terms
        elif loss is not None:
            self.loss = self.loss.detach().reshape(()) + loss.detach().reshape(())
            self.terms = {k: self.terms[k] + v if k in self.terms else v for k, v in terms.items()}
        self.micro_batches += 1

    def drop_graph(self) -> None:
        """The step is over: keep the loss's value but not its autograd graph, which is the loop's to free
        (holding it would move the cost of freeing it into the monitor's next step)."""
        if self.loss is not None and self.loss.grad_fn is not None:
            self.loss = self.loss.detach()

    def request_skip(self, reason: str = "monitor") -> None:
        self.skip_requested = reason

    def request_stop(self, reason: str = "monitor") -> None:
        self.stop_requested = reason


__all__ = ["LoopContext", "NonFiniteError"]
