"""``with gap_aware():`` -- one line that switches torch's eigh and SVD to the gap-aware backward.

Inside the context, ``torch.linalg.eigh``, ``torch.linalg.svd``, ``torch.svd`` and ``Tensor.svd``
are replaced by :func:`eigh_gap_aware`, :func:`svd_gap_aware` and :func:`svd_old_gap_aware`: their
forward is torch's own call (outputs bit-identical), only the backward changes. It works around a
loss call, a training step or a whole script, and composes with the instruments: the replacements
announce themselves through ``__torch_function__`` like torch's ops (the locator's modes see them), carry
the ``__spectral_op__`` marker, and call whatever was installed before them (the probe's entry-point
wrappers, entered in either order).

Implementation: plain attribute patching while the context is active (no TorchFunctionMode, so nothing
intercepts the other torch calls and no mode ordering matters). The outermost context saves what it
replaces and restores exactly that on exit, also on an exception; inner contexts are no-ops. Code that
bound the function before entering (``from torch.linalg import eigh`` at import time) keeps torch's.
The state is process-global: enter it from one thread (the training loop), not per worker thread.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from ris_stability.spectral import originals
from ris_stability.spectral.eigh import eigh_gap_aware
from ris_stability.spectral.svd import svd_gap_aware, svd_old_gap_aware

REPLACEMENTS = {
    "linalg.eigh": eigh_gap_aware,
    "linalg.svd": svd_gap_aware,
    "svd": svd_old_gap_aware,
    "Tensor.svd": svd_old_gap_aware,
}

_lock = threading.Lock()
_depth = 0


def is_active() -> bool:
    """True while a gap_aware() context is active."""
    return _depth > 0


# Spellings whose attribute we created (a Tensor method inherited from the C base class): deleted on exit.
_created: set[str] = set()


def _install() -> None:
    for name, replacement in REPLACEMENTS.items():
        owner, attr = originals.SPELLINGS[name]
        originals.saved[name] = getattr(owner, attr)
        if attr not in vars(owner):
            _created.add(name)
        setattr(owner, attr, replacement)


def _restore() -> None:
    for name, fn in list(originals.saved.items()):
        owner, attr = originals.SPELLINGS[name]
        if name in _created:
            delattr(owner, attr)
        else:
            setattr(owner, attr, fn)
    originals.saved.clear()
    _created.clear()


@contextlib.contextmanager
def gap_aware() -> Iterator[None]:
    """Use the gap-aware eigh / SVD backward for every ``torch.linalg.eigh`` / ``torch.linalg.svd`` /
    ``torch.svd`` / ``Tensor.svd`` call made inside the block (see the module docstring).

        with ris_stability.gap_aware():
            loss = loss_fn(model(x), y)
        loss.backward()          # the backward may run outside: the choice is made at the forward call
    """
    global _depth
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()
