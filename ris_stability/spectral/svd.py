"""Singular value decomposition with a gap-aware backward (full and reduced; real and complex).

PyTorch's svd backward (A = U diag(s) V^H, m x n, k = min(m, n)) divides by s_j^2 - s_i^2 for every
pair and by s_i for the complement of a rectangular U or V and for the complex phase term. Writing
a = skew(U^H gU), b = skew(V^H gV) (skew(X) = X - X^H), its pair term splits exactly into

    (a_ij s_j + b_ij s_i) / (s_j^2 - s_i^2) = 1/2 [ (a + b)_ij / (s_j - s_i) + (a - b)_ij / (s_j + s_i) ]

so the hazards are a tie (s_j - s_i ~ 0) and two zero singular values (s_j + s_i ~ 0: rank
deficiency, whose singular vectors are an arbitrary basis of the null space). :func:`svd_gap_aware`
keeps torch's forward bit for bit and replaces each 1/x (x = s_j - s_i, s_j + s_i, s_i, relative to
s_max) by the Lorentzian of the tie rule (rule.py): 0 when |x| <= tau = tie_rtol(max(m, n), dtype),
x / (x^2 + w^2) otherwise (w = eps, default tau). The diagonal (i = j) keeps the phase term
(a - b)_ii / (4 s_i) of torch; the complement term (I - U U^H) gU diag(1/s) uses the same 1/s_i.

Error of the rule: as for eigh (eigh.py). Losses invariant inside each cluster of tied singular
values (projectors U_k U_k^H onto a gapped top-k, functions of s, whole-cluster sums) get their exact
gradient up to the Lorentzian bias w^2 / (x^2 + w^2); that includes the null space of a rank-deficient
matrix (a cluster at 0) and its arbitrary columns, which such losses do not see. For other losses the
dropped terms are the derivative along rotations inside a cluster, which is undefined (0/0) or
amplified rounding (|term| >= |a_ij| / (tau s_max)). With ``full_matrices=True`` the extra columns of
U / rows of V^H receive no gradient (as in torch: they are an arbitrary basis).
"""
from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from ris_stability.spectral.originals import original
from ris_stability.spectral.rule import (SpectralArgumentError, check_eps, check_phase_invariance, lorentz,
                                         relative_scale, tie_rtol)


def _svd_pair_weights(S: torch.Tensor, size: int, eps: float | None):
    """(1/2 F-, 1/2 F+, 1/s) of the rule, in absolute units: F-_ij ~ 1/(s_j - s_i), F+_ij ~ 1/(s_j + s_i)."""
    tau = tie_rtol(size, S.dtype)
    width = tau if eps is None else eps
    scale = relative_scale(S)
    sig = S / scale
    half = (0.5 / scale).unsqueeze(-1)
    minus = lorentz(sig.unsqueeze(-2) - sig.unsqueeze(-1), tau, width).mul_(half)
    plus = lorentz(sig.unsqueeze(-2) + sig.unsqueeze(-1), tau, width).mul_(half)
    return minus, plus, lorentz(sig, tau, width).div_(scale)


def _inner(U, Vh, gU, gS, gVh, minus: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """The k x k middle factor of dA = U inner V^H (pair terms, g_s on the diagonal)."""
    a = U.mH @ gU if gU is not None else None
    b = Vh @ gVh.mH if gVh is not None else None
    a = a - a.mH if a is not None else None
    b = b - b.mH if b is not None else None
    if U.is_complex():
        # torch checks Im diag of skew(U^H gU) + skew(V^H gV) (twice the phase derivative): the same limit
        im = sum(torch.diagonal(x, dim1=-2, dim2=-1).imag for x in (a, b) if x is not None)
        check_phase_invariance(im, "svd_gap_aware", "singular vectors")
    if a is not None and b is not None:
        inner = (a + b) * minus + (a - b) * plus
    elif a is not None:
        inner = a * (minus + plus)
    else:
        inner = b * (minus - plus)
    if gS is not None:
        inner.diagonal(dim1=-2, dim2=-1).add_(gS)
    return inner


class SvdGapAware(torch.autograd.Function):
    """torch.linalg.svd forward; backward with tied and null pairs masked, near pairs broadened."""

    @staticmethod
    def forward(ctx, A, full_matrices: bool, driver, eps):  # noqa: D102 (see svd_gap_aware)
        U, S, Vh = original("linalg.svd")(A, full_matrices=full_matrices, driver=driver)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(U, S, Vh)
        ctx.eps, ctx.shape = eps, A.shape[-2:]
        return U, S, Vh

    @staticmethod
    def backward(ctx, gU, gS, gVh):  # noqa: D102
        U, S, Vh = ctx.saved_tensors
        m, n = ctx.shape
        k = S.shape[-1]
        # full_matrices: the columns beyond k are an arbitrary basis; like torch, they get no gradient.
        U, Vh = U[..., :k], Vh[..., :k, :]
        gU = gU[..., :k] if gU is not None else None
        gVh = gVh[..., :k, :] if gVh is not None else None
        if gU is None and gVh is None:
            if gS is None:
                return None, None, None, None
            # Singular-value-only losses involve no pair terms: finite for any spectrum.
            return (U @ (gS.unsqueeze(-1) * Vh) if m >= n else (U * gS.unsqueeze(-2)) @ Vh), None, None, None
        if k == 0:
            return torch.zeros(ctx.shape, dtype=U.dtype, device=U.device).expand(*U.shape[:-2], m, n), None, None, None
        minus, plus, inverse = _svd_pair_weights(S, max(m, n), ctx.eps)
        inner = _inner(U, Vh, gU, gS, gVh, minus, plus)
        if m > n and gU is not None:
            gus = gU * inverse.unsqueeze(-2)
            gA = (U @ inner + gus - U @ (U.mH @ gus)) @ Vh
        elif m < n and gVh is not None:
            sgvh = gVh * inverse.unsqueeze(-1)
            gA = U @ (inner @ Vh + sgvh - (sgvh @ Vh.mH) @ Vh)
        else:
            gA = U @ (inner @ Vh) if m >= n else (U @ inner) @ Vh
        return gA, None, None, None


def _check_matrix(A, where: str) -> None:
    if not isinstance(A, torch.Tensor) or A.dim() < 2:
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise SpectralArgumentError(f"{where}: A must be a batch of matrices (..., m, n), got {shape}. Next step: "
                                    "check which tensor is passed to the decomposition.")


def svd_gap_aware(A: torch.Tensor, full_matrices: bool = True, *, driver: str | None = None,
                  eps: float | None = None, out=None):
    """A = U diag(S) Vh for A (..., m, n): singular values descending, as ``torch.linalg.svd``.

    A drop-in for ``torch.linalg.svd`` (same arguments, same named tuple, forward bit-identical). The
    backward masks tied and null singular-value pairs and broadens near ones (module docstring); it is
    finite for rank-deficient inputs and exact for losses invariant inside the clusters. ``out=`` is
    handed to torch unchanged (no autograd there).
    """
    if has_torch_function((A,)):
        return handle_torch_function(svd_gap_aware, (A,), A, full_matrices, driver=driver, eps=eps, out=out)
    if out is not None:
        return original("linalg.svd")(A, full_matrices, driver=driver, out=out)
    eps = check_eps(eps, "svd_gap_aware")
    _check_matrix(A, "svd_gap_aware")
    U, S, Vh = SvdGapAware.apply(A, bool(full_matrices), driver, eps)
    return torch.return_types.linalg_svd((U, S, Vh))


svd_gap_aware.__spectral_op__ = "svd"


def svd_old_gap_aware(A: torch.Tensor, some: bool = True, compute_uv: bool = True, *, out=None):
    """``torch.svd`` / ``Tensor.svd`` spelling (returns V, not V^H) with the gap-aware backward."""
    if has_torch_function((A,)):
        return handle_torch_function(svd_old_gap_aware, (A,), A, some, compute_uv, out=out)
    if out is not None or not compute_uv:
        # Without vectors torch's own backward is refused anyway; nothing to make gap-aware.
        return original("svd")(A, some, compute_uv, **({"out": out} if out is not None else {}))
    U, S, Vh = svd_gap_aware(A, full_matrices=not some)
    return torch.return_types.svd((U, S, Vh.mH))


svd_old_gap_aware.__spectral_op__ = "svd"


def svdvals(A: torch.Tensor, *, driver: str | None = None, out=None) -> torch.Tensor:
    """torch.linalg.svdvals, unchanged: its backward U diag(g) V^H has no pair terms, finite for any input."""
    return torch.linalg.svdvals(A, driver=driver, out=out)
