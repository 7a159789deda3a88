"""Hermitian eigendecomposition with a gap-aware backward.

PyTorch's eigh backward weighs every eigenvector pair (i, j) by 1 / (lambda_j - lambda_i). A tied pair
gives 0/0 = NaN even when the loss has a perfectly finite gradient (a projector onto a gapped
subspace does not change under rotations inside a degenerate cluster), and a nearly tied pair gives
huge values. `eigh_gap_aware` keeps torch's forward bit for bit and replaces only those weights.

Rule (per matrix, eigenvalues ascending, scale s = max|lambda|, e_ij = (lambda_j - lambda_i) / s):

    F_ij = 0                              if |e_ij| <= tau    (tied: tau = 4 n eps(dtype))
    F_ij = e_ij / (e_ij^2 + w^2) / s      otherwise           (w = eps argument, default tau)

    dA = V (diag(g_lambda) + F o skew(V^H g_V)) V^H,   skew(X) = (X - X^H) / 2

which is PyTorch's linalg_eigh_backward with 1/E replaced by F (the imaginary diagonal of V^H g_V,
the gauge direction of complex eigenvectors, is removed by giving F a zero diagonal).

Error of the rule:
- Losses invariant to rotations inside each tied cluster (projectors onto subspaces whose boundary
  is gapped, eigenvalue functions, |V|-weighted sums over whole clusters): the cluster blocks of
  skew(V^H g_V) vanish in exact arithmetic, so zeroing them removes only rounding noise; the result
  is exact up to the Lorentzian bias below.
- Losses that are not invariant: the true derivative inside a cluster is skew_ij / (lambda_j -
  lambda_i) with |lambda_j - lambda_i| <= tau * s, i.e. at least |skew_ij| / (tau * s), and is not
  even defined for an exact tie; it is dropped. The result is the gradient of the loss along the
  perturbations that do not rotate eigenvectors inside a cluster (the only ones along which the
  computed eigenvectors are reproducible).
- Near pairs (|e| > tau): each pair term is scaled by e^2 / (e^2 + w^2), a relative bias of
  w^2 / (e^2 + w^2) (< 1e-4 for relative gaps above 100 w), and bounded by 1 / (2 w s). With the
  default w = tau (float32, n = 144: tau = 6.9e-5) the bias is 5e-5 at a 1% gap, a few times the
  rounding noise eps / e that torch's own pair term carries; pass a larger eps (e.g. 1e-3) to cap
  the gradient of nearly tied pairs harder, at the price of a (eps / e)^2 bias.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.overrides import handle_torch_function, has_torch_function

from ris_model.numerics import PHASE_INVARIANCE_ATOL, broadening_tol, degenerate_tol, tiny_of


EighBackward = Literal["torch", "gap_aware"]
EIGH_BACKWARDS: tuple[str, ...] = ("torch", "gap_aware")


class EighConfigError(ValueError):
    """An invalid argument to eigh / eigh_gap_aware."""


class EigenvectorPhaseError(RuntimeError):
    """The loss depends on the arbitrary phase of complex eigenvectors, so its gradient is undefined."""


def pair_weights(eigenvalues: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """F_ij weighing pair (i, j) in the backward: 0 for tied pairs, Lorentzian-broadened 1/E otherwise.

    eigenvalues: (..., n) real, ascending. eps: relative broadening width (None: broadening_tol).
    Returns (..., n, n) real with a zero diagonal; F_ij -> 1 / (lambda_j - lambda_i) for wide gaps.
    """
    weights, scale = _relative_pair_weights(eigenvalues, eps)
    return weights / scale.unsqueeze(-1)


def _relative_pair_weights(eigenvalues: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F * s, s) with s = max|lambda| per matrix, shape (..., 1): the backward folds 1/s elsewhere."""
    n = eigenvalues.shape[-1]
    width = broadening_tol(eigenvalues.dtype, n) if eps is None else eps
    tau = degenerate_tol(eigenvalues.dtype, n)
    # Work in units of max|lambda| so thresholds are relative and e*e cannot overflow.
    scale = eigenvalues.abs().amax(dim=-1, keepdim=True).clamp_min(tiny_of(eigenvalues.dtype))
    lam = eigenvalues / scale
    e = lam.unsqueeze(-2) - lam.unsqueeze(-1)
    tied = e.abs() <= tau
    denom = torch.addcmul(e.new_full((), width * width), e, e)
    if width == 0:
        denom = denom.masked_fill(tied, 1.0)  # no 0/0 on ties, even in the unused branch
    return (e / denom).masked_fill_(tied, 0.0), scale


def _check_phase_invariance(vh_gv: torch.Tensor) -> None:
    """Raise like PyTorch when the loss depends on eigenvector phases (Im diag(V^H gV) != 0).

    Non-finite entries are let through on purpose: an upstream NaN must surface as a NaN gradient,
    not as a misleading phase error.
    """
    im_diag = torch.diagonal(vh_gv, dim1=-2, dim2=-1).imag.abs()
    offending = im_diag > PHASE_INVARIANCE_ATOL  # False for NaN
    if bool(offending.any()):
        worst = float(im_diag[offending].amax())
        raise EigenvectorPhaseError(
            "eigh_gap_aware backward: the loss depends on the phase of the complex eigenvectors "
            f"(max |Im diag(V^H dL/dV)| = {worst:.3g} > {PHASE_INVARIANCE_ATOL}); eigenvectors are "
            "only defined up to a factor e^{i phi}, so this gradient is ill-defined. Likely cause: a "
            "loss on raw eigenvector entries (e.g. V[..., 0].real). Next step: use phase-invariant "
            "quantities such as projectors V V^H, |V|^2 or |v^H a|^2."
        )


class EighGapAware(torch.autograd.Function):
    """torch.linalg.eigh forward; backward with tied pairs masked and near pairs broadened."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, eps: float | None):  # noqa: D102 (see eigh_gap_aware)
        eigenvalues, eigenvectors = torch.linalg.eigh(A)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        ctx.eps = eps
        return eigenvalues, eigenvectors

    @staticmethod
    def backward(ctx, g_lambda: torch.Tensor | None, g_v: torch.Tensor | None):  # noqa: D102
        eigenvalues, V = ctx.saved_tensors
        if g_v is None and g_lambda is None:
            return None, None
        if V.shape[-1] == 0:
            return torch.zeros_like(V), None
        if g_v is None:
            # Eigenvalue-only losses involve no pair terms: finite for any spectrum.
            return torch.matmul(V * g_lambda.unsqueeze(-2), V.mH), None
        vh_gv = torch.matmul(V.mH, g_v)
        if vh_gv.is_complex():
            _check_phase_invariance(vh_gv)
        weights, scale = _relative_pair_weights(eigenvalues, ctx.eps)
        # Fold skew's 1/2 and the 1/s into the real weights: one pass less over complex data.
        inner = (vh_gv - vh_gv.mH) * weights.mul_((0.5 / scale).unsqueeze(-1))
        if g_lambda is not None:
            inner.diagonal(dim1=-2, dim2=-1).copy_(g_lambda)
        return torch.matmul(V, torch.matmul(inner, V.mH)), None


def _check_eps(eps: float | None) -> None:
    if eps is None:
        return
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0.0 <= eps < float("inf")):
        raise EighConfigError(
            f"eigh_gap_aware: eps (relative Lorentzian width, a fraction of max|lambda|) must be a "
            f"finite float >= 0 or None, got {eps!r}. Next step: pass None for the dtype default "
            "(= the tie threshold 4 n eps(dtype)), or 0.0 for masking tied pairs only."
        )


def eigh_gap_aware(A: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose Hermitian A (..., n, n): (eigenvalues ascending, eigenvectors as columns).

    The forward is torch.linalg.eigh (lower triangle read, outputs bit-identical). The backward
    drops pairs tied within tau = 4 n eps(dtype) max|lambda| (numerics.degenerate_tol) and
    broadens the others with the relative Lorentzian width `eps` (None: tau); see the module
    docstring for the rule and its error.
    Supports float32/float64/complex64/complex128 and any leading batch dimensions.
    """
    if has_torch_function((A,)):
        # Lets observers (TorchFunctionModes such as a spectral probe) see this call like torch.linalg.eigh.
        return handle_torch_function(eigh_gap_aware, (A,), A, eps=eps)
    _check_eps(eps)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise EighConfigError(
            f"eigh_gap_aware: A must be a batch of square matrices (..., n, n), got shape "
            f"{tuple(A.shape)}. Next step: check which tensor is passed as the covariance."
        )
    eigenvalues, eigenvectors = EighGapAware.apply(A, None if eps is None else float(eps))
    return eigenvalues, eigenvectors


# Duck-typed marker read by instruments that never import ris_model: "this function is an eigh
# (outputs: eigenvalues ascending, eigenvectors)".
eigh_gap_aware.__spectral_op__ = "eigh"


def eigh(
    A: torch.Tensor, backward: EighBackward = "torch", eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hermitian eigendecomposition with a selectable backward; eigenvalues ascending.

    backward="torch": torch.linalg.eigh (exact 1/(lambda_j - lambda_i) pair weights; NaN on ties).
    backward="gap_aware": eigh_gap_aware(A, eps). Forward outputs are identical either way.
    """
    if backward == "gap_aware":
        return eigh_gap_aware(A, eps)
    if backward == "torch":
        if eps is not None:
            raise EighConfigError(
                f"eigh: eps={eps!r} only applies to backward='gap_aware'; torch's backward has no "
                "broadening. Next step: drop eps or select backward='gap_aware'."
            )
        eigenvalues, eigenvectors = torch.linalg.eigh(A)
        return eigenvalues, eigenvectors
    raise EighConfigError(
        f"eigh: unknown backward {backward!r}; valid choices: {', '.join(EIGH_BACKWARDS)}. "
        "Next step: fix loss.eigh_backward in the config."
    )
