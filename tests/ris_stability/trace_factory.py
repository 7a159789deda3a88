"""Synthetic run folders for report/records tests (no training): written through TraceWriter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ris_stability.records import STEPS_FILE, SUMMARY_FILE, TraceWriter

DEFAULT_META = {
    "command": "risdiag trace --config configs/synthetic.toml",
    "config_path": "configs/synthetic.toml",
    "config_hash": "0123456789ab",
    "torch": "2.13.0",
    "device": "cpu",
    "dtype": "complex64",
    "remedies": {"eigenvector": '`loss.eigh_backward = "gap_aware"`'},  # as integrations/ris.py writes it
}
LOSS_TERMS = ("cov_nmse", "subspace", "orth", "k_ce")
MODULES = ("encoder", "heads.angle", "heads.range", "heads.k")


def _matrix_row(name: str, step: int, rng: np.random.Generator, *, n: int, rank: int,
                tied: int, tie_value: float, vec_grad: float) -> dict:
    """Stats of a rank-`rank` n x n PSD matrix whose null space is loaded to `tie_value` (tied)."""
    lam_max = 0.2 + 0.01 * rng.standard_normal()
    gap_split = 10.0 ** rng.uniform(-4, -2)
    signal_gap = 10.0 ** rng.uniform(-5, -3)
    lam_min = tie_value if tied else 10.0 ** rng.uniform(-9, -7)
    noise_gap = 0.0 if tied else 10.0 ** rng.uniform(-10, -8)
    cond = lam_max / lam_min if lam_min > 0 else math.inf
    min_gap = min(gap_split, signal_gap, noise_gap)
    stats = {
        "n": n, "rank": rank - (step % 3 == 0), "cond": cond, "log10_cond": math.log10(cond),
        "lambda_min": lam_min, "lambda_max": lam_max, "trace": 1.0, "herm_err": 1e-8,
        "min_gap": min_gap, "gap_split": gap_split, "min_gap_signal": signal_gap,
        "min_gap_noise": noise_gap, "max_cluster": tied if tied else 1,
        "cluster_value": tie_value if tied else lam_max,
        "amplification": math.inf if min_gap == 0 else 1.0 / min_gap, "vec_grad": vec_grad,
    }
    return {f"mat/{name}/{k}": v for k, v in stats.items()}


def _step_row(step: int, bad: bool, rng: np.random.Generator, *, tied_cluster: int, tie_value: float,
              dead_term: str | None, dead_module: str | None, singular_matrix: bool) -> dict:
    row: dict = {"step": step, "time_s": 0.5 * (step + 1), "lr": 1e-3, "skipped": bad, "nonfinite": bad}
    terms = {t: (0.0 if t == dead_term else float(np.exp(-0.1 * step) * (1 + i) + 0.01))
             for i, t in enumerate(LOSS_TERMS)}
    if bad:
        terms["subspace"] = math.nan
    row["loss"] = float(sum(terms.values()))
    row.update({f"loss/{t}": v for t, v in terms.items()})
    for i, module in enumerate(MODULES):
        value = 0.0 if module == dead_module else float(10.0 ** rng.uniform(-3, 0) * (i + 1))
        row[f"grad/{module}"] = math.nan if bad and module != dead_module else value
    row["grad/_total"] = math.nan if bad else 1.0
    if bad:
        row["grad_nonfinite/heads.angle"] = 12
    row.update(_matrix_row("R_blend", step, rng, n=144, rank=26, tied=tied_cluster, tie_value=tie_value,
                           vec_grad=1.0))
    row.update(_matrix_row("loss.subspace:linalg.eigh", step, rng, n=144, rank=26, tied=0, tie_value=0.0,
                           vec_grad=0.0))
    if singular_matrix:
        row.update({"mat/R_pred/n": 144, "mat/R_pred/rank": 10, "mat/R_pred/cond": math.inf,
                    "mat/R_pred/log10_cond": math.inf, "mat/R_pred/min_gap": 0.0, "mat/R_pred/max_cluster": 134,
                    "mat/R_pred/cluster_value": 0.0, "mat/R_pred/vec_grad": 0.0})
    return row


def _bad_step_events(writer: TraceWriter, step: int) -> None:
    writer.event("nonfinite_loss", "error", f"loss is NaN at step {step} (term subspace)", step=step,
                 terms=["subspace"])
    writer.event("step_skipped", "warning", f"step {step} skipped", step=step)
    writer.event("capsule_written", "info", "capsule written", step=step, path=f"capsules/step_{step:06d}.pt")


def _end_events(writer: TraceWriter, last: int, dead_term: str | None, dead_module: str | None) -> None:
    if dead_term:
        writer.event("dead_loss_term", "warning", f"loss term {dead_term} is constant 0", step=last,
                     names=[dead_term])
    if dead_module:
        writer.event("dead_parameter", "warning", f"{dead_module} never received gradient", step=last,
                     names=[f"{dead_module}.weight", f"{dead_module}.bias"])


def make_run(run_dir: Path, *, n_steps: int = 12, nonfinite_at: tuple[int, ...] = (),
             tied_cluster: int = 0, tie_value: float = 1e-3, dead_term: str | None = None,
             dead_module: str | None = None, summary: bool = True, seed: int = 0,
             singular_matrix: bool = True) -> Path:
    """A run folder with losses, grads and three matrices. Non-finite steps are skipped, as the
    monitor's skip policy does; `tied_cluster` ties the noise eigenvalues of R_blend from step 0."""
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    losses = []
    with TraceWriter(run_dir, DEFAULT_META) as writer:
        writer.event("run_start", "info", "run started", step=0)
        if tied_cluster:
            writer.event("tied_eigenvalues", "warning", f"R_blend: {tied_cluster} eigenvalues tied at "
                         f"{tie_value:.1e}", step=0, matrix="R_blend", max_cluster=tied_cluster,
                         cluster_value=tie_value, vec_grad=1.0)
        for step in range(n_steps):
            bad = step in nonfinite_at
            row = _step_row(step, bad, rng, tied_cluster=tied_cluster, tie_value=tie_value, dead_term=dead_term,
                            dead_module=dead_module, singular_matrix=singular_matrix)
            writer.step(row)
            if bad:
                _bad_step_events(writer, step)
            else:
                losses.append(row["loss"])
        _end_events(writer, n_steps - 1, dead_term, dead_module)
        if summary:
            writer.event("run_end", "info", "run finished", step=n_steps - 1)
            writer.summary({"steps": n_steps, "wall_s": 0.5 * n_steps, "nonfinite_steps": list(nonfinite_at),
                            "skipped_steps": list(nonfinite_at), "final_loss": losses[-1] if losses else None,
                            "best_loss": min(losses) if losses else None,
                            "status": "nonfinite" if nonfinite_at else "clean"})
    return run_dir


def make_seed_nan_like(run_dir: Path, **overrides) -> Path:
    """Like configs/seed-nan.toml: R_blend noise eigenvalues tied (118 at 1e-3), NaN at step 3."""
    kwargs = dict(n_steps=10, nonfinite_at=(3,), tied_cluster=118, tie_value=1e-3,
                  dead_term="orth", dead_module="heads.range")
    kwargs.update(overrides)
    run = make_run(run_dir, **kwargs)
    (run / "capsules").mkdir(exist_ok=True)
    (run / "capsules" / "step_000003.pt").write_bytes(b"not a real capsule")
    return run


def truncate_trace(run_dir: Path, keep_chars: int = 25) -> Path:
    """Simulate a crash mid-write: cut the last steps.jsonl line after `keep_chars`, drop summary."""
    path = Path(run_dir) / STEPS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1][:keep_chars]]), encoding="utf-8")
    (Path(run_dir) / SUMMARY_FILE).unlink(missing_ok=True)
    return path


def set_meta(run_dir: Path, **changes) -> None:
    path = Path(run_dir) / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
