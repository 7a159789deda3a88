"""The locator inside a step that the caller runs itself: forward by the training script, backward by
its own ``loss.backward()``.

``Locator.run(fn)`` needs a function that returns the loss; a script that nobody wrapped has none. An
:class:`ArmedLocator` instead installs the same modes for one training step of the script: entered
before the forward, told when backward starts (:meth:`backward_started`) and asked for the finding once
it has finished (:meth:`finish`). The script's own backward runs under the dispatch mode exactly once,
so its gradients are the ones it would have computed (the mode passes every op through) and no user hook
fires twice. There is no ``detect_anomaly``: the origin comes from the taint map, as in ``Locator.run``.

Limits: only one forward + backward per arming (the first backward of the step); a fault that does not
recur in the armed step leaves no finding (``finish`` returns None).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

from torch import Tensor, nn

from ris_stability.locate.finding import Finding
from ris_stability.locate.locator import _Session
from ris_stability.locate.nodes import _ForwardRecorder
from ris_stability.locate.ops import _finite
from ris_stability.observe.tracker import ModuleTracker


class ArmedLocator:
    """Locate the origin of a non-finite loss or gradient in a forward + backward run by the caller::

        armed = ArmedLocator(roots={"model": model}).__enter__()   # before the forward
        loss = loss_fn(model(x), y)
        armed.backward_started()
        loss.backward()
        finding = armed.finish(loss, model.parameters())
        armed.close()                                               # outside any torch function
    """

    def __init__(self, roots: Mapping[str, nn.Module]):
        self._session = _Session(ModuleTracker(dict(roots)))
        self._stack: contextlib.ExitStack | None = None
        self._recorder: _ForwardRecorder | None = None

    @property
    def active(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> "ArmedLocator":
        stack = contextlib.ExitStack()
        stack.enter_context(self._session.installed())
        self._stack = stack
        self._recorder = _ForwardRecorder(self._session)
        self._recorder.__enter__()
        return self

    def backward_started(self) -> None:
        """Forward is over: ops now belong to autograd nodes. (The function recorder stays installed:
        ``loss.backward()`` itself runs inside its handler, where the mode cannot be popped.)"""
        self._session.phase = "backward"

    def error(self, exc: Exception) -> Finding:
        """The finding of a backward (or forward) that raised ``exc``; the modes then pass everything
        through until :meth:`close`."""
        try:
            return self._session._error_finding(exc)
        finally:
            self._session.is_paused = True

    def finish(self, loss: Tensor | None, leaves: Iterable[Tensor]) -> Finding | None:
        """The origin of a non-finite ``loss`` or of the first non-finite ``.grad`` of ``leaves``, or None
        when both are finite. The modes stay installed but pass everything through until :meth:`close`
        (call it outside any torch function, e.g. from an optimizer hook)."""
        s = self._session
        with s.paused():
            try:
                if loss is not None and not _finite(loss.detach()):
                    return s._finding(s._origin_of([loss]), "the loss itself is non-finite")
                leaves = list(leaves)
                bad = [p.grad for p in leaves if p.grad is not None and not _finite(p.grad)]
                if not bad:
                    return None
                return s._finding(s._origin_of(bad), f"{len(bad)} of {len(leaves)} gradients are non-finite")
            finally:
                s.is_paused = True  # stays paused after the with block: the run is over

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                stack.close()
            finally:
                self._session._replay_warnings()


__all__ = ["ArmedLocator"]
