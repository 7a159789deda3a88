"""Data-parallel training under ``torchrun``: process group, each rank's share of a batch, DDP wrapper,
and the collective finite check (no rank steps alone).

Outside a process group of more than one rank everything here is the identity: rank 0 of 1.
The global batch and the schedule are those of one process: rank r of W simulates samples
[step*B + r*B/W, step*B + (r+1)*B/W) of the train split (samples are pure functions of their index), and
DDP averages the W equal-share mean-loss gradients into the global batch's mean gradient.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "RIS_DIST_TIMEOUT_S"  # how long a rank waits for a peer in a collective before giving up
DEFAULT_TIMEOUT_S = 120.0


class ParallelError(RuntimeError):
    """The data-parallel set-up cannot run as asked (batch not divisible, a peer rank gone)."""


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logger.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(batch_size: int, rank: int, world_size: int) -> range:
    """The positions of the global batch rank ``rank`` simulates and trains on."""
    if batch_size % world_size:
        raise ParallelError(f"data.batch_size={batch_size} is not divisible by the {world_size} ranks: every rank "
                            f"needs an equal share for DDP's average to be the global batch's mean. Set "
                            f"data.batch_size to a multiple of {world_size} or use --nproc-per-node dividing it")
    per = batch_size // world_size
    return range(rank * per, (rank + 1) * per)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``model`` inside a process group of more than one rank, else the model itself."""
    if world()[1] <= 1:
        return model
    ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind a DDP wrapper (checkpoints and replays hold plain names)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff ``flag`` is True on every rank (one all-reduce of one number)."""
    if world()[1] <= 1:
        return flag
    dev = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([0.0 if flag else 1.0], device=dev)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise ParallelError(f"rank {world()[0]}: the finite-check all-reduce failed ({err}); another rank stopped "
                            "or died. This rank stops too; see the other ranks' logs for the first failure") from err
    return float(t) == 0.0


def local_only(flag: bool, device: torch.device | str = "cpu") -> bool:
    """This rank's own verdict, no collective: for a loop whose callbacks take the collective decision
    themselves after backward (one all-reduce per step, theirs)."""
    return flag
