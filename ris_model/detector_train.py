"""Training of the learned detector (``detector``): fresh scenes every epoch over several channels and L.

    python -m ris_model traindet --config configs/default.toml --out reports/evaluation/detector.pt

Systems: one per (channel seed in ``train_seeds``, L in ``snapshots``): its own Rician BS-RIS channel
(``make_system`` of that dataset seed) and its own DFT code set of L codes. The benchmark's channel (dataset
seed 0) is NOT among them, so every benchmark number of the detector is on a channel it never saw.
Epoch e draws ``scenes_per_epoch`` NEW train-split scenes (indices e * n .. (e + 1) * n - 1 of each system's
seed: fresh positions, K, symbols and noise), a share ``share_l64`` of them at the largest L, spread evenly
over the seeds, nominal SNR uniform in ``snr_db``. After training, the heat threshold is tuned per L for the
best pooled F1 of the decoded peaks on validation-split scenes of the training systems.
Deterministic: fixed seeds, one thread, a fixed order of generation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ris_model.beam_map import BeamMap
from ris_model.benchmark import pooled_counts
from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, HeatNet, decode, detector_loss, log_map, targets
from ris_model.music import Estimates, single_threaded
from ris_model.simulate import System, make_system, simulate

logger = logging.getLogger(__name__)

DETECTOR_FORMAT = 1
CHUNK = 100  # scenes simulated at once


def system_config(cfg: RunConfig, seed: int, snapshots: int, snr_db: tuple[float, float]) -> RunConfig:
    """The run config of one training system: dataset seed (channel), L and the nominal SNR range."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=seed),
                               channel=dataclasses.replace(cfg.channel, snapshots=snapshots),
                               scene=dataclasses.replace(cfg.scene, snr_db=snr_db))


def _systems(cfg: RunConfig, dcfg: DetectorConfig) -> dict[tuple[int, int], tuple[RunConfig, System, BeamMap]]:
    out = {}
    for seed in dcfg.train_seeds:
        for L in dcfg.snapshots:
            c = system_config(cfg, seed, L, dcfg.snr_db)
            system = make_system(c)
            out[(seed, L)] = (c, system, BeamMap(system, cfg.scene, dcfg.grid_step_deg, dcfg.n_range))
    return out


def _counts(dcfg: DetectorConfig, total: int) -> dict[int, int]:
    """Scenes per seed for each L (the largest L gets the share ``share_l64``)."""
    big = max(dcfg.snapshots)
    n_big = round(total * dcfg.share_l64) if len(dcfg.snapshots) > 1 else 0
    rest = [L for L in dcfg.snapshots if L != big] or [big]
    per = {L: (total - n_big) // len(rest) for L in rest}
    if len(dcfg.snapshots) > 1:
        per[big] = n_big
    return {L: max(n // len(dcfg.train_seeds), 1) for L, n in per.items()}


def scenes(c: RunConfig, system: System, bmap: BeamMap, split: str, indices: list[int], dcfg: DetectorConfig) -> dict:
    """Simulated scenes of one system: the network input (B, R, P, T), targets, and the simulate dict."""
    d = simulate(c, system, split, indices)
    img = log_map(bmap.image(d["y"]))
    heat, reg, pos = targets(d["phi"], d["theta"], d["r"], d["mask"], bmap.shape[:2], c.scene,
                             dcfg.grid_step_deg, dcfg.sigma_cells)
    return {"x": img, "heat": heat, "reg": reg, "pos": pos, "data": d}


def _epoch_data(systems: dict, dcfg: DetectorConfig, epoch: int) -> dict[str, torch.Tensor]:
    per = _counts(dcfg, dcfg.scenes_per_epoch)
    parts = []
    for (seed, L), (c, system, bmap) in systems.items():
        n = per[L]
        for start in range(epoch * n, (epoch + 1) * n, CHUNK):
            s = scenes(c, system, bmap, "train", list(range(start, min(start + CHUNK, (epoch + 1) * n))), dcfg)
            parts.append({k: s[k] for k in ("x", "heat", "reg", "pos")})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def tune_thresholds(net: HeatNet, systems: dict, dcfg: DetectorConfig, k_max: int) -> dict[str, dict]:
    """Per L, the heat threshold with the best pooled F1 of the decoded peaks on validation-split scenes."""
    grid = np.round(np.arange(0.05, 0.96, 0.025), 3)
    out = {}
    for L in dcfg.snapshots:
        n = max(dcfg.n_val // len(dcfg.train_seeds), 1) // (4 if L == max(dcfg.snapshots) and L > 16 else 1)
        decoded = []
        for (seed, ll), (c, system, bmap) in systems.items():
            if ll != L:
                continue
            for start in range(0, n, CHUNK):
                s = scenes(c, system, bmap, "val", list(range(start, min(start + CHUNK, n))), dcfg)
                with torch.no_grad():
                    x, top, _ = decode(net(s["x"]), 1.0, k_max, c.scene, dcfg.grid_step_deg)
                decoded.append((x, top, s["data"]))
        best = (-1.0, 0.5)
        for thr in grid:
            tot = np.zeros(3)
            for x, top, d in decoded:
                k = (top > thr).sum(-1).clamp_min(1)
                tot += pooled_counts(peak_estimates(x, k, k_max), d)
            best = max(best, (2 * tot[0] / max(2 * tot[0] + tot[1] + tot[2], 1), float(thr)))
        out[str(L)] = {"threshold": best[1], "val_f1_peaks": round(best[0], 4), "val_scenes": sum(len(d["k"]) for *_, d in decoded)}
        logger.info("detector threshold L=%d: %.3f (validation F1 of the peaks %.3f)", L, best[1], best[0])
    return out


def peak_estimates(x: torch.Tensor, k: torch.Tensor, k_max: int) -> Estimates:
    """Estimates of the first k[b] positions of x (B, k_max, 3) = (phi, theta, ln r)."""
    mask = torch.arange(k_max)[None] < k[:, None]
    r = torch.where(mask, x[..., 2].exp(), torch.ones_like(x[..., 2]))
    return Estimates(x[..., 0], x[..., 1], r, mask, mask.sum(-1))


def train_detector(cfg: RunConfig, dcfg: DetectorConfig, out: Path) -> Path:
    """Train the detector (deterministic on one thread), tune its thresholds and save it to ``out``."""
    torch.manual_seed(dcfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with single_threaded():
        systems = _systems(cfg, dcfg)
        net = HeatNet(dcfg.n_range, dcfg.width)
        opt = torch.optim.AdamW(net.parameters(), lr=dcfg.lr, weight_decay=1e-4)
        steps_per_epoch = -(-sum(n * len(dcfg.train_seeds) for n in _counts(dcfg, dcfg.scenes_per_epoch).values())
                            // dcfg.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=dcfg.lr, total_steps=dcfg.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(dcfg.seed)
        history = []
        for epoch in range(dcfg.epochs):
            t_data = time.perf_counter()
            data = _epoch_data(systems, dcfg, epoch)
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
        thresholds = tune_thresholds(net, systems, dcfg, cfg.scene.k_max)
    out.with_suffix(".partial.pt").unlink()
    torch.save({"format": DETECTOR_FORMAT, "dcfg": dataclasses.asdict(dcfg), "state": net.state_dict(),
                "thresholds": thresholds, "history": history, "train_seconds": time.perf_counter() - t0}, out)
    return out


__all__ = ["DETECTOR_FORMAT", "system_config", "train_detector", "tune_thresholds", "peak_estimates", "scenes"]
