"""Complex-phase checks of the eigh/eig/svd backward, restored as autograd node pre-hooks."""
from __future__ import annotations

import torch
from torch import Tensor


# PyTorch skips its complex-phase checks in eigh/svd backward whenever a dispatch mode is active
# (they count as "tensor subclass like"), so the locator would silently let an ill-defined loss
# through. These node pre-hooks restore the same checks, with the same tolerances and messages.
_PHASE_RTOL = _PHASE_ATOL = 1e-2


def _vector_phase_message(op: str) -> str:
    """torch's message for an eigenvector phase dependence, prefixed by the name of the op's backward."""
    return (f"{op}_backward: The eigenvectors in the complex case are specified up to multiplication by "
            "e^{i phi}. The specified loss function depends on this quantity, so it is ill-defined.")


EIGH_PHASE_MESSAGE = _vector_phase_message("linalg_eigh")
EIG_PHASE_MESSAGE = _vector_phase_message("linalg_eig")
SVD_PHASE_MESSAGE = ("svd_backward: The singular vectors in the complex case are specified up to multiplication "
                     "by e^{i phi}. The specified loss function depends on this phase term, making it ill-defined.")


def _imag_diag(X: Tensor) -> Tensor:
    return torch.imag(torch.diagonal(X, 0, -2, -1))


def _hook_vector_phase(node, message: str, real_ok: bool):
    """Pre-hook on an eigh/eig backward node raising ``message`` when the loss depends on the arbitrary
    phase of the eigenvectors (imaginary diagonal of V^H gV not zero), as torch's own check does."""
    V = node._saved_eigenvectors
    if V is None or (real_ok and not V.is_complex()):
        return None

    def check(grad_outputs):
        gV = grad_outputs[1] if len(grad_outputs) > 1 else None
        if gV is not None:
            d = _imag_diag(V.mH @ gV)
            if not torch.allclose(d, torch.zeros_like(d), rtol=_PHASE_RTOL, atol=_PHASE_ATOL):
                raise RuntimeError(message)
    return node.register_prehook(check)


def _hook_eigh_phase(node):
    return _hook_vector_phase(node, EIGH_PHASE_MESSAGE, real_ok=True)


def _hook_eig_phase(node):
    # eig's eigenvectors are complex even for a real input: the check applies whenever V receives gradient.
    return _hook_vector_phase(node, EIG_PHASE_MESSAGE, real_ok=False)


def _hook_svd_phase(node):
    U, Vh = node._saved_U, node._saved_Vh
    if U is None or not U.is_complex():
        return None

    def check(grad_outputs):
        gU, _, gVh = (tuple(grad_outputs) + (None, None, None))[:3]  # outputs (U, S, Vh)
        if gU is None and gVh is None:
            return
        # skew(X) = X - X^H doubles the imaginary part of the diagonal, as in torch's svd_backward.
        im_u = 2 * _imag_diag(U.mH @ gU) if gU is not None else torch.zeros_like(node._saved_S)
        im_v = 2 * _imag_diag(Vh @ gVh.mH) if gVh is not None else torch.zeros_like(node._saved_S)
        if not torch.allclose(im_u, -im_v, rtol=_PHASE_RTOL, atol=_PHASE_ATOL):
            raise RuntimeError(SVD_PHASE_MESSAGE)
    return node.register_prehook(check)


_PHASE_CHECKS = {"LinalgEighBackward0": _hook_eigh_phase, "LinalgEigBackward0": _hook_eig_phase,
                 "LinalgSvdBackward0": _hook_svd_phase}

