"""Report items beyond NaN: gradient spikes, precision audits and the per-op hazards of eig and pinv.

Pure functions of a Trace. Each item appears only when the run measured the hazard: a spike event, a
precision audit that disagreed with float64, an eig input that was Hermitian, an eig backward whose
rounding (phase term) exceeded PRECISION_GRAD_RTOL of its gap terms, a singular value near pinv's cut-off.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ris_stability.linalg.hazards import EIG_OPS, PINV_OPS, eig_rounding_ratio
from ris_stability.records import Trace, matrix_stats
from ris_stability.report.derive import MatrixSummary
from ris_stability.report.explosions import explosion_items
from ris_stability.report.markdown import code, steps_list
from ris_stability.numerics.tolerances import PINV_CUTOFF_DECADES, PRECISION_GRAD_RTOL, hermitian_input_tol


def _events(trace: Trace, kind: str) -> list[dict]:
    return [e for e in trace.events if e.get("kind") == kind and e.get("step") is not None]


def incident_items(trace: Trace) -> list[str]:
    """Explosions (report/explosions.py, most severe first), gradient spikes (with what jumped) and precision
    audits that disagreed with float64."""
    items = explosion_items(trace)
    spikes = _events(trace, "gradient_spike")
    if spikes:
        worst = max(spikes, key=lambda e: (e.get("data") or {}).get("total", 0.0))
        data = worst.get("data") or {}
        jumped = [f"module {code(m['name'])}" for m in data.get("modules", [])[:4]]
        jumped += [f"linalg site {code(s['name'])}" for s in data.get("sites", [])[:4]]
        ratio = data.get("total", math.nan) / data["baseline"] if data.get("baseline") else math.inf
        text = (f"**Gradient spike{'s' if len(spikes) > 1 else ''} at step{'s' if len(spikes) > 1 else ''} "
                f"{steps_list(sorted(int(e['step']) for e in spikes))}** — finite, not NaN: the largest, at step "
                f"{worst['step']}, is {data.get('total', math.nan):.3g} = {ratio:.3g}x the running median "
                f"{data.get('baseline', math.nan):.3g}")
        text += f"; jumped: {', '.join(jumped)}" if jumped else ""
        capsule = next((p for p in trace.capsules if p.name == f"step_{int(worst['step']):06d}.pt"), None)
        written = [e.get("data") or {} for e in _events(trace, "capsule_written") if e["step"] == worst["step"]]
        if capsule is not None and (not any("replayer" in d for d in written) or any(d.get("replayer") for d in written)):
            text += (f". Is it right? {code('risdiag bisect --precision ' + capsule.as_posix())} compares it "
                     "with float64")
        elif capsule is not None:  # --precision rebuilds the step from a replayer, which this capsule lacks
            text += (f". Is it right? With a replayer (docs/script.md, 'Replaying later'), "
                     f"{code('risdiag bisect --precision ' + capsule.as_posix() + ' --replayer module:function')} "
                     "compares it with float64")
        items.append(text + ".")
    for event in _events(trace, "precision_audit"):
        if event.get("severity") == "warning":
            data = event.get("data") or {}
            remedies = "; ".join(data.get("remedies") or [])
            cause = str(event.get("message", "")).split(": ", 1)[-1]
            items.append(f"**Precision audit at step {event['step']}** — {cause}"
                         + (f". Remedies: {remedies}" if remedies else "") + ".")
    return items


def _column(trace: Trace, name: str, key: str):
    stats = matrix_stats(trace.steps, name)
    return stats[key] if key in stats else None


def op_hazard_items(trace: Trace, m: MatrixSummary, dtype: torch.dtype) -> list[str]:
    """eig / eigvals: Hermitian input, rounding-dominated backward; pinv: cut-off margin."""
    if m.op in EIG_OPS:
        return _eig_items(trace, m, dtype)
    if m.op in PINV_OPS:
        margin = _column(trace, m.name, "cutoff_margin")
        if margin is not None and (margin < PINV_CUTOFF_DECADES).any():
            steps = [int(s) for s in margin.index[margin < PINV_CUTOFF_DECADES]]
            return [f"{code(m.name)}: a singular value within {10 ** float(margin.min()):.2g}x of pinv's cut-off "
                    f"at steps {steps_list(steps)}: rounding decides whether it is dropped or inverted (1/s) — set "
                    "rtol/atol away from the spectrum, or regularise."]
    return []


def _eig_items(trace: Trace, m: MatrixSummary, dtype: torch.dtype) -> list[str]:
    items = []
    herm = _column(trace, m.name, "herm_err")
    if herm is not None and herm.notna().any() and float(herm.max()) <= hermitian_input_tol(dtype):
        alt = "eigh" if m.op == "eig" else "eigvalsh"
        items.append(f"{code(m.name)}: torch.linalg.{m.op} of a Hermitian matrix at every logged step (relative "
                     f"Hermitian error up to {float(herm.max()):.1e}): use torch.linalg.{alt} — real, sorted "
                     "eigenvalues and a backward without the phase term.")
    noise, terms = _column(trace, m.name, "phase_noise"), _column(trace, m.name, "gap_terms")
    if noise is None or terms is None:
        return items
    ratio = np.array([eig_rounding_ratio(a, b) for a, b in zip(noise.fillna(np.nan), terms.fillna(np.nan))])
    bad = ratio > PRECISION_GRAD_RTOL
    if bad.any():
        i = int(np.nanargmax(np.where(bad, ratio, -np.inf)))
        steps = [int(s) for s in noise.index[bad]]
        lam = _column(trace, m.name, "lambda_max")
        items.append(f"{code(m.name)}: rounding dominates the eig backward at steps {steps_list(steps)}: phase term "
                     f"noise {float(noise.iloc[i]):.1e} vs gap terms {float(terms.iloc[i]):.1e}"
                     + (f", eigenvalues up to {float(lam.iloc[i]):.1e}" if lam is not None else "")
                     + " — compute this eig in complex128, use eigh for a Hermitian input, or rescale the matrix.")
    return items
