"""The whitened beamformer (Bartlett) map of the measurements on a coarse (phi, theta, r) grid.

For one channel H and code set c_1..c_L (one ``System``): W_l = the ML search whitener of Phi_l = H diag(c_l)
(``ml_estimator.whitener``), u_lg = W_l Phi_l a_g / ||W_l Phi_l a_g|| the unit measurement column of grid
cell g (THE steering vector a_g), and

    map_g(y) = sum_l |u_lg^H W_l y_l|^2,

the energy the cell's one-source model captures. It is what the learned detectors see: the raw channel
never enters the network, so the same network runs on any channel and any L (the map is computed through
each system's own operators). Grid: ``GridDictionary`` (phi, theta uniform in degrees, r planes uniform in
1/r), ordered phi-major; ``image`` returns it as (B, R, P, T) = (range planes, phi, theta).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ris_model.config import SceneConfig
from ris_model.ml_estimator import GridDictionary, MLConfig, operators, whitener
from ris_model.simulate import System


CHUNK_SCENES = 25  # scenes per GEMM block of ``BeamMap.flat``


class BeamMap:
    """Whitened Bartlett map for ONE system (channel + codes) on a grid of ``step_deg`` and ``n_range`` planes."""

    def __init__(self, system: System, scene: SceneConfig, step_deg: float, n_range: int):
        self.phis = operators(system.channel[None], system.codes[None])  # (1, L, M, N) complex128
        self.w = whitener(self.phis, MLConfig().whiten_delta)
        self.dictionary = GridDictionary(system, (self.w @ self.phis)[0], scene,
                                         MLConfig(grid_step_deg=step_deg, n_range=n_range))
        self._cols = self.dictionary.cols_h  # (L, M, G) complex64: conjugated unit columns
        self.step_deg = step_deg
        self.shape = (_count(*scene.phi_deg, step_deg), _count(*scene.theta_deg, step_deg), n_range)  # (P, T, R)
        if math.prod(self.shape) != self.dictionary.points.shape[0]:
            raise ValueError(f"BeamMap: grid {self.shape} does not match the dictionary's "
                             f"{self.dictionary.points.shape[0]} cells")

    def flat(self, y: Tensor) -> Tensor:
        """Map of every scene of y (B, L, M): (B, G) float32, cells phi-major (GridDictionary order)."""
        yw = (self.w @ y.to(torch.complex128)[..., None])[..., 0].transpose(0, 1).to(torch.complex64)  # (L, B, M)
        out = []
        for start in range(0, yw.shape[1], CHUNK_SCENES):
            # one snapshot at a time, |.|^2 accumulated in place: the (b, G) block stays in cache (one batched
            # product over the L snapshots is 1.5-2x slower: its (L, b, G) output goes through memory)
            acc = None
            for l in range(yw.shape[0]):
                p = torch.view_as_real(yw[l, start:start + CHUNK_SCENES] @ self._cols[l])  # (b, G, 2)
                acc = p.square() if acc is None else acc.addcmul_(p, p)
            out.append(acc.sum(-1))
        return torch.cat(out)

    def image(self, y: Tensor) -> Tensor:
        """Map as an image (B, R, P, T): one channel per range plane, normalised to mean 1 per scene."""
        p, t, r = self.shape
        m = self.flat(y)
        m = m / m.mean(-1, keepdim=True)
        return m.reshape(-1, p, t, r).permute(0, 3, 1, 2).contiguous()


def _count(lo: float, hi: float, step: float) -> int:
    """Grid points of an axis lo, lo + step, ... <= hi (the rule of ``GridDictionary``)."""
    return int(math.floor((hi - lo) / step + 1e-9)) + 1


__all__ = ["BeamMap"]
