"""The evaluation of a composite-loss checkpoint (``ris_model.train``) as Markdown and JSON tables plus figures.

    python -m ris_model evalreport --checkpoint runs/.../last.pt --out runs/evalreport [--n 128] [--snr 0 10 20]

(reports/evaluation is the benchmark of ``ris_model.benchmark``; this report is for a trained covariance model.)

Writes tables.md (the ``scoring`` table, the K-estimation summary and the goal check, every figure
computed here), results.json (the same rows) and figures/matched_vs_snr.png, figures/error_crb_vs_snr.png
(per method, against the per-source realised SNR bin).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ris_model.checkpoint import load_checkpoint, restore
from ris_model.infer import evaluate, test_batches
from ris_model.model import build_model, count_parameters
from ris_model.scoring import format_rows, rows_json
from ris_model.simulate import make_system, subspace_energy_fraction

LEARNED = "learned, K head"
GOAL_BINS = ("10", "20")  # realised-SNR bins the acceptance goals are stated at
GOAL_MARGIN = 0.10  # matched fraction the learned pipeline must add to the best estimated-K MUSIC baseline
GOAL_RATIO = 2.0  # median error / CRB on matched sources at 20 dB


def _get(rows: list[dict], method: str, snr_bin: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["snr_bin"] == snr_bin), None)


def k_summary(rows: list[dict]) -> list[str]:
    """Markdown lines: K accuracy per estimator over all scenes and per scene SNR bin."""
    estimators = [r["method"] for r in rows if r["snr_bin"] == "all" and r["k_acc"] is not None
                  and r["method"] != "learned aux head, K head"]
    bins = sorted({r["snr_bin"] for r in rows if r["snr_bin"] != "all"}, key=float) + ["all"]
    lines = ["| K estimate (used by) | " + " | ".join(f"{b} dB" if b != "all" else "all" for b in bins) + " |",
             "|---|" + "---|" * len(bins)]
    for m in estimators:
        cells = []
        for b in bins:
            r = _get(rows, m, b)
            cells.append("-" if r is None or r["k_acc"] is None or r["n_scenes"] == 0 else
                         f"{r['k_acc']:.3f} ({r['n_scenes']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def goal_check(rows: list[dict]) -> list[str]:
    """Markdown lines: the learned pipeline (K head) against the best estimated-K MUSIC on R_samp."""
    baselines = [r["method"] for r in rows if r["method"].startswith("MUSIC R_samp") and r["snr_bin"] == "all"
                 and r["k_acc"] is not None]
    lines = []
    for b in GOAL_BINS:
        ours = _get(rows, LEARNED, b)
        if ours is None:
            lines.append(f"- {b} dB: no test source in this realised-SNR bin")
            continue
        best = max((_get(rows, m, b) for m in baselines), key=lambda r: r["matched_frac"])
        gain = ours["matched_frac"] - best["matched_frac"]
        lines.append(f"- {b} dB ({ours['n_sources']} sources): learned {ours['matched_frac']:.3f} vs "
                     f"{best['method']} {best['matched_frac']:.3f} -> {gain:+.3f} "
                     f"(goal >= +{GOAL_MARGIN:.2f}: {'met' if gain >= GOAL_MARGIN else 'NOT met'})")
    ours = _get(rows, LEARNED, GOAL_BINS[-1])
    if ours is not None and ours["ratio_phi_med"] is not None:
        worst = max(ours["ratio_phi_med"], ours["ratio_theta_med"])
        ok = not math.isnan(worst) and worst <= GOAL_RATIO
        lines.append(f"- {GOAL_BINS[-1]} dB median error/CRB on matched sources: phi {ours['ratio_phi_med']:.2f}, "
                     f"theta {ours['ratio_theta_med']:.2f}, r {ours['ratio_r_med']:.2f} "
                     f"(goal <= {GOAL_RATIO:g} in angle: {'met' if ok else 'NOT met'})")
    return lines


def figures(rows: list[dict], out: Path, min_sources: int = 5) -> list[Path]:
    """Matched fraction and median error/CRB (phi, theta) against the realised-SNR bin, one line per method
    (bins with fewer than ``min_sources`` true sources are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    paths = []
    for name, keys, ylabel, log in (("matched_vs_snr", ["matched_frac"], "matched fraction (5 deg gate)", False),
                                    ("error_crb_vs_snr", ["ratio_phi_med", "ratio_theta_med"],
                                     "median error / CRB on matched sources", True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            pts = [r for r in rows if r["method"] == m and r["snr_bin"] != "all" and r["n_sources"] >= min_sources]
            for key, style in zip(keys, ("-o", "--s")):
                xy = [(float(r["snr_bin"]), r[key]) for r in pts if r[key] is not None and not math.isnan(r[key])]
                if xy:
                    label = m if len(keys) == 1 else f"{m} ({key.split('_')[1]})"
                    ax.plot(*zip(*xy), style, label=label, ms=4)
        if log:
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("per-source realised SNR bin (dB)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def information_content(cfg, system, n: int, snr_db_list: list[float]) -> dict[str, float]:
    """Mean fraction of tr(R_samp) inside span{a_k} per nominal SNR, and its chance level K/N."""
    out = {}
    for snr, b in zip(snr_db_list, test_batches(cfg, n, system, snr_db_list)):
        a = system.steer(b.phi.double(), b.theta.double(), b.r.double())
        out[f"{snr:g} dB"] = float(subspace_energy_fraction(b.R_samp.to(a.dtype), a, b.mask).mean())
        out["chance K/N"] = float(b.k.double().mean()) / system.n
    return out


def write_report(checkpoint: str | Path, out: Path, n: int, snr_db_list: list[float]) -> list[Path]:
    """Evaluate ``checkpoint`` on n test scenes at each nominal SNR and write the report files under ``out``."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.cfg
    system = make_system(cfg)
    model = build_model(cfg, system)
    restore(ckpt, model)
    t0 = time.perf_counter()
    rows = evaluate(cfg, model, n, system, snr_db_list=snr_db_list)
    meta = {"config": cfg.name, "step": ckpt.next_step, "parameters": count_parameters(model), "test_scenes": n,
            "nominal_snr_db": snr_db_list, "eval_seconds": round(time.perf_counter() - t0, 1)}
    meta["r_samp_trace_in_signal_span"] = information_content(cfg, system, n, snr_db_list)
    out.mkdir(parents=True, exist_ok=True)
    info = ", ".join(f"{k} {v:.3f}" for k, v in meta["r_samp_trace_in_signal_span"].items())
    snrs = ", ".join(f"{s:g}" for s in snr_db_list)
    md = [f"# Evaluation of `{cfg.name}` after {ckpt.next_step} steps ({meta['parameters']} parameters)", "",
          f"Test scenes 0..{n - 1} at nominal SNR {snrs} dB (same scenes, only the noise changes), pooled and "
          "binned by per-source realised SNR.", "",
          "## Goal check", "", *goal_check(rows), "",
          f"Information content of R_samp (fraction of its trace inside span{{a_k}}, mean over scenes): {info}.", "", "## K estimation", "", *k_summary(rows), "",
          "K accuracy per scene (scenes in the bin); MDL/AIC on the top L eigenvalues of R_samp "
          "(`ris_model/model_order.py` says why only those).", "",
          "## Localisation", "", format_rows(rows, markdown=True), ""]
    paths = [out / "tables.md", out / "results.json"]
    paths[0].write_text("\n".join(md))
    paths[1].write_text(rows_json(rows, **meta))
    return paths + figures(rows, out / "figures")


__all__ = ["write_report", "k_summary", "goal_check", "figures"]
