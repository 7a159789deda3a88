"""SpectralProbe: call-site records, vec_grad, sampling, watch, cleanup, and bit-identical results."""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
from torch import nn

from ris_stability.numerics.stats import HAZARD_KEYS
from ris_stability.instruments.probe import ProbeError, SpectralProbe


def _line_of(marker: str) -> int:
    lines = pathlib.Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if marker in line and "_line_of" not in line)


class Subspace(nn.Module):
    """Projector onto the top-2 eigenvectors (uses eigenvectors) or the top eigenvalues only."""

    def __init__(self, use_vectors: bool = True):
        super().__init__()
        self.use_vectors = use_vectors

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        lam, vec = torch.linalg.eigh(r)  # eigh-call-site
        if self.use_vectors:
            top = vec[..., -2:]
            return (top @ top.mH).real.square().sum()
        return lam[..., -2:].sum()


class Block(nn.Module):
    def __init__(self, use_vectors: bool = True):
        super().__init__()
        self.inner = Subspace(use_vectors)


class Outer(nn.Module):
    def __init__(self, use_vectors: bool = True):
        super().__init__()
        self.proj = nn.Linear(4, 6 * 2)
        self.block = Block(use_vectors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x).view(x.shape[0], 6, 2)
        r = z @ z.mT + 0.1 * torch.eye(6)
        return self.block.inner(r)


class SpectralLoss(nn.Module):
    """A loss through eigh (vectors), cholesky and svd, on a small network's output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2 * 5 * 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.view_as_complex(self.net(x).view(x.shape[0], 5, 3, 2))
        # Distinct loading: f f^H has rank 3, so a multiple of I would tie two eigenvalues (NaN backward).
        r = f @ f.mH + torch.diag(torch.linspace(0.5, 1.0, 5)).to(f.dtype)
        vec = torch.linalg.eigh(r).eigenvectors[..., -2:]
        chol = torch.linalg.cholesky(r)
        s = torch.linalg.svdvals(f)
        u = torch.linalg.svd(f, full_matrices=False).U[..., :1]
        return (vec @ vec.mH).abs().sum() + chol.diagonal(dim1=-2, dim2=-1).real.log().sum() + s.sum() \
            + (u @ u.mH).abs().sum()


def _run(probe: SpectralProbe | None):
    torch.manual_seed(0)
    model = SpectralLoss()
    x = torch.randn(4, 3)
    if probe is None:
        loss = model(x)
        loss.backward()
    else:
        probe.roots = {"model": model}
        with probe:
            loss = model(x)
            loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("max_matrices", [None, 1], ids=["all-matrices", "first-matrix"])
def test_probe_leaves_outputs_and_gradients_bit_identical(max_matrices):
    loss_off, grads_off = _run(None)
    probe = SpectralProbe(max_matrices=max_matrices)
    loss_on, grads_on = _run(probe)
    assert all(bool(g.isfinite().all()) for g in grads_off)  # NaN != NaN would fail torch.equal anyway
    assert torch.equal(loss_off, loss_on)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on))
    records = probe.collect()
    assert set(records) == {"model:linalg.eigh", "model:linalg.cholesky", "model:linalg.svdvals", "model:linalg.svd"}
    assert records["model:linalg.eigh"]["vec_grad"] and records["model:linalg.svd"]["vec_grad"]
    assert not records["model:linalg.cholesky"]["vec_grad"]


def test_records_module_path_and_source_line_of_a_nested_eigh():
    model = Outer()
    with SpectralProbe(roots={"model": model}) as probe:
        model(torch.randn(3, 4)).backward()
    rec = probe.collect()["model.block.inner:linalg.eigh"]
    assert rec["module"] == "model.block.inner" and rec["op"] == "linalg.eigh" and rec["calls"] == 1
    assert rec["location"].endswith(f"test_probes.py:{_line_of('# eigh-call-site')}")
    assert rec["requires_grad"] is True
    assert rec["stats"]["n"] == 6 and rec["stats"]["rank"] == 6
    # 0.1 I plus a rank-2 part: four eigenvalues exactly at 0.1 in exact arithmetic, found as one cluster.
    assert rec["stats"]["max_cluster"] == 4 and rec["stats"]["cluster_value"] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("use_vectors, expected", [(True, True), (False, False)],
                         ids=["eigenvector-loss", "eigenvalue-only-loss"])
def test_vec_grad_flags_only_losses_that_use_eigenvectors(use_vectors, expected):
    model = Outer(use_vectors)
    with SpectralProbe(roots={"model": model}) as probe:
        model(torch.randn(3, 4)).backward()
    assert probe.collect()["model.block.inner:linalg.eigh"]["vec_grad"] is expected


def test_module_outside_the_roots_is_named_by_its_outermost_class_and_path():
    model = Outer()
    with SpectralProbe(roots={"other": nn.Linear(1, 1)}) as probe:
        model(torch.randn(3, 4))
    assert set(probe.collect()) == {"Outer.block.inner:linalg.eigh"}


def test_two_call_sites_of_one_op_in_one_module_stay_apart():
    r = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with SpectralProbe() as probe:
        torch.linalg.eigvalsh(r)
        torch.linalg.eigvalsh(2 * r)
    records = probe.collect()
    assert len(records) == 2
    assert sorted(rec["stats"]["lambda_max"] for rec in records.values()) == [3.0, 6.0]


def test_watch_reports_the_worst_case_of_known_spectra_and_uses_the_given_k():
    # Three Hermitian matrices with known eigenvalues (ascending) and signal dimensions k = 1, 2, 3.
    spectra = torch.tensor([[0.1, 0.2, 1.0, 2.0, 4.0],     # k = 1: split 4.0 - 2.0 = 2.0
                            [0.1, 0.5, 0.55, 3.0, 5.0],    # k = 2: split 3.0 - 0.55; smallest gap 0.05
                            [0.3, 0.4, 1.0, 1.5, 6.0]],    # k = 3: split 1.0 - 0.4 = 0.6
                           dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 5, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)))
    r = q @ torch.diag_embed(spectra.to(torch.complex128)) @ q.mH
    with SpectralProbe() as probe:
        probe.watch("R_blend", r, k=torch.tensor([1, 2, 3]))
    rec = probe.collect()["R_blend"]
    assert rec["op"] == "watch"
    want = {"n": 5, "rank": 5, "lambda_min": 0.1, "lambda_max": 6.0, "cond": 50.0, "min_gap": 0.05,
            "gap_split": 0.6, "max_cluster": 1}
    assert {key: rec["stats"][key] for key in want} == pytest.approx(want, rel=1e-9)
    assert all(math.isnan(rec["stats"][key]) for key in HAZARD_KEYS)  # op hazards: not a watched matrix's
    with pytest.raises(ProbeError, match="square"):
        probe.watch("bad", torch.zeros(3, 4))


def test_signal_dim_applies_to_calls_with_matching_batch_shape():
    ev = torch.tensor([[0.0, 1.0, 3.0, 7.0], [0.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    r = torch.diag_embed(ev)
    with SpectralProbe() as probe:
        probe.set_signal_dim(torch.tensor([1, 2]))
        torch.linalg.eigvalsh(r)           # batch (2,): k applies -> gap_split = min(4, 1)
        torch.linalg.eigvalsh(r[0])        # no batch: k does not apply -> NaN
    by_batch = sorted(probe.collect().values(), key=lambda rec: rec["location"])
    assert by_batch[0]["stats"]["gap_split"] == 1.0
    assert math.isnan(by_batch[1]["stats"]["gap_split"])


def test_sampling_every_and_max_matrices():
    good_then_singular = torch.stack([torch.eye(3), torch.diag(torch.tensor([1.0, 1.0, 0.0]))])
    with SpectralProbe(every=2, max_matrices=1) as probe:
        probe.step(1)
        torch.linalg.qr(good_then_singular)
        assert probe.collect() == {}
        probe.step(2)
        torch.linalg.qr(good_then_singular)  # qr gives no spectrum: the probe factorises max_matrices itself
    rec = probe.collect()["linalg.qr"]
    assert rec["calls"] == 1 and rec["stats"]["cond"] == 1.0  # the singular second matrix was not sampled


@pytest.mark.parametrize("op", ["eigh", "eigvalsh", "svd", "svdvals"])
def test_worst_sample_of_the_whole_batch_is_found(op):
    """An exact tie in sample 5 of 8 is found with max_matrices=4: ops that return their spectrum are
    measured on the whole batch."""
    torch.manual_seed(0)
    ev = torch.rand(8, 6, dtype=torch.float64).sort(-1).values + torch.arange(6) * 0.5
    ev[5, 2] = ev[5, 3] = ev[5, 4] = 1.7
    q, _ = torch.linalg.qr(torch.randn(8, 6, 6, dtype=torch.float64))
    a = q @ torch.diag_embed(ev) @ q.mT
    with SpectralProbe(max_matrices=4) as probe:
        getattr(torch.linalg, op)(a)  # looked up inside: the probe swaps the entry point in
    (rec,) = probe.collect().values()
    assert rec["stats"]["max_cluster"] == 3 and rec["stats"]["cluster_value"] == pytest.approx(1.7, rel=1e-9)


def test_a_site_called_with_two_shapes_reports_both():
    with SpectralProbe() as probe:
        for n in (6, 3):
            torch.linalg.svdvals(torch.randn(4, n, n, dtype=torch.float64) + 5 * torch.eye(n))
    recs = probe.collect()
    assert sorted(r["stats"]["n"] for r in recs.values()) == [3, 6]
    assert len({r["location"] for r in recs.values()}) == 1 and any(name.endswith("[3x3]") for name in recs)


def test_failed_cholesky_records_its_indefinite_input_and_reraises():
    bad = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    with SpectralProbe() as probe:
        with pytest.raises(torch.linalg.LinAlgError):
            torch.linalg.cholesky(bad)
    assert probe.collect()["linalg.cholesky"]["stats"]["lambda_min"] == -0.5


def test_general_ops_use_singular_values():
    a = torch.tensor([[2.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    with SpectralProbe() as probe:
        torch.linalg.solve(a, torch.ones(2, dtype=torch.float64))
    stats = probe.collect()["linalg.solve"]["stats"]
    assert stats["cond"] == pytest.approx(float(torch.linalg.cond(a)), rel=1e-12)
    assert math.isnan(stats["herm_err"])  # solve does not assume a Hermitian input


def _entry_point_state():
    from ris_stability.observe.intercept import ENTRY_POINTS
    return {(id(e.owner), e.attr): (getattr(e.owner, e.attr), e.attr in vars(e.owner)) for e in ENTRY_POINTS}


def test_everything_is_removed_on_exit_even_when_an_exception_propagates():
    import torch.nn.modules.module as module_mod

    original_eigh, before = torch.linalg.eigh, _entry_point_state()
    hooks_before = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    probe = SpectralProbe()
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            assert torch.linalg.eigh is not original_eigh  # observed through a stand-in while active ...
            assert torch.linalg.eigh == original_eigh and {original_eigh: 1}.get(torch.linalg.eigh) == 1  # ... equal
            assert torch._C._len_torch_function_stack() == 0  # and no mode sees the other torch calls
            raise RuntimeError("boom")
    assert _entry_point_state() == before and torch.linalg.eigh is original_eigh
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == hooks_before
    torch.linalg.eigvalsh(torch.eye(2))  # not intercepted any more
    assert probe.collect() == {} and not probe.active
    with probe:  # and it can be entered again
        torch.linalg.eigvalsh(torch.eye(2))
        torch.eye(2).inverse()  # Tensor methods too
    assert list(probe.collect()) == ["linalg.eigvalsh", "inverse"]
    assert _entry_point_state() == before


def test_re_entering_an_active_probe_is_an_error():
    probe = SpectralProbe()
    before = _entry_point_state()
    with probe:
        with pytest.raises(ProbeError, match="already active"):
            probe.__enter__()
    assert _entry_point_state() == before


class Failing(nn.Module):
    def forward(self, r: torch.Tensor) -> torch.Tensor:
        raise FloatingPointError("planted failure inside a module")


def test_module_stack_recovers_when_a_module_forward_raises():
    failing = Failing()
    with SpectralProbe(roots={"model": failing}) as probe:
        with pytest.raises(FloatingPointError):
            failing(torch.eye(2))
        torch.linalg.eigvalsh(torch.eye(2))  # outside every module again
    assert list(probe.collect()) == ["linalg.eigvalsh"]


def custom_eigh(a: torch.Tensor):
    """A user eigh outside torch that declares itself to instruments."""
    if torch.overrides.has_torch_function((a,)):
        return torch.overrides.handle_torch_function(custom_eigh, (a,), a)
    return torch.linalg.eigh(a)


custom_eigh.__spectral_op__ = "eigh"


def test_functions_marked_as_spectral_ops_are_probed_under_their_own_name():
    a = torch.diag(torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)).requires_grad_()
    with SpectralProbe() as probe:
        lam, vec = custom_eigh(a)
        lam.sum().backward()
    rec = probe.collect()
    assert list(rec) == ["custom_eigh"]  # the torch.linalg.eigh inside it is not counted twice
    assert rec["custom_eigh"]["stats"]["max_cluster"] == 2 and rec["custom_eigh"]["vec_grad"] is False


class _MarkedEigh(torch.autograd.Function):
    """An eigh with its own backward: its outputs require grad only once apply() has returned."""

    @staticmethod
    def forward(ctx, a):
        lam, vec = torch.linalg.eigh(a)
        ctx.save_for_backward(vec)
        return lam, vec

    @staticmethod
    def backward(ctx, g_lam, g_vec):
        (vec,) = ctx.saved_tensors
        return vec @ torch.diag_embed(g_lam if g_lam is not None else torch.zeros_like(vec[..., 0])) @ vec.mH


def function_eigh(a: torch.Tensor):
    return _MarkedEigh.apply(a)


function_eigh.__spectral_op__ = "eigh"


@pytest.mark.parametrize("use_vectors", [True, False], ids=["vectors-used", "values-only"])
def test_marked_autograd_function_gets_its_name_and_its_vector_gradient_watched(use_vectors):
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)).requires_grad_()
    with SpectralProbe() as probe:
        lam, vec = function_eigh(a)  # marked-call-site
        (vec.abs().sum() if use_vectors else lam.sum()).backward()
    rec = probe.collect()
    assert list(rec) == ["function_eigh"]
    assert rec["function_eigh"]["vec_grad"] is use_vectors
    assert rec["function_eigh"]["location"].endswith(f"test_probes.py:{_line_of('# marked-call-site')}")



def test_collect_async_gives_the_records_collect_would():
    r = torch.diag(torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=torch.float64))
    records = []
    for use_async in (False, True):
        with SpectralProbe() as probe:
            torch.linalg.eigvalsh(r)
            probe.watch("R", r)
        records.append(probe.collect_async()() if use_async else probe.collect())
    def plain(recs):
        return {n: {k: v for k, v in r.items() if k not in ("stats", "backward", "grad_norm")} for n, r in recs.items()}
    assert plain(records[1]) == plain(records[0]) and set(records[0]) == {"linalg.eigvalsh", "R"}
    for name in records[0]:
        assert records[1][name]["stats"] == pytest.approx(records[0][name]["stats"], nan_ok=True)
    assert records[1]["linalg.eigvalsh"]["stats"]["max_cluster"] == 2 and records[1]["R"]["calls"] == 1
    assert probe.collect_async()() == {}  # nothing recorded since
