"""Crash capsules: everything needed to replay one training step exactly, written when a step goes bad.

A capsule is a single ``torch.save`` file holding plain containers and tensors only (loadable with
``weights_only=True``): the batch, the model and optimizer state from *before* the step, the RNG states
at the start of the step, the resolved config text, the step index and the step's gradients (so a
replay can be checked bit for bit). It knows nothing of the model it serves:
the integration decides what "batch" and "config" are and how to rebuild the step from them.
"""

from __future__ import annotations

import collections
import hashlib
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
from ris_stability.records.capsule_writer import wait_all
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
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() and torch.cuda.is_available() else None
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

    state_files: tuple[Path, ...] = ()  # the shared state files a saved capsule refers to (save(shared=True))

    def save(self, path: str | Path, shared: bool = False) -> Path:
        """Write atomically (temp file + rename): a crash while writing never leaves a half capsule. Values a
        ``weights_only`` load refuses (numpy scalars and arrays, e.g. the learning rate of a LambdaLR that
        returns ``numpy.float64``) are stored as Python numbers and tensors. ``shared``: the model and
        optimizer state go to ``state/<digest>.pt`` next to the capsule, written once for all capsules that
        hold the same state. The model state's digest is stored as ``meta["params_digest"]``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.meta["params_digest"] = state_digest(self.model_state)
        blob = {"format": CAPSULE_FORMAT, "version": CAPSULE_VERSION, "step": self.step, "batch": self.batch,
                "model_state": self.model_state, "optimizer_state": self.optimizer_state, "rng": self.rng,
                "config_text": self.config_text, "reason": self.reason, "meta": self.meta, "grads": self.grads}
        blob = storable(blob)
        files = []
        if shared:
            for key in ("model_state", "optimizer_state"):
                if blob[key] is None:
                    continue
                digest = self.meta["params_digest"] if key == "model_state" else state_digest(blob[key])
                target = path.parent / STATE_DIR / f"{digest}.pt"
                if not target.is_file():
                    _save_atomic(blob[key], target)
                blob[key] = {STATE_REF: digest}
                files.append(target)
        self.state_files = tuple(files)
        _save_atomic(blob, path)
        log.info("capsule for step %d written to %s", self.step, path)
        return path

    @staticmethod
    def load(path: str | Path) -> "Capsule":
        path = Path(path)
        wait_all()  # a capsule of this process still being written in the background: on disk first
        if not path.is_file():
            raise CapsuleError(f"capsule {str(path)!r} does not exist; capsules are written by `risdiag trace` "
                               "under RUN_DIR/capsules/step_NNNNNN.pt")
        blob = _load(path, "capsule")
        if not isinstance(blob, dict) or blob.get("format") != CAPSULE_FORMAT:
            raise CapsuleError(f"{str(path)!r} is a torch file but not a risdiag capsule")
        if blob.get("version") != CAPSULE_VERSION:
            raise CapsuleError(f"capsule {str(path)!r} has version {blob.get('version')!r}; this risdiag reads "
                               f"version {CAPSULE_VERSION}. Replay it with the risdiag version that wrote it, "
                               "or re-run the trace")
        for key in ("model_state", "optimizer_state"):
            ref = blob[key]
            if isinstance(ref, dict) and set(ref) == {STATE_REF}:
                state = path.parent / STATE_DIR / f"{ref[STATE_REF]}.pt"
                if not state.is_file():
                    raise CapsuleError(f"capsule {str(path)!r} refers to its {key.replace('_', ' ')} in {state}, "
                                       "which is missing; copy the capsules/ folder whole (with state/)")
                blob[key] = _load(state, f"{key.replace('_', ' ')} of capsule {str(path)!r}")
        return Capsule(step=int(blob["step"]), batch=blob["batch"], model_state=blob["model_state"],
                       optimizer_state=blob["optimizer_state"], rng=blob["rng"], config_text=blob["config_text"],
                       reason=blob["reason"], meta=blob["meta"], grads=blob.get("grads"))


STATE_DIR = "state"  # capsules/state/<digest>.pt: model / optimizer state shared by capsules
STATE_REF = "risdiag_state_digest"  # a capsule's reference to a shared state file


def _save_atomic(obj: Any, path: Path) -> None:
    """Written under a temporary name and renamed: a full disk or a kill leaves no half file a later command
    would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _numpy_globals() -> list[Any]:
    """The numpy types a capsule written before numpy values were converted may hold (data only)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                          "uint8", "bool", "complex64", "complex128")]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``; numpy scalars and arrays of older capsules are allowed and turned
    into Python numbers and tensors."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "numpy" not in str(err):
                raise
            with torch.serialization.safe_globals(_numpy_globals()):
                return storable(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise CapsuleError(f"{what} {str(path)!r} is corrupted or not a capsule ({type(err).__name__}: {first}); "
                           "likely cause: a cut or overwritten file, or an object that weights_only loading refuses. "
                           "Next step: trace again with this risdiag (it stores plain numbers and tensors only)") from None


_PLAIN = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.Size)


def storable(value: Any, depth: int = 0) -> Any:
    """``value`` with numpy scalars as Python numbers and numpy arrays as tensors, containers kept (what a
    ``weights_only`` load accepts); any other object by its repr (it cannot be replayed from a capsule)."""
    if type(value).__module__.split(".", 1)[0] == "numpy":  # before the plain types: numpy.float64 is a float
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray) and value.dtype != object:
            return torch.from_numpy(np.array(value))
        return value.tolist() if isinstance(value, np.ndarray) else repr(value)
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return type(value)((k, storable(v, depth + 1)) for k, v in value.items()) if type(value) in (
            dict, collections.OrderedDict) else {k: storable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)) and depth < 64:
        items = [storable(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items) if isinstance(value, tuple) else set(items)
    log.debug("capsule: %s stored by its repr (weights_only loading accepts plain values only)", type(value).__name__)
    return repr(value)


def clone_state(state: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor detached and cloned."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return state


def state_digest(state: Any) -> str:
    """A digest of a (nested) state: every tensor's dtype, shape and bytes, every other value's repr, keys in
    order. Two states with the same digest hold the same bits: how a re-run checks that it reached a
    capsule's parameters, and how capsules share an unchanged state instead of storing it twice."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        t = (t.to_dense() if t.is_sparse else t).cpu().contiguous().reshape(-1)
        if t.is_complex():
            t = torch.view_as_real(t).reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for k, v in value.items():
            h.update(repr(k).encode())
            _feed(h, v)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def capsule_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "capsules" / f"step_{step:06d}.pt"
