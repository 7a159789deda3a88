"""The gap-aware decompositions as drop-ins (spectral/rule.py, eigh.py, svd.py): phase-dependent losses refused at
torch's own limit and in words that name the function, batches of matrices of any scale, observers
(TorchFunctionModes) that see each call with the user's arguments, out=, driver=, and the torch re-exports."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ris_stability.spectral import (PhaseDependenceError, SpectralArgumentError, eigh_gap_aware, eigvalsh,
                                    svd_gap_aware, svd_old_gap_aware, svdvals)

C128 = torch.complex128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- phase dependence
def _phase_loss(vectors: torch.Tensor, ref: torch.Tensor, share: float) -> torch.Tensor:
    """A gauge-invariant loss plus ``share`` x 1e-2 of the phase of the first vector's first entry (its derivative
    along e^{i phi} of that vector is exactly share x 1e-2)."""
    unit = ref.conj() / ref.abs()
    return share * 1e-2 / float(ref.abs()) * (vectors[0, 0] * unit).imag + vectors[:, :2].abs().square().sum()


def _refused(decompose, a: torch.Tensor, pick, share: float) -> bool:
    ref = pick(decompose(a))[0, 0]
    x = a.clone().requires_grad_()
    try:
        _phase_loss(pick(decompose(x)), ref, share).backward()
    except RuntimeError:
        return True
    assert torch.isfinite(x.grad).all()
    return False


SVD_FACTORS = {"U": lambda out: out[0], "V": lambda out: out[2].mH}


@pytest.mark.parametrize("factor", list(SVD_FACTORS))
@pytest.mark.parametrize("share", [0.3, 0.7, 1.5])
def test_svd_refuses_phase_dependent_losses_exactly_where_torch_does(factor, share):
    """torch's svd backward refuses a phase derivative above 5e-3 (its check is on skew(U^H gU), twice it): a
    drop-in must refuse the same losses, not hand back a gradient for an ill-defined one."""
    a = torch.randn(5, 4, dtype=C128, generator=_gen(17))
    pick = SVD_FACTORS[factor]
    ours = _refused(lambda x: svd_gap_aware(x, full_matrices=False), a, pick, share)
    assert ours == _refused(lambda x: torch.linalg.svd(x, full_matrices=False), a, pick, share)
    assert ours == (share > 0.5)


@pytest.mark.parametrize("share", [0.7, 1.5])
def test_eigh_refuses_phase_dependent_losses_exactly_where_torch_does(share):
    """torch's eigh backward refuses a phase derivative above 1e-2 (Im diag V^H gV): so does the gap-aware one."""
    x = torch.randn(5, 5, dtype=C128, generator=_gen(18))
    h = x @ x.mH
    pick = lambda out: out[1]  # noqa: E731
    ours = _refused(eigh_gap_aware, h, pick, share)
    assert ours == _refused(torch.linalg.eigh, h, pick, share) == (share > 1)



def test_a_phase_derivative_exactly_at_the_limit_is_accepted_like_torch():
    """diag(3, 2, 1): the vectors are the unit axes, so the phase derivative is exactly the loss's coefficient;
    at the limit torch accepts the loss and so do the drop-ins, a hair above both refuse."""
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=C128))
    cases = [(eigh_gap_aware, torch.linalg.eigh, lambda out: out[1][0, 2], 1e-2),
             (svd_gap_aware, torch.linalg.svd, lambda out: out[0][0, 0], 5e-3)]  # torch's svd limit is half eigh's
    for ours, theirs, pick, limit in cases:
        for coefficient, refused in [(limit, False), (limit * (1 + 1e-6), True)]:
            for decompose in (ours, theirs):
                x = d.clone().requires_grad_()
                loss = coefficient * pick(decompose(x)).imag
                if refused:
                    with pytest.raises(RuntimeError):
                        loss.backward()
                else:
                    loss.backward()

def test_phase_errors_name_the_function_the_vectors_and_the_worst_value():
    a = torch.randn(5, 4, dtype=C128, generator=_gen(19)).requires_grad_()
    with pytest.raises(PhaseDependenceError) as svd_error:
        svd_gap_aware(a, full_matrices=False)[0].real.sum().backward()
    h = (a @ a.mH).detach().requires_grad_()
    with pytest.raises(PhaseDependenceError) as eigh_error:
        eigh_gap_aware(h)[1].real.sum().backward()
    # d loss / dV = 1 everywhere: Im diag V^H gV = -Im of each column's sum (twice that for torch's svd check)
    u, v = torch.linalg.svd(a.detach(), full_matrices=False)[0], torch.linalg.eigh(h.detach())[1]
    cases = [(svd_error, "svd_gap_aware", "singular vectors", 2 * u.sum(0).imag.abs().max()),
             (eigh_error, "eigh_gap_aware", "eigenvectors", v.sum(0).imag.abs().max())]
    for error, where, what, worst in cases:
        assert str(error.value) == (
            f"{where} backward: the loss depends on the phase of the complex {what} (max |Im diag| = {float(worst):.3g} "
            "> 0.01); they are only defined up to a factor e^{i phi}, so this gradient is ill-defined. Likely cause: a "
            "loss on raw vector entries (e.g. V[..., 0].real). Next step: use phase-invariant quantities such as "
            "projectors V V^H, |V|^2 or |v^H a|^2.")


# ----------------------------------------------------------------------------- observers, out=, driver=
class CallRecorder(TorchFunctionMode):
    """What an observer (the locator's and the probe's modes) sees: each call, by function, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _equal(x, y) -> bool:
    return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def _same(x, y) -> bool:
    return type(x) is type(y) and _equal(x, y)


def test_observers_see_each_call_with_the_users_arguments_and_change_nothing():
    a = torch.randn(5, 3, dtype=torch.float64, generator=_gen(20))
    h = a.mT @ a
    with CallRecorder() as seen:
        outs = [eigh_gap_aware(h, "U", eps=1e-3), svd_gap_aware(a, False, eps=0.0), svd_old_gap_aware(a, False),
                svd_old_gap_aware(a, True, False)]
    assert [(f, args[1:], kwargs) for f, args, kwargs in seen.calls] == [
        (eigh_gap_aware, ("U",), {"eps": 1e-3, "out": None}),
        (svd_gap_aware, (False,), {"driver": None, "eps": 0.0, "out": None}),
        (svd_old_gap_aware, (False, True), {"out": None}),
        (svd_old_gap_aware, (True, False), {"out": None})]
    assert all(args[0] is (h if f is eigh_gap_aware else a) for f, args, _ in seen.calls)
    refs = [torch.linalg.eigh(h, UPLO="U"), torch.linalg.svd(a, full_matrices=False), torch.svd(a, some=False),
            torch.svd(a, compute_uv=False)]
    assert all(_same(x, y) for x, y in zip(outs, refs))
    assert outs[2].U.shape == (5, 5) and outs[3].U.abs().sum() == 0  # some=False: full U; no vectors: zeros
    assert _same(svd_gap_aware(a), torch.linalg.svd(a)) and svd_gap_aware(a).U.shape == (5, 5)  # full by default


def _buffers(*shapes, dtype=torch.float64):
    return tuple(torch.empty(shape, dtype=dtype) for shape in shapes)


@pytest.mark.parametrize("observed", [False, True], ids=["plain", "observed"])
def test_out_buffers_are_filled_like_torchs(observed):
    a = torch.randn(4, 3, dtype=torch.float64, generator=_gen(21))
    h = a @ a.mT
    with CallRecorder() if observed else torch.autograd.set_grad_enabled(True):
        eigh_out, svd_out, old_out = _buffers((4,), (4, 4)), _buffers((4, 4), (3,), (3, 3)), _buffers((4, 3), (3,), (3, 3))
        eigh_gap_aware(h, out=eigh_out)
        upper_out = _buffers((4,), (4, 4))
        eigh_gap_aware(h + torch.tril(a @ a.mT, -1), "U", out=upper_out)  # the lower triangle is not read
        svd_gap_aware(a, out=svd_out)
        svd_old_gap_aware(a, out=old_out)
        reduced_out = _buffers((4, 3), (3,), (3, 3))
        svd_gap_aware(a, False, out=reduced_out)
        values_out, singular_out = torch.empty(4, dtype=torch.float64), torch.empty(3, dtype=torch.float64)
        eigvalsh(h, out=values_out)
        svdvals(a, out=singular_out)
    assert _equal(eigh_out, torch.linalg.eigh(h)) and _equal(svd_out, torch.linalg.svd(a))
    assert _equal(old_out, torch.svd(a)) and _equal(upper_out, torch.linalg.eigh(h, UPLO="U"))
    assert _equal(reduced_out, torch.linalg.svd(a, full_matrices=False)) and reduced_out[0].shape == (4, 3)
    assert torch.equal(values_out, torch.linalg.eigvalsh(h)) and torch.equal(singular_out, torch.linalg.svdvals(a))


def test_driver_is_handed_to_torch():
    """driver= selects a cuSOLVER routine: on a CPU tensor torch refuses it, and so do the drop-ins."""
    a = torch.randn(4, 3, dtype=torch.float64, generator=_gen(22))
    for call in (lambda: torch.linalg.svd(a, driver="gesvd"), lambda: svd_gap_aware(a, driver="gesvd"),
                 lambda: svd_gap_aware(a, driver="gesvd", out=_buffers((4, 4), (3,), (3, 3))),
                 lambda: svdvals(a, driver="gesvd")):
        with pytest.raises(RuntimeError, match="driver="):
            call()
        with CallRecorder(), pytest.raises(RuntimeError, match="driver="):
            call()


def test_eigvalsh_and_svdvals_are_torchs():
    """Values-only decompositions: torch's results, the UPLO triangle read, and a finite gradient at a tie."""
    x = torch.randn(5, 5, dtype=C128, generator=_gen(23))  # not Hermitian: the triangle read matters
    assert torch.equal(eigvalsh(x), torch.linalg.eigvalsh(x)) and torch.equal(eigvalsh(x, "U"), torch.linalg.eigvalsh(x, "U"))
    assert not torch.equal(eigvalsh(x), eigvalsh(x, "U"))
    assert torch.equal(svdvals(x), torch.linalg.svdvals(x))
    tied = torch.eye(4, dtype=torch.float64).requires_grad_()
    (eigvalsh(tied).square().sum() + svdvals(tied).sum()).backward()
    assert torch.equal(tied.grad, 3 * torch.eye(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: eigh_gap_aware(torch.ones(2, 3)), "eigh_gap_aware: A must be a batch of square matrices "
                 "(..., n, n), got (2, 3). Next step: check which tensor is passed as the matrix (use svd for "
                 "rectangular ones).", id="eigh-rectangular"),
    pytest.param(lambda: eigh_gap_aware(torch.ones(3)), "eigh_gap_aware: A must be a batch of square matrices "
                 "(..., n, n), got (3,).", id="eigh-vector"),
    pytest.param(lambda: svd_gap_aware(torch.ones(3)), "svd_gap_aware: A must be a batch of matrices (..., m, n), "
                 "got (3,). Next step: check which tensor is passed to the decomposition.", id="svd-vector"),
    pytest.param(lambda: svd_gap_aware([[1.0]]), "svd_gap_aware: A must be a batch of matrices (..., m, n), got "
                 "list.", id="svd-list"),
    pytest.param(lambda: eigh_gap_aware([[1.0]]), "eigh_gap_aware: A must be a batch of square matrices (..., n, n), "
                 "got list.", id="eigh-list"),
    pytest.param(lambda: eigh_gap_aware(torch.eye(2), eps="0.1"), "eigh_gap_aware: eps (relative Lorentzian "
                 "width, a fraction of the largest eigen/singular value) must be a finite float >= 0 or None, got "
                 "'0.1'. Next step: pass None for the dtype default (= the tie threshold tie_rtol(n, dtype)), or 0.0 "
                 "for masking tied pairs only.", id="eps-string"),
    pytest.param(lambda: svd_gap_aware(torch.eye(2), eps=float("inf")), "svd_gap_aware: eps (relative", id="svd-inf-eps"),
])
def test_bad_arguments_are_refused_in_words_that_say_what_to_do(call, message):
    with pytest.raises(SpectralArgumentError) as error:
        call()
    assert str(error.value).startswith(message)
