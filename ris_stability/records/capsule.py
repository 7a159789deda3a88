"""Crash capsules: everything needed to replay one training step exactly, written when a step goes bad.

A capsule is a single ``torch.save`` file holding plain containers and tensors only (loadable with
``weights_only=True``): the batch, the model and optimizer state from *before* the step, the RNG states
at the start of the step, the resolved config text, the step index and the step's gradients (so a
replay can be checked bit for bit). It knows nothing of the model it serves:
the integration decides what "batch" and "config" are and how to rebuild the step from them.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ris_stability.records.atomic import temporary_name
log = logging.getLogger(__name__)

CAPSULE_FORMAT = "risdiag-capsule"
CAPSULE_VERSION = 1


class CapsuleError(ValueError):
    """A capsule file is missing, unreadable, corrupted or from an incompatible version."""


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and, when present, CUDA) and Python's ``random`` (as a picklable tuple)."""
    return rng_state(rng_snapshot())


def rng_snapshot() -> tuple[Any, ...]:
    """The RNG states as they are (cheap enough for every step); :func:`rng_state` makes them storable."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), random.getstate(), cuda


def rng_state(snapshot: tuple[Any, ...]) -> dict[str, Any]:
    """The :func:`capture_rng` form of a :func:`rng_snapshot`."""
    cpu, python, cuda = snapshot
    state: dict[str, Any] = {"torch": cpu, "python": _py_state_to_tensor(python)}
    if cuda is not None:
        state["cuda"] = cuda
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensor(st: tuple) -> dict[str, Any]:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


@dataclass
class Capsule:
    step: int
    batch: dict[str, Any]  # tensors (and plain values) of the batch
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    rng: dict[str, Any]
    config_text: str = ""  # resolved config (TOML) of the run
    reason: str = ""  # why it was written, e.g. "non-finite gradient"
    meta: dict[str, Any] = field(default_factory=dict)  # torch version, dtype, loss value, lr ...
    grads: dict[str, torch.Tensor] | None = None  # parameter name -> gradient of the step (None: not stored)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash while writing never leaves a half capsule."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        blob = {"format": CAPSULE_FORMAT, "version": CAPSULE_VERSION, "step": self.step, "batch": self.batch,
                "model_state": self.model_state, "optimizer_state": self.optimizer_state, "rng": self.rng,
                "config_text": self.config_text, "reason": self.reason, "meta": self.meta, "grads": self.grads}
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no half capsule a later command would trust
            raise
        log.info("capsule for step %d written to %s", self.step, path)
        return path

    @staticmethod
    def load(path: str | Path) -> "Capsule":
        path = Path(path)
        if not path.is_file():
            raise CapsuleError(f"capsule {str(path)!r} does not exist; capsules are written by `risdiag trace` "
                               "under RUN_DIR/capsules/step_NNNNNN.pt")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise CapsuleError(f"capsule {str(path)!r} is corrupted or not a capsule ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); re-run the trace to write it again") from None
        if not isinstance(blob, dict) or blob.get("format") != CAPSULE_FORMAT:
            raise CapsuleError(f"{str(path)!r} is a torch file but not a risdiag capsule")
        if blob.get("version") != CAPSULE_VERSION:
            raise CapsuleError(f"capsule {str(path)!r} has version {blob.get('version')!r}; this risdiag reads "
                               f"version {CAPSULE_VERSION}. Replay it with the risdiag version that wrote it, "
                               "or re-run the trace")
        return Capsule(step=int(blob["step"]), batch=blob["batch"], model_state=blob["model_state"],
                       optimizer_state=blob["optimizer_state"], rng=blob["rng"], config_text=blob["config_text"],
                       reason=blob["reason"], meta=blob["meta"], grads=blob.get("grads"))


def clone_state(state: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor detached and cloned."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return state


def capsule_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "capsules" / f"step_{step:06d}.pt"
