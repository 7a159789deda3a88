"""Data-parallel runs: per-rank trace shards, the collective non-finite decision, the originating rank.

Under DistributedDataParallel a NaN produced on one rank is all-reduced into every rank's gradients, so
after backward every rank sees the same poisoned gradient and nobody can tell where it came from. This
module watches each rank's *local* gradients as autograd produces them (a tensor hook on every
parameter fires with the local gradient before DDP's reducer, which hangs on the gradient accumulator,
averages it), and takes the skip / stop decision on all ranks together with one small all-reduce per
step: a vector with one slot per rank, set by the ranks whose local loss or local gradients were
non-finite. Every rank gets the same answer (no rank steps alone) and the same list of origins.

Only torch is needed; everything is inert when torch.distributed is not initialised.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# The run folder's shard layout and the waits on its files live with the other on-disk formats; re-exported
# here for the callers that still reach them through this module.
from ris_stability.records.shards import (RANK0_DONE, SHARD_PREFIX, SHARD_WAIT_S, mark_rank0_done, shard_dir,
                                          shard_dirs, wait_for_rank0, wait_for_shards)

log = logging.getLogger(__name__)


class RankLostError(RuntimeError):
    """A collective call failed: another rank stopped or died, so this rank cannot continue in step."""


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launcher_world() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def no_group_message(r: int, world: int) -> str:
    return (f"started as rank {r} of {world} (WORLD_SIZE), but no torch.distributed process group was joined: "
            "every rank trains alone, with its own non-finite verdicts (no collective skip); this rank's trace is "
            f"{'the run folder itself' if r == 0 else f'in {SHARD_PREFIX}{r}/'}. Call init_process_group (and wrap "
            "the model in DDP) for data-parallel training")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: its process group's, else the launcher's (torchrun sets RANK and
    WORLD_SIZE even for a script that never joins a group), else (0, 1)."""
    if active():
        return rank(), world_size()
    world = launcher_world()
    return (launcher_rank(), world) if world > 1 else (0, 1)


def launcher_rank() -> int:
    """This process's rank as torchrun announces it (``RANK``), readable before any process group exists:
    a script traced by ``risdiag trace -- python SCRIPT.py`` joins its group itself, later."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group); a lost peer is logged, not raised: the run
    is over and each rank's shard is already flushed."""
    if not active():
        return
    try:
        dist.barrier()
    except RuntimeError as err:
        log.warning("rank %d: end-of-run barrier failed (%s); another rank has already stopped", rank(), err)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _collective_device(device: torch.device) -> torch.device:
    """gloo reduces CPU tensors; nccl reduces CUDA tensors."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def grads_are_bucket_views(model: torch.nn.Module) -> bool:
    """A DDP wrapper in ``model`` built with gradient_as_bucket_view=True (``.grad`` is averaged in place)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return any(isinstance(m, ddp) and getattr(m, "gradient_as_bucket_view", False) for m in model.modules())


@dataclass
class Decision:
    """The collective verdict of one step, the same on every rank."""

    ok: bool  # every rank's local loss and local gradients were finite
    origins: list[int] = field(default_factory=list)  # ranks whose local loss / gradients were non-finite
    local_ok: bool = True  # this rank's own verdict
    local_grad_norm: float = float("nan")  # this rank's gradient norm before the all-reduce


class RankWatch:
    """Local (pre-reduction) checks of one rank and the collective decision of every step.

    ``attach(model)`` hooks every parameter; ``start_step()`` resets the step's accumulators;
    ``decide(loss)`` reduces the per-rank flag vector (the step's only extra collective) and returns the
    Decision. ``detach()`` removes every hook.

    Local gradients for the capsule: DDP's reducer averages into copies (its buckets) and writes the
    average back into ``.grad`` only when the backward pass ends (a callback it queues once the last
    bucket is ready). The first gradient hook of a backward queues a callback of ours ahead of it; there
    ``.grad`` still holds this rank's own gradients, and they are cloned only when the local sum of
    squares is non-finite: a clean step costs one scalar check, no copy. With
    ``gradient_as_bucket_view=True`` ``.grad`` is the bucket itself (averaged in place while backward
    runs), so nothing is captured (``capture=False``).
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.rank, self.world = rank(), world_size()
        self._handles: list[Any] = []
        self._params: list[tuple[str, torch.Tensor]] = []
        self._sq: torch.Tensor | None = None  # float64 sum of squares of the local gradients (NaN propagates)
        self._capture = True
        self._queued = False  # the end-of-backward check is queued for the backward in progress
        self.local_grads: dict[str, torch.Tensor] | None = None  # this step's local gradients, if non-finite
        self.step: int | None = None
        self._early = False  # attached during a step that has not started yet (a traced script's first step)

    def attach(self, model: torch.nn.Module, capture: bool = True, early: bool = False) -> None:
        """``early``: the step in progress starts (``start_step``) only after its backward; what this
        backward shows is kept for it instead of being reset."""
        self._early = early
        device = _device_of(model)
        self._sq = torch.zeros((), dtype=torch.float64, device=device)
        self._capture = capture
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._params.append((name, p))
                self._handles.append(p.register_hook(self._observe))

    def _observe(self, grad: torch.Tensor) -> None:
        # float64 sum of squares: finite iff every element is finite (no float32 overflow false alarm);
        # in place on device, no host sync. Returns None: the gradient is not changed.
        if self._sq is None:
            return
        self._sq.add_(torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).square())
        if self._capture and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """Runs when the backward pass ends, before DDP copies the averaged gradients into ``.grad``."""
        self._queued = False
        if self._sq is not None and not bool(torch.isfinite(self._sq)):
            self.local_grads = {n: p.grad.detach().clone() for n, p in self._params if p.grad is not None}

    def rename(self, model: torch.nn.Module) -> None:
        """Name the watched parameters (and any captured local gradient) by their names in ``model``,
        matched by identity; parameters outside ``model`` stay watched under their old names."""
        names = {id(p): n for n, p in model.named_parameters()}
        old = {n: names.get(id(p), n) for n, p in self._params}
        self._params = [(old[n], p) for n, p in self._params]
        if self.local_grads is not None:
            self.local_grads = {old.get(n, n): g for n, g in self.local_grads.items()}

    def start_step(self, step: int) -> None:
        self.step, self._queued = step, False
        if self._early:  # this step's backward has already been watched: keep what it showed
            self._early = False
            return
        self.local_grads = None
        if self._sq is not None:
            self._sq.zero_()

    def decide(self, loss: torch.Tensor | None) -> Decision:
        """The step's collective verdict (one all-reduce of a world-sized vector, one host read)."""
        return self.decision(self.reduce(loss).tolist())

    def reduce(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The collective half of :meth:`decide`, without a read: the all-reduced per-rank flags, then this rank's
        own flag and squared gradient norm, as one float64 device vector (read with the step's other values)."""
        sq = self._sq if self._sq is not None else torch.zeros((), dtype=torch.float64)
        bad = ~torch.isfinite(sq)
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach()).all().to(bad.device)
        flags = torch.zeros(self.world, dtype=torch.float64, device=_collective_device(sq.device))
        flags[self.rank] = bad.to(flags.device, torch.float64)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:
            raise RankLostError(rank_lost_message(self.rank, self.step, err)) from err
        local = torch.stack([bad.to(torch.float64), sq.to(torch.float64)]).to(flags.device)
        return torch.cat([flags, local])

    def decision(self, values: list[float]) -> Decision:
        """The :class:`Decision` from :meth:`reduce`'s vector once read."""
        flags, (bad, sq) = values[:self.world], values[self.world:]
        origins = [r for r, v in enumerate(flags) if v != 0]
        return Decision(ok=not origins, origins=origins, local_ok=bad == 0, local_grad_norm=math.sqrt(sq))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._params, self._sq, self.local_grads = [], [], None, None


def rank_lost_message(r: int, step: int | None, err: BaseException) -> str:
    return (f"rank {r}: the collective call at step {step} failed ({type(err).__name__}: {str(err)[:200]}); "
            "another rank stopped or died, so this rank stops too (no rank steps alone). Its trace shard is "
            "flushed; look at the other ranks' shards (rank<r>/events.jsonl) for the first failure.")


def is_collective_failure(exc: BaseException) -> bool:
    """An exception that means a peer rank is gone (our own wrapper, or torch.distributed's own errors)."""
    if isinstance(exc, RankLostError):
        return True
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(exc, backend_error):
        return True
    text = str(exc).lower()
    return active() and isinstance(exc, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))


def origin_note(watch: "RankWatch | None", decision: "Decision | None", data: dict) -> str:
    """Under DDP, the words (and ``data`` fields) of a non-finite event that name the ranks whose local loss or
    gradients were non-finite before the all-reduce; "" in one process."""
    if watch is None or decision is None:
        return ""
    d = decision
    data.update(origin_ranks=d.origins, rank=watch.rank, world_size=watch.world, local_finite=d.local_ok)
    if not d.origins:
        return (f"; no rank's local loss or gradients were non-finite before the all-reduce (this is rank "
                f"{watch.rank} of {watch.world}): the all-reduced gradient itself overflowed, or a "
                "gradient outside the watched parameters went non-finite")
    return (f"; originating rank(s) {d.origins} of {watch.world} (local loss or gradients non-finite "
            f"before the all-reduce; this is rank {watch.rank})")
