"""Training and validation scenes of the learned detector: one system per (channel seed, L), fresh scenes per epoch.

Systems: one per (channel seed in ``train_seeds``, L in ``snapshots``): its own Rician BS-RIS channel
(``make_system`` of that dataset seed) and its own DFT code set of L codes. The benchmark's channel (dataset
seed 0) is NOT among them. Epoch e draws ``scenes_per_epoch`` NEW train-split scenes (indices e * n ..
(e + 1) * n - 1 of each system's seed: fresh positions, K, symbols and noise), a share ``share_l64`` of them
at the largest L, spread evenly over the seeds, nominal SNR uniform in ``snr_db``.
"""

from __future__ import annotations

import dataclasses

import torch

from ris_model.beam_map import BeamMap
from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, log_map, targets
from ris_model.simulate import System, make_system, simulate

CHUNK = 100  # scenes simulated at once


def system_config(cfg: RunConfig, seed: int, snapshots: int, snr_db: tuple[float, float]) -> RunConfig:
    """The run config of one training system: dataset seed (channel), L and the nominal SNR range."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=seed),
                               channel=dataclasses.replace(cfg.channel, snapshots=snapshots),
                               scene=dataclasses.replace(cfg.scene, snr_db=snr_db))


def training_systems(cfg: RunConfig, dcfg: DetectorConfig) -> dict[tuple[int, int], tuple[RunConfig, System, BeamMap]]:
    out = {}
    for seed in dcfg.train_seeds:
        for L in dcfg.snapshots:
            c = system_config(cfg, seed, L, dcfg.snr_db)
            system = make_system(c)
            out[(seed, L)] = (c, system, BeamMap(system, cfg.scene, dcfg.grid_step_deg, dcfg.n_range))
    return out


def scenes_per_system(dcfg: DetectorConfig, total: int) -> dict[int, int]:
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


def epoch_data(systems: dict, dcfg: DetectorConfig, epoch: int) -> dict[str, torch.Tensor]:
    per = scenes_per_system(dcfg, dcfg.scenes_per_epoch)
    parts = []
    for (seed, L), (c, system, bmap) in systems.items():
        n = per[L]
        for start in range(epoch * n, (epoch + 1) * n, CHUNK):
            s = scenes(c, system, bmap, "train", list(range(start, min(start + CHUNK, (epoch + 1) * n))), dcfg)
            parts.append({k: s[k] for k in ("x", "heat", "reg", "pos")})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


__all__ = ["CHUNK", "system_config", "training_systems", "scenes_per_system", "scenes", "epoch_data"]
