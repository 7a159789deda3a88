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


CHUNK_SCENES = 50  # scenes per GEMM block of ``BeamMap.flat``
CHUNK_CELLS = 2048  # grid cells per GEMM block of ``BeamMap.flat`` for blocks of at least SPLIT_SCENES scenes
SPLIT_SCENES = 16  # fewer scenes: one block of all cells (there the calls, not the data, dominate)


class BeamMap:
    """Whitened Bartlett map for ONE system (channel + codes) on a grid of ``step_deg`` and ``n_range`` planes."""

    def __init__(self, system: System, scene: SceneConfig, step_deg: float, n_range: int):
        self.phis = operators(system.channel[None], system.codes[None])  # (1, L, M, N) complex128
        self.w = whitener(self.phis, MLConfig().whiten_delta)
        self.dictionary = GridDictionary(system, (self.w @ self.phis)[0], scene,
                                         MLConfig(grid_step_deg=step_deg, n_range=n_range))
        cols = self.dictionary.cols_h  # (L, M, G) complex64: conjugated unit columns
        self._cols = torch.cat([cols.real, cols.imag], -2).contiguous()  # (L, 2M, G) float32
        self.step_deg = step_deg
        self.shape = (_count(*scene.phi_deg, step_deg), _count(*scene.theta_deg, step_deg), n_range)  # (P, T, R)
        if math.prod(self.shape) != self.dictionary.points.shape[0]:
            raise ValueError(f"BeamMap: grid {self.shape} does not match the dictionary's "
                             f"{self.dictionary.points.shape[0]} cells")

    def whiten(self, y: Tensor) -> Tensor:
        """W_l y_l of every scene of y (B, L, M): (B, L, M) complex128 (one (M, M) x (M, B) product per snapshot)."""
        return (self.w[0] @ y.to(torch.complex128).permute(1, 2, 0)).permute(2, 0, 1)

    def flat(self, y: Tensor) -> Tensor:
        """Map of every scene of y (B, L, M): (B, G) float32, cells phi-major (GridDictionary order).

        With z = W_l y_l and c = the cell's conjugated unit column, u^H W_l y_l = z^T c, and in real arithmetic
        [Re z, -Im z; Im z, Re z] @ [Re c; Im c] = [Re; Im] of z^T c: one float32 GEMM per snapshot and block of
        cells, |.|^2 accumulated in place on a (2 b, cells) block that stays in cache."""
        yw = self.whiten(y).transpose(0, 1).to(torch.complex64)  # (L, B, M)
        z = torch.cat([torch.cat([yw.real, -yw.imag], -1), torch.cat([yw.imag, yw.real], -1)], 1)  # (L, 2B, 2M)
        bsz, n_cells = yw.shape[1], self._cols.shape[-1]
        step = CHUNK_CELLS if bsz >= SPLIT_SCENES else n_cells
        out = torch.empty(bsz, n_cells)
        for start in range(0, bsz, CHUNK_SCENES):
            stop = min(start + CHUNK_SCENES, bsz)
            zb = torch.cat([z[:, start:stop], z[:, bsz + start:bsz + stop]], 1)  # (L, 2 b, 2M)
            for g0 in range(0, n_cells, step):
                acc = None
                for l in range(zb.shape[0]):
                    p = zb[l] @ self._cols[l, :, g0:g0 + step]  # (2 b, cells): Re rows, then Im rows
                    acc = p.square() if acc is None else acc.addcmul_(p, p)
                out[start:stop, g0:g0 + step] = acc[:stop - start] + acc[stop - start:]
        return out

    def image(self, y: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """Map as an image (B, R, P, T): one channel per range plane, normalised to mean 1 per scene; in
        ``torch.channels_last`` it is the map's own layout (range planes innermost), no copy."""
        p, t, r = self.shape
        m = self.flat(y)
        m = m / m.mean(-1, keepdim=True)
        return m.reshape(-1, p, t, r).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def _count(lo: float, hi: float, step: float) -> int:
    """Grid points of an axis lo, lo + step, ... <= hi (the rule of ``GridDictionary``)."""
    return int(math.floor((hi - lo) / step + 1e-9)) + 1


__all__ = ["BeamMap"]
