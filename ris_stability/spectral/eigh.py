"""Hermitian eigendecomposition with a gap-aware backward.

PyTorch's eigh backward weighs every eigenvector pair (i, j) by 1 / (lambda_j - lambda_i). A tied pair
gives 0/0 = NaN even when the loss has a perfectly finite gradient (a projector onto a gapped subspace
does not change under rotations inside a degenerate cluster), and a nearly tied pair gives huge values.
:func:`eigh_gap_aware` keeps torch's forward bit for bit and replaces only those weights.

Rule (per matrix, eigenvalues ascending, scale s = max|lambda|, e_ij = (lambda_j - lambda_i) / s):

    F_ij = 0                              if |e_ij| <= tau    (tied: tau = tie_rtol(n, dtype), rule.py)
    F_ij = e_ij / (e_ij^2 + w^2) / s      otherwise           (w = eps argument, default tau)

    dA = V (diag(g_lambda) + F o skew(V^H g_V)) V^H,   skew(X) = (X - X^H) / 2

which is PyTorch's own eigh backward formula with 1/E replaced by F (the imaginary diagonal of V^H g_V, the
gauge direction of complex eigenvectors, is removed by giving F a zero diagonal).

Error of the rule:
- Losses invariant to rotations inside each tied cluster (projectors onto subspaces whose boundary is
  gapped, eigenvalue functions, |V|-weighted sums over whole clusters): the cluster blocks of
  skew(V^H g_V) vanish in exact arithmetic, so zeroing them removes only rounding noise; the result is
  exact up to the Lorentzian bias below.
- Losses that are not invariant: the true derivative inside a cluster is skew_ij / (lambda_j - lambda_i)
  with |lambda_j - lambda_i| <= tau * s, i.e. at least |skew_ij| / (tau * s), and is not even defined for
  an exact tie; it is dropped. The result is the gradient of the loss along the perturbations that do
  not rotate eigenvectors inside a cluster (the only ones along which the computed eigenvectors are
  reproducible).
- Near pairs (|e| > tau): each pair term is scaled by e^2 / (e^2 + w^2), a relative bias of
  w^2 / (e^2 + w^2) (< 1e-4 for relative gaps above 100 w), and bounded by 1 / (2 w s). With the default
  w = tau (float32, n = 144: tau = 3.4e-5) the bias is 1.2e-5 at a 1% gap, about the rounding noise
  eps / e that torch's own pair term carries; pass a larger eps (e.g. 1e-3) to cap the gradient of
  nearly tied pairs harder, at the price of a (eps / e)^2 bias.
"""
from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from ris_stability.spectral.originals import original
from ris_stability.spectral.rule import (SpectralArgumentError, check_eps, check_phase_invariance,
                                         relative_pair_weights)


class EighGapAware(torch.autograd.Function):
    """torch.linalg.eigh forward; backward with tied pairs masked and near pairs broadened."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, UPLO: str, eps: float | None):  # noqa: D102 (see eigh_gap_aware)
        eigenvalues, eigenvectors = original("linalg.eigh")(A, UPLO=UPLO)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        ctx.eps = eps
        return eigenvalues, eigenvectors

    @staticmethod
    def backward(ctx, g_lambda: torch.Tensor | None, g_v: torch.Tensor | None):  # noqa: D102
        eigenvalues, V = ctx.saved_tensors
        if g_v is None and g_lambda is None:
            return None, None, None
        if V.shape[-1] == 0:
            return torch.zeros_like(V), None, None
        if g_v is None:
            # Eigenvalue-only losses involve no pair terms: finite for any spectrum.
            return torch.matmul(V * g_lambda.unsqueeze(-2), V.mH), None, None
        vh_gv = torch.matmul(V.mH, g_v)
        if vh_gv.is_complex():
            check_phase_invariance(torch.diagonal(vh_gv, dim1=-2, dim2=-1).imag, "eigh_gap_aware", "eigenvectors")
        weights, scale = relative_pair_weights(eigenvalues, ctx.eps)
        # Fold skew's 1/2 and the 1/s into the real weights: one pass less over complex data.
        inner = (vh_gv - vh_gv.mH) * weights.mul_((0.5 / scale).unsqueeze(-1))
        if g_lambda is not None:
            inner.diagonal(dim1=-2, dim2=-1).copy_(g_lambda)
        return torch.matmul(V, torch.matmul(inner, V.mH)), None, None


def check_square(A: torch.Tensor, where: str) -> None:
    if not isinstance(A, torch.Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise SpectralArgumentError(
            f"{where}: A must be a batch of square matrices (..., n, n), got {shape}. Next step: check which "
            "tensor is passed as the matrix (use svd for rectangular ones)."
        )


def eigh_gap_aware(A: torch.Tensor, UPLO: str = "L", *, eps: float | None = None, out=None):
    """Eigen-decompose Hermitian A (..., n, n): (eigenvalues ascending, eigenvectors as columns).

    A drop-in for ``torch.linalg.eigh`` (same arguments, same named tuple, forward bit-identical: the
    ``UPLO`` triangle is read). The backward drops pairs tied within ``tie_rtol(n, dtype) * max|lambda|``
    and broadens the others with the relative Lorentzian width ``eps`` (None: the tie threshold); see
    the module docstring for the rule and its error. float32/float64/complex64/complex128, any batch.
    ``out=`` is handed to torch unchanged (no autograd there).
    """
    if has_torch_function((A,)):
        # Lets observers (TorchFunctionModes such as a spectral probe) see this call like torch.linalg.eigh.
        return handle_torch_function(eigh_gap_aware, (A,), A, UPLO, eps=eps, out=out)
    if out is not None:
        return original("linalg.eigh")(A, UPLO, out=out)
    eps = check_eps(eps, "eigh_gap_aware")
    check_square(A, "eigh_gap_aware")
    eigenvalues, eigenvectors = EighGapAware.apply(A, UPLO, eps)
    return torch.return_types.linalg_eigh((eigenvalues, eigenvectors))


# Duck-typed marker read by instruments: "this function is an eigh (outputs: eigenvalues ascending,
# eigenvectors)"; its sites are named after the function.
eigh_gap_aware.__spectral_op__ = "eigh"


def eigvalsh(A: torch.Tensor, UPLO: str = "L", *, out=None) -> torch.Tensor:
    """torch.linalg.eigvalsh, unchanged: its backward V diag(g) V^H has no pair terms, finite for any spectrum."""
    return torch.linalg.eigvalsh(A, UPLO, out=out)
