"""Batch (saveable), the simulated datasets and the batch streams used for training and evaluation."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ris_model.complex_ops import complex_dtype
from ris_model.config import RunConfig
from ris_model.simulate import System, make_system, simulate

BATCH_FORMAT = 1


class BatchError(ValueError):
    """A batch is malformed: wrong shapes, non-finite measurements, or an unreadable file."""


@dataclass(frozen=True)
class Batch:
    """One batch of simulated samples. B = batch, L = snapshots, M = BS antennas, N = RIS elements.

    Real tensors are float32 or float64 (``dtype``), complex ones the matching complex dtype.
    Angles are radians, ranges metres; source slots beyond k are padding (``mask`` False).
    """

    y: Tensor  # (B, L, M) complex: measurements
    codes: Tensor  # (B, L, N) complex: RIS configuration of each snapshot
    channel: Tensor  # (B, M, N) complex: BS-RIS channel (same for all samples unless per-sample)
    snr_db: Tensor  # (B,) real
    noise_var: Tensor  # (B,) real
    k: Tensor  # (B,) int64: number of sources
    mask: Tensor  # (B, K_MAX) bool
    phi: Tensor  # (B, K_MAX) real, radians
    theta: Tensor  # (B, K_MAX) real, radians
    r: Tensor  # (B, K_MAX) real, metres
    powers: Tensor  # (B, K_MAX) real
    R_true: Tensor  # (B, N, N) complex, trace 1
    R_samp: Tensor  # (B, N, N) complex, trace 1
    index: Tensor  # (B,) int64: sample index within its split
    split: str = "train"

    @property
    def size(self) -> int:
        return self.y.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "split"}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Batch":
        """Move to a device and/or cast real tensors to ``dtype`` (complex ones to the matching dtype)."""
        def cast(t: Tensor) -> Tensor:
            if dtype is not None and t.is_complex():
                t = t.to(complex_dtype(dtype))
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t
        return Batch(split=self.split, **{k: cast(v) for k, v in self.tensors().items()})

    def check_finite(self) -> None:
        for name, t in self.tensors().items():
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(-1).nonzero().reshape(-1).tolist()
                raise BatchError(
                    f"batch tensor {name!r} holds non-finite values in sample(s) {bad[:5]} "
                    f"(indices {self.index[bad[:5]].tolist()} of split {self.split!r}); the measurements must "
                    "be finite before they enter the model. Check the data source or the SNR/noise settings.")

    def save(self, path: str | Path) -> None:
        torch.save({"format": BATCH_FORMAT, "split": self.split, "tensors": self.tensors()}, path)

    @staticmethod
    def load(path: str | Path) -> "Batch":
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise BatchError(f"cannot read batch file {str(path)!r}: {err}") from None
        if not isinstance(blob, dict) or blob.get("format") != BATCH_FORMAT:
            raise BatchError(f"{str(path)!r} is not a ris_model batch (format {BATCH_FORMAT})")
        return Batch(split=blob["split"], **blob["tensors"])


def make_batch(cfg: RunConfig, system: System, split: str, indices: list[int]) -> Batch:
    dtype = getattr(torch, cfg.data.dtype)
    return Batch(split=split, **simulate(cfg, system, split, indices)).to(dtype=dtype)


class SimDataset:
    """A split of the simulator: sample i is a pure function of (data.seed, split, i)."""

    def __init__(self, cfg: RunConfig, split: str, size: int | None = None, system: System | None = None):
        self.cfg, self.split = cfg, split
        self.system = system if system is not None else make_system(cfg)
        default = {"train": None, "val": cfg.data.n_val, "test": cfg.data.n_test}[split]
        self.size = size if size is not None else default

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("the train split is an endless stream; use batches(start=...)")
        return self.size

    def batch(self, indices: list[int]) -> Batch:
        return make_batch(self.cfg, self.system, self.split, indices)

    def batches(self, batch_size: int | None = None, start: int = 0) -> Iterator[Batch]:
        """Consecutive batches from sample ``start`` on (the whole split, or endless for train)."""
        bs = batch_size or self.cfg.data.batch_size
        i = start
        while self.size is None or i < self.size:
            stop = i + bs if self.size is None else min(i + bs, self.size)
            yield self.batch(list(range(i, stop)))
            i = stop


def train_batch(cfg: RunConfig, system: System, step: int, part: range | None = None) -> Batch:
    """The training batch of ``step``: samples [step*B, (step+1)*B) of the train split (resumable);
    ``part``: only these positions of it (a data-parallel rank's share)."""
    b = cfg.data.batch_size
    part = range(b) if part is None else part
    return make_batch(cfg, system, "train", [step * b + i for i in part])
