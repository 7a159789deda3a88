"""Training of the learned detector (``detector``): fresh scenes every epoch over several channels and L.

    python -m ris_model traindet --config configs/default.toml --out reports/evaluation/detector.pt

Data (``detector_data``): one system per (channel seed in ``train_seeds``, L in ``snapshots``), fresh
train-split scenes every epoch. The benchmark's channel (dataset seed 0) is NOT among the training channels, so
every benchmark number of the detector is on a channel it never saw. After training, the pipeline's three
decision parameters are tuned per L on validation-split scenes of the training systems (``detector_tune``).
Deterministic: fixed seeds, one thread, a fixed order of generation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from ris_model.config import RunConfig
from ris_model.detector import DETECTOR_FORMAT, DetectorConfig, HeatNet, detector_loss
from ris_model.detector_data import epoch_data, scenes_per_system, training_systems
from ris_model.detector_tune import tune_pipeline
from ris_model.music import single_threaded

logger = logging.getLogger(__name__)


def train_detector(cfg: RunConfig, dcfg: DetectorConfig, out: Path) -> Path:
    """Train the detector (deterministic on one thread), tune its pipeline and save it to ``out``."""
    torch.manual_seed(dcfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with single_threaded():
        systems = training_systems(cfg, dcfg)
        net = HeatNet(dcfg.n_range, dcfg.width)
        opt = torch.optim.AdamW(net.parameters(), lr=dcfg.lr, weight_decay=1e-4)
        steps_per_epoch = -(-sum(n * len(dcfg.train_seeds) for n in scenes_per_system(dcfg, dcfg.scenes_per_epoch).values())
                            // dcfg.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=dcfg.lr, total_steps=dcfg.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(dcfg.seed)
        history = []
        for epoch in range(dcfg.epochs):
            t_data = time.perf_counter()
            data = epoch_data(systems, dcfg, epoch)
            t_data = time.perf_counter() - t_data
            n = data["x"].shape[0]
            perm, sums = torch.randperm(n, generator=gen), {"heat": 0.0, "reg": 0.0}
            for i in range(0, n, dcfg.batch):
                idx = perm[i:i + dcfg.batch]
                parts = detector_loss(net(data["x"][idx]), data["heat"][idx], data["reg"][idx], data["pos"][idx])
                loss = parts["heat"] + parts["reg"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                for k in sums:
                    sums[k] += parts[k].item() * len(idx) / n
            history.append(sums)
            torch.save({"epoch": epoch, "state": net.state_dict()}, out.with_suffix(".partial.pt"))
            logger.info("detector epoch %d: %d scenes, heat %.4f, reg %.4f (data %.0f s, total %.0f s)", epoch, n,
                        sums["heat"], sums["reg"], t_data, time.perf_counter() - t0)
        net.eval()
        pipeline = tune_pipeline(net, dcfg, cfg, systems)
    out.with_suffix(".partial.pt").unlink()
    torch.save({"format": DETECTOR_FORMAT, "dcfg": dataclasses.asdict(dcfg), "state": net.state_dict(),
                "pipeline": pipeline, "history": history, "train_seconds": time.perf_counter() - t0}, out)
    return out


__all__ = ["train_detector"]
