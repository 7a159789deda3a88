"""Checkpoints: model + optimizer (+ AMP scaler) + RNG state + the resolved config, resumable bit-exactly.

A checkpoint written after optimizer step s-1 stores ``next_step = s``; resuming runs step s with the same
batch (a pure function of the step), the same learning rate (a pure function of the step) and the same
optimizer/RNG state, so its loss is bit-identical to the uninterrupted run's.
"""

from __future__ import annotations

import io
import logging
import pickle
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ris_model.config import ConfigError, RunConfig, dumps_toml, from_dict, to_dict

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Keys that may differ between the checkpoint's config and the resuming config: they change neither the
# model, the data nor the learning-rate schedule.
RESUMABLE_DIFFERENCES: frozenset[str] = frozenset(
    {"name", "description", "train.val_every", "train.checkpoint_every", "train.log_every"})


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not belong to the given config/model."""


@dataclass(frozen=True)
class Checkpoint:
    cfg: RunConfig
    next_step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    path: Path


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs: {key: (a_value, b_value)}."""
    fa, fb = _flat(to_dict(a)), _flat(to_dict(b))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, cfg: RunConfig, next_step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: Any = None) -> Path:
    """Write a checkpoint atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CHECKPOINT_FORMAT, "config_toml": dumps_toml(cfg), "next_step": next_step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state()}
    buf = io.BytesIO()
    torch.save(blob, buf)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; its config is parsed back from the stored resolved TOML."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; a run writes them under "
                              "<out>/checkpoints/ (last.pt is the final one)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}. The file is truncated or not "
                              "a torch checkpoint; use another checkpoint of the run") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ris_model checkpoint (format {CHECKPOINT_FORMAT})")
    try:
        cfg = from_dict(RunConfig, tomllib.loads(blob["config_toml"]))
    except (ConfigError, tomllib.TOMLDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a config this version cannot load: {err}") from None
    return Checkpoint(cfg=cfg, next_step=int(blob["next_step"]), model=blob["model"], optimizer=blob["optimizer"],
                      scaler=blob["scaler"], rng=blob["rng"], path=path)


def check_compatible(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """Raise CheckpointError naming every config key that differs in a way that breaks resuming."""
    diffs = {k: v for k, v in config_differences(ckpt.cfg, cfg).items() if k not in RESUMABLE_DIFFERENCES}
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in list(diffs.items())[:6])
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} was written by another config ({len(diffs)} key(s) differ: {shown}). "
            "Resume with the checkpoint's own config (config.resolved.toml next to it), or start a new run.")


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scaler: Any = None) -> None:
    """Load the states into existing objects; shape or key mismatches are reported by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(ckpt.model))
    unexpected = sorted(set(ckpt.model) - set(own))
    shapes = [f"{k} {tuple(ckpt.model[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in ckpt.model and ckpt.model[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} does not fit this model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, shape mismatches {shapes[:4]}. It was written for another model config.")
    model.load_state_dict(ckpt.model)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    if scaler is not None and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)
    set_rng_state(ckpt.rng)
