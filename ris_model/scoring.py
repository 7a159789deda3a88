"""Like-for-like localisation scores: per-source records, rows binned by realised SNR, ONE table function.

Every command that prints localisation figures (``python -m ris_model eval | music | evalreport``,
``benchmarks/music_bench.py``) builds its rows with ``score_rows`` and prints them with ``format_rows``.

Per source (the true sources of every scene):
- matched: paired with an estimate by ``metrics.match_scene`` (Hungarian) within ``metrics.GATE_DEG``;
- errors |phi_hat - phi|, |theta_hat - theta| (degrees), |r_hat - r| (metres) of matched sources;
- its own Cramer-Rao standard deviations (``crb.crb_batch``) and the ratios error / CRB;
- its realised SNR: p_k mean_l ||Phi_l a_k||^2 / (M sigma^2), the power this source delivers to the BS
  antennas through the actual channel and codes over the noise power. It sits about 5 dB below the
  scene's nominal SNR (K sources share the power; the code beams favour some directions), with about
  +-5 dB of spread, so rows are binned by it, not by the nominal SNR.
Per scene: false alarms (estimates without a gated partner) and whether the K used was right; a scene
belongs to the SNR bin of the mean (in dB) of its sources' realised SNRs.

A row (method, SNR bin) pools the sources of the bin: matched fraction and false alarms per scene are the
headline; error / CRB median and 90th percentile, RMSE and the CRB, all over the SAME matched sources
(the CRB column is sqrt(mean CRB variance) over exactly the sources the RMSE pools). Oracle rows (MUSIC
on R_true, which has no noise) carry no CRB and no ratio.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ris_model.crb import crb_batch
from ris_model.metrics import GATE_DEG, MetricsError, match_scene
from ris_model.music import Estimates
from ris_model.simulate import System

COORDS = ("phi", "theta", "r")
SNR_BIN_DB = 5.0  # bins [c - 2.5, c + 2.5) dB centred on multiples of 5 dB


@dataclass(frozen=True)
class Truth:
    """The true scenes of an evaluation set as numpy arrays: phi, theta (radians), r (m) (B, K_MAX), mask,
    k (B,), snr_db (B, K_MAX) per-source realised SNR, crb (B, K_MAX, 3) standard deviations (deg, deg, m)
    or None when the bound was not computed."""

    phi: np.ndarray
    theta: np.ndarray
    r: np.ndarray
    mask: np.ndarray
    k: np.ndarray
    snr_db: np.ndarray
    crb: np.ndarray | None

    @property
    def n_scenes(self) -> int:
        return self.mask.shape[0]


def _get(data: object, name: str) -> Tensor:
    return data[name] if isinstance(data, dict) else getattr(data, name)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def truth_from(data: object, system: System, with_crb: bool = True) -> Truth:
    """Truth of a Batch or a ``simulate`` dict (CRB per source unless ``with_crb`` is False)."""
    phi, theta, r = (_get(data, n).to("cpu", torch.float64) for n in ("phi", "theta", "r"))
    mask = _get(data, "mask").cpu()
    a = system.steer(phi, theta, r)  # (B, K_MAX, N)
    channel = _get(data, "channel").to("cpu", torch.complex128)
    codes = _get(data, "codes").to("cpu", torch.complex128)
    b_cols = torch.einsum("bmn,bln,bkn->bklm", channel, codes, a)  # Phi_l a_k
    gain = b_cols.abs().square().sum(-1).mean(-1)  # (B, K_MAX): mean_l ||Phi_l a_k||^2
    noise = _get(data, "noise_var").to("cpu", torch.float64)
    snr = _get(data, "powers").to("cpu", torch.float64) * gain / (channel.shape[-2] * noise[:, None])
    snr_db = torch.where(mask, 10 * torch.log10(snr), torch.full_like(snr, math.nan))
    crb = None
    if with_crb:
        as64 = data if isinstance(data, dict) else data.to(dtype=torch.float64)
        bound = crb_batch(as64, system)
        crb = torch.stack([bound["phi_deg"], bound["theta_deg"], bound["r_m"]], -1).numpy()
    return Truth(_np(phi), _np(theta), _np(r), mask.numpy(), mask.sum(-1).numpy(), _np(snr_db), crb)


def concat_truths(truths: list[Truth]) -> Truth:
    """One Truth from several evaluation sets (e.g. the same scenes at several nominal SNRs)."""
    crb = None if any(t.crb is None for t in truths) else np.concatenate([t.crb for t in truths])
    return Truth(*(np.concatenate([getattr(t, f) for t in truths]) for f in
                   ("phi", "theta", "r", "mask", "k", "snr_db")), crb=crb)


@dataclass(frozen=True)
class MethodScores:
    """One method on the scenes of a Truth: matched (B, K_MAX) over true slots, err (B, K_MAX, 3) absolute
    errors (deg, deg, m; NaN unless matched), false_alarms (B,), k_right (B,) bool (None: K not estimated)."""

    method: str
    oracle: bool
    matched: np.ndarray
    err: np.ndarray
    false_alarms: np.ndarray
    k_right: np.ndarray | None


def score(method: str, est: Estimates, truth: Truth, k_used: Tensor | None = None, oracle: bool = False,
          gate_deg: float = GATE_DEG) -> MethodScores:
    """Match ``est`` to ``truth`` scene by scene (Hungarian, angular gate) and keep per-source errors."""
    if est.phi.shape[0] != truth.n_scenes:
        raise MetricsError(f"score {method!r}: {est.phi.shape[0]} estimated scenes vs {truth.n_scenes} true "
                           "scenes; pass the estimates of the same scenes")
    e = [_np(t) for t in (est.phi, est.theta, est.r)]
    em = est.mask.cpu().numpy()
    b, k_max = truth.mask.shape
    matched = np.zeros((b, k_max), dtype=bool)
    err = np.full((b, k_max, 3), math.nan)
    fa = np.zeros(b, dtype=np.int64)
    for i in range(b):
        slots = np.flatnonzero(truth.mask[i])
        eb = tuple(x[i][em[i]] for x in e)
        rows, cols, ang = match_scene(eb, (truth.phi[i][slots], truth.theta[i][slots], truth.r[i][slots]))
        good = ang <= gate_deg
        rows, tgt = rows[good], slots[cols[good]]
        matched[i, tgt] = True
        err[i, tgt, 0] = np.degrees(np.abs(eb[0][rows] - truth.phi[i, tgt]))
        err[i, tgt, 1] = np.degrees(np.abs(eb[1][rows] - truth.theta[i, tgt]))
        err[i, tgt, 2] = np.abs(eb[2][rows] - truth.r[i, tgt])
        fa[i] = len(eb[0]) - int(good.sum())
    k_right = None if k_used is None else k_used.cpu().numpy() == truth.k
    return MethodScores(method, oracle, matched, err, fa, k_right)


def snr_bins(truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    """Bin centre (dB) per source (B, K_MAX; NaN padded) and per scene (B,)."""
    src = SNR_BIN_DB * np.round(truth.snr_db / SNR_BIN_DB)
    with np.errstate(invalid="ignore"):
        scene_mean = np.nanmean(np.where(truth.mask, truth.snr_db, np.nan), axis=-1)
    return src, SNR_BIN_DB * np.round(scene_mean / SNR_BIN_DB)


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else math.nan


def _row(s: MethodScores, truth: Truth, src_sel: np.ndarray, scene_sel: np.ndarray, label: str) -> dict:
    m = s.matched & src_sel
    n_src, n_scn = int(src_sel.sum()), int(scene_sel.sum())
    row = {"method": s.method, "snr_bin": label, "oracle": s.oracle, "n_sources": n_src, "n_scenes": n_scn,
           "n_matched": int(m.sum()), "matched_frac": float(m.sum() / n_src) if n_src else math.nan,
           "fa_per_scene": float(s.false_alarms[scene_sel].mean()) if n_scn else math.nan,
           "k_acc": float(s.k_right[scene_sel].mean()) if s.k_right is not None and n_scn else None}
    err = s.err[m]  # (n_matched, 3): the matched sources, the set every column below is computed on
    crb = None if (s.oracle or truth.crb is None) else truth.crb[m]
    for j, c in enumerate(COORDS):
        row[f"rmse_{c}"] = float(np.sqrt(np.mean(err[:, j] ** 2))) if err.size else math.nan
        row[f"crb_{c}"] = None if crb is None else (float(np.sqrt(np.mean(crb[:, j] ** 2))) if err.size else math.nan)
        ratio = None if crb is None else err[:, j] / crb[:, j]
        row[f"ratio_{c}_med"] = None if ratio is None else _pct(ratio, 50)
        row[f"ratio_{c}_p90"] = None if ratio is None else _pct(ratio, 90)
    return row


def score_rows(scores: list[MethodScores], truth: Truth, binned: bool = True) -> list[dict]:
    """Rows per method: one per realised-SNR bin holding sources (ascending), then 'all'."""
    src_bin, scene_bin = snr_bins(truth)
    centres = sorted(set(src_bin[truth.mask].tolist())) if binned else []
    rows = []
    for s in scores:
        for c in centres:
            rows.append(_row(s, truth, truth.mask & (src_bin == c), scene_bin == c, f"{c + 0.0:g}"))
        rows.append(_row(s, truth, truth.mask, np.ones(truth.n_scenes, dtype=bool), "all"))
    return rows


_COLUMNS = [  # (header, key, format)
    ("method", "method", "{}"), ("SNR dB", "snr_bin", "{}"), ("sources", "n_sources", "{:d}"),
    ("matched", "matched_frac", "{:.3f}"), ("FA/scene", "fa_per_scene", "{:.2f}"), ("K acc", "k_acc", "{:.3f}"),
    ("phi/CRB med", "ratio_phi_med", "{:.2f}"), ("phi/CRB p90", "ratio_phi_p90", "{:.2f}"),
    ("theta/CRB med", "ratio_theta_med", "{:.2f}"), ("theta/CRB p90", "ratio_theta_p90", "{:.2f}"),
    ("r/CRB med", "ratio_r_med", "{:.2f}"), ("r/CRB p90", "ratio_r_p90", "{:.2f}"),
    ("rmse phi", "rmse_phi", "{:.3f}"), ("crb phi", "crb_phi", "{:.3f}"),
    ("rmse theta", "rmse_theta", "{:.3f}"), ("crb theta", "crb_theta", "{:.3f}"),
    ("rmse r", "rmse_r", "{:.3f}"), ("crb r", "crb_r", "{:.3f}"),
]

LEGEND = (f"SNR dB: bin of the per-source realised SNR (centre, +-{SNR_BIN_DB / 2:g} dB; 'all' pools every bin). "
          f"matched: fraction of true sources paired within {GATE_DEG:g} deg; FA/scene: estimates without a partner "
          "per scene; K acc: scenes whose K was right. Ratios error/CRB (median, 90th percentile), RMSE and CRB "
          "(sqrt of the mean CRB variance) are all over the same matched sources; angles in degrees, range in "
          "metres; '-' where not defined (no CRB for the noise-free oracle on R_true, no K estimate).")


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def format_rows(rows: list[dict], markdown: bool = False, legend: bool = True) -> str:
    """THE table of ``score_rows`` rows: plain text (aligned columns) or Markdown."""
    if not rows:
        return "(no rows)"
    cells = [[_cell(r, k, fmt) for _, k, fmt in _COLUMNS] for r in rows]
    heads = [h for h, _, _ in _COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
        lines.append("-" * len(lines[0]))
        lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
                  for c in cells]
    if legend:
        lines += ["", LEGEND]
    return "\n".join(lines)


def rows_json(rows: list[dict], **meta: object) -> str:
    """Rows (and metadata) as JSON; NaN becomes null."""
    def clean(v: object) -> object:
        return None if isinstance(v, float) and math.isnan(v) else v
    return json.dumps({**meta, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}, indent=1)


__all__ = ["Truth", "MethodScores", "SNR_BIN_DB", "LEGEND", "truth_from", "concat_truths", "score", "snr_bins",
           "score_rows", "format_rows", "rows_json"]
