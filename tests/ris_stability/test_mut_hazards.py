"""The right hazard per op (linalg/hazards.py): which statistic of a call site is flagged, in which words, at which
limit. Per-site records as the probe writes them, plus monitored runs of real ops (the events a user reads)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.linalg import hazards
from ris_stability.linalg.hazards import eig_rounding_ratio, site_hazards, tie_message, tie_safe, vector_words
from ris_stability.numerics.tolerances import hermitian_input_tol, ill_conditioned_log10
from ris_stability.records import read_trace

F32, F64 = torch.float32, torch.float64


def _site(op: str, vec_grad: bool = False, backward: dict | None = None, **stats) -> dict:
    return {"op": op, "stats": stats, "vec_grad": vec_grad, "backward": backward, "location": "m.py:7", "module": "net"}


def _kinds(found) -> list[str]:
    return [h.kind for h in found]


# -- ties ---------------------------------------------------------------------------------------------------------
def test_a_pair_of_tied_eigenvalues_with_eigenvector_gradient_is_a_risk():
    (h,) = site_hazards("R", _site("linalg.eigh", True, max_cluster=2.0, cluster_value=1.5), F32)
    assert (h.kind, h.severity) == ("tied_eigenvalues", "warning")
    assert h.message == ("R (m.py:7): 2 eigenvalues tie at 1.500e+00 and its eigenvectors receive gradient: a risk, "
                         "not a fault: the eigenvectors' backward divides by eigenvalue gaps lambda_j - lambda_i, "
                         "which is 0/0 at a tie only where the loss's gradient has a share inside the cluster; this "
                         "step's gradients are finite")
    assert h.data == {"matrix": "R", "max_cluster": 2.0, "cluster_value": 1.5, "vec_grad": True, "nonfinite": False,
                      "location": "m.py:7", "module": "net"}


def test_a_tie_on_a_nonfinite_step_is_a_fault_in_the_ops_words():
    (h,) = site_hazards("S", _site("linalg.svd", True, max_cluster=3.0, cluster_value=0.0), F32, nonfinite=True)
    assert h.message.startswith("S (m.py:7): 3 singular values tie at 0.000e+00 and its singular vectors receive "
                                "gradient, and this step's gradients are non-finite: the singular-vector gradient "
                                "divides by s_j^2 - s_i^2")
    assert h.data["nonfinite"] is True and "a risk" not in h.message
    text = tie_message("S", "linalg.svd", "x.py:1", 2, 1.0)
    assert "divides by s_j^2 - s_i^2, which is 0/0" in text and "singular vectors' backward" in text


@pytest.mark.parametrize("site", [
    _site("linalg.eigh", False, max_cluster=4.0),               # no eigenvector gradient: eigenvalues only
    _site("linalg.eigh", True, max_cluster=1.0),                # no tie
    _site("linalg.eigh", True),                                 # no statistic
    _site("linalg.eigh_gap_aware", True, max_cluster=3.0),      # the gap-aware backward drops tied pairs
], ids=["no-vec-grad", "cluster-1", "no-stats", "gap-aware"])
def test_no_tie_hazard(site):
    assert site_hazards("R", site, F32) == []


def test_sparse_records():
    """A record with only what a watched matrix has (no op, location or cluster value) is still judged."""
    (h,) = site_hazards("R", {"stats": {"max_cluster": 2.0}, "vec_grad": True}, F32)
    assert h.message.startswith("R (): 2 eigenvalues tie at nan and its eigenvectors receive gradient: a risk")
    assert h.data["location"] is None and h.data["module"] is None
    assert site_hazards("R", {"vec_grad": True}, F32) == []  # no statistics: nothing to judge
    assert site_hazards("loss.subspace:eigh_gap_aware", {"stats": {"max_cluster": 3.0}, "vec_grad": True}, F32) == []


def test_gap_aware_by_site_name_and_unknown_ops():
    assert site_hazards("loss.subspace:eigh_gap_aware", _site("", True, max_cluster=2.0), F32) == []
    assert tie_safe("a:svd_gap_aware") and not tie_safe("a:linalg.svd")
    (h,) = site_hazards("U", _site("", True, max_cluster=2.0, cluster_value=1.0), F32)  # a watched matrix
    assert "2 eigenvalues tie" in h.message and h.data["location"] == "m.py:7"
    assert vector_words("linalg.svd") == "singular vectors" and vector_words("svd") == "singular vectors"
    assert vector_words("linalg.eigh") == "eigenvectors" and vector_words("no_such_op") == "eigenvectors"


# -- condition ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["linalg.inv", "linalg.solve", "linalg.cholesky", "inverse", "linalg.lstsq"])
def test_inverting_ops_flag_an_ill_conditioned_input(op):
    (h,) = site_hazards("A", _site(op, log10_cond=8.0, rank=4, n=4), F32)
    assert (h.kind, h.severity) == ("ill_conditioned", "warning")
    assert h.message == "A: log10 condition number 8.0 > 5.9; this op inverts it"
    assert h.data == {"matrix": "A", "log10_cond": 8.0, "rank": 4}


def test_the_condition_limit_follows_the_dtype():
    assert site_hazards("A", _site("linalg.inv", log10_cond=5.8), F32) == []  # 5.92 for float32
    assert site_hazards("A", _site("linalg.inv", log10_cond=ill_conditioned_log10(F32)), F32) == []  # at the limit
    assert _kinds(site_hazards("A", _site("linalg.inv", log10_cond=6.0), F32)) == ["ill_conditioned"]
    assert site_hazards("A", _site("linalg.inv", log10_cond=14.5), F64) == []  # 14.65 for float64
    assert _kinds(site_hazards("A", _site("linalg.inv", log10_cond=14.8), F64)) == ["ill_conditioned"]
    assert site_hazards("A", _site("linalg.inv", log10_cond=math.nan), F32) == []
    assert site_hazards("A", _site("linalg.inv"), F32) == []


def test_a_singular_input_names_its_rank():
    (h,) = site_hazards("A", _site("linalg.solve", log10_cond=math.inf, rank=3.0, n=5.0), F64)
    assert h.message == "A: singular (numerical rank 3 of 5); this op inverts it"
    (bare,) = site_hazards("A", _site("linalg.solve", log10_cond=math.inf), F64)  # a record without rank or size
    assert bare.message == "A: singular (numerical rank 0 of 0); this op inverts it" and bare.data["rank"] is None


@pytest.mark.parametrize("op", ["linalg.eigh", "linalg.svd", "linalg.eig", "linalg.eigvals", "linalg.pinv",
                                "linalg.qr", ""])
def test_ops_that_do_not_invert_get_no_condition_hazard(op):
    assert "ill_conditioned" not in _kinds(site_hazards("A", _site(op, log10_cond=12.0, rank=2, n=4), F32))


def test_an_inverting_op_with_a_tie_gets_both():
    found = site_hazards("A", _site("linalg.solve", True, max_cluster=2.0, cluster_value=1.0, log10_cond=9.0), F32)
    assert _kinds(found) == ["tied_eigenvalues", "ill_conditioned"]


# -- pinv ---------------------------------------------------------------------------------------------------------
def test_pinv_near_its_cutoff():
    (h,) = site_hazards("P", _site("linalg.pinv", True, cutoff_margin=0.5, max_cluster=3.0, log10_cond=20.0), F32)
    assert (h.kind, h.severity) == ("pinv_cutoff", "warning")
    assert h.message == ("P: a singular value lies within 3.2x of pinv's cut-off: whether it is dropped (0) or "
                         "inverted (1/s, the largest term) is decided by rounding; set rtol/atol away from the "
                         "spectrum or regularise")
    assert h.data == {"matrix": "P", "cutoff_margin": 0.5}
    assert site_hazards("P", _site("pinverse", cutoff_margin=1.0), F32) == []  # a decade away: clear
    assert site_hazards("P", _site("linalg.pinv", cutoff_margin=math.nan), F32) == []
    assert _kinds(site_hazards("P", _site("pinverse", cutoff_margin=0.99), F32)) == ["pinv_cutoff"]


# -- eig ----------------------------------------------------------------------------------------------------------
def test_eig_of_a_hermitian_input_suggests_eigh_and_eigvals_eigvalsh():
    tol = hermitian_input_tol(F32)
    (h,) = site_hazards("E", _site("linalg.eig", herm_err=tol), F32)
    assert (h.kind, h.severity) == ("eig_hermitian_input", "info")
    assert h.message == (f"E: torch.linalg.eig of a Hermitian matrix (relative Hermitian error {tol:.1e}): use "
                         "torch.linalg.eigh, which returns real sorted eigenvalues and has no phase term in its backward")
    assert h.data == {"matrix": "E", "herm_err": tol}
    (h,) = site_hazards("E", _site("linalg.eigvals", herm_err=0.0), F32)
    assert "use torch.linalg.eigvalsh," in h.message
    assert site_hazards("E", _site("linalg.eig", herm_err=tol * 1.01), F32) == []
    assert site_hazards("E", _site("linalg.eig"), F32) == []  # not measured
    assert site_hazards("E", _site("linalg.eig", herm_err=1e-14), F64) != []  # 100 eps of float64: 2.2e-14
    assert site_hazards("E", _site("linalg.eig", herm_err=1e-12), F64) == []


def test_eig_gets_no_tie_or_condition_hazard():
    site = _site("linalg.eig", True, max_cluster=4.0, cluster_value=1.0, log10_cond=20.0, herm_err=1.0)
    assert site_hazards("E", site, F32) == []


def test_eig_backward_rounding():
    site = _site("linalg.eig", backward={"phase_noise": 2e-7, "gap_terms": 1e-5}, lambda_max=4.8e11, herm_err=1.0)
    (h,) = site_hazards("E", site, F32)
    assert (h.kind, h.severity) == ("eig_backward_rounding", "warning")
    assert h.message == ("E: rounding dominates the eig backward: eigenvalues up to 4.8e+11, phase term noise 2.0e-07 "
                         "vs gap terms 1.0e-05 (the phase term is 0 in exact arithmetic for a phase-invariant loss); "
                         "compute this eig in complex128, use eigh for a Hermitian input, or rescale the matrix")
    assert h.data == {"matrix": "E", "phase_noise": 2e-7, "gap_terms": 1e-5, "lambda_max": 4.8e11}
    at_limit = _site("linalg.eig", backward={"phase_noise": 1.0, "gap_terms": 100.0}, herm_err=1.0)
    assert site_hazards("E", at_limit, F32) == []  # ratio exactly 0.01: the tolerance itself is fine
    unmeasured = _site("linalg.eig", backward={"phase_noise": 1.0}, herm_err=1.0)
    assert site_hazards("E", unmeasured, F32) == []  # no gap terms recorded: nothing to compare
    below = _site("linalg.eig", backward={"phase_noise": 1e-9, "gap_terms": 1e-5}, herm_err=1.0)
    assert site_hazards("E", below, F32) == []
    both = _site("linalg.eig", backward={"phase_noise": 1.0, "gap_terms": 0.0}, herm_err=0.0)
    assert _kinds(site_hazards("E", both, F32)) == ["eig_hermitian_input", "eig_backward_rounding"]
    assert site_hazards("E", _site("linalg.eig", backward=None, herm_err=1.0), F32) == []


def test_eig_rounding_ratio():
    assert eig_rounding_ratio(1.0, 4.0) == 0.25
    assert eig_rounding_ratio(1.0, 0.0) == math.inf and eig_rounding_ratio(0.0, 0.0) == 0.0
    assert math.isnan(eig_rounding_ratio(math.nan, 1.0)) and math.isnan(eig_rounding_ratio(1.0, math.nan))
    assert math.isnan(eig_rounding_ratio(math.inf, 1.0))


def test_rule_sets_come_from_the_registry():
    assert {"inv", "solve", "cholesky", "det", "lstsq"} <= hazards.CONDITION_OPS
    assert {"eig", "eigvals"} == set(hazards.EIG_OPS) and {"pinv", "pinverse"} == set(hazards.PINV_OPS)
    assert not {"eigh", "svd", "qr"} & (hazards.CONDITION_OPS | hazards.EIG_OPS | hazards.PINV_OPS)


# -- through the monitor ------------------------------------------------------------------------------------------
class _Inverse(nn.Module):
    """x -> inv(A) x, A = diag(1, ..., 10^-decades): condition number 10^decades."""

    def __init__(self, decades: float, op: str = "inv"):
        super().__init__()
        self.A = nn.Parameter(torch.diag(torch.logspace(0, -decades, 4)))
        self.op = op

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = getattr(torch.linalg, self.op)(self.A)  # looked up at call time: the probe's stand-in
        return ((out[0] if isinstance(out, tuple) else out) @ y).sum() * 1e-9


class _Eigh(nn.Module):
    """A loss on an eigenvector of diag(values)."""

    def __init__(self, values):
        super().__init__()
        self.A = nn.Parameter(torch.diag(torch.tensor(values)))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        w, V = torch.linalg.eigh(self.A)
        return (V[:, -1] @ y).abs().sum()


def _events(path, model, steps: int = 2) -> list[dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with MonitorSession(StabilityMonitor(path, MonitorConfig(policy="observe")), model, opt) as s:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            s.start_step(step)
            loss = model(torch.ones(4, 2))
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    return [e for e in read_trace(path).events if e["kind"] not in ("run_start", "run_end")]


def test_monitor_flags_an_ill_conditioned_inverse_once(tmp_path):
    events = _events(tmp_path / "bad", _Inverse(6.2))  # float32: the limit is 5.9, rank is lost at ~6.3
    assert [(e["kind"], e["step"]) for e in events] == [("ill_conditioned", 0)]
    assert events[0]["message"] == "model:linalg.inv: log10 condition number 6.2 > 5.9; this op inverts it"
    (singular,) = _events(tmp_path / "singular", _Inverse(9.0), steps=1)
    assert singular["message"] == "model:linalg.inv: singular (numerical rank 3 of 4); this op inverts it"
    assert _events(tmp_path / "fine", _Inverse(3.0)) == []


def test_monitor_does_not_flag_conditioning_of_an_eigh(tmp_path):
    events = _events(tmp_path / "eigh", _Inverse(8.0, "eigh"))
    assert "ill_conditioned" not in [e["kind"] for e in events]


def test_monitor_flags_a_pair_of_tied_eigenvalues_under_an_eigenvector_loss(tmp_path):
    """torch's eigh backward turns the tie into NaN (0 * 1/0): the tie is then named as the fault."""
    events = _events(tmp_path / "tie", _Eigh([1.0, 1.0, 2.0, 3.0]), steps=1)
    (tie,) = [e for e in events if e["kind"] == "tied_eigenvalues"]
    assert tie["step"] == 0 and tie["data"]["max_cluster"] == 2 and tie["data"]["nonfinite"] is True
    assert "2 eigenvalues tie at 1.000e+00 and its eigenvectors receive gradient, and this step's" in tie["message"]
    apart = _events(tmp_path / "apart", _Eigh([1.0, 1.5, 2.0, 3.0]), steps=1)
    assert [e["kind"] for e in apart] == []
