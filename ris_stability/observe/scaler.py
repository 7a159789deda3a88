"""ScalerSpy: find the GradScaler a loop uses, and the loss it scales, without being told.

While installed it wraps ``torch.amp.GradScaler.scale`` and ``.step`` at class level (so every scaler, made
before or after, including ``torch.cuda.amp.GradScaler``, is seen) and restores both on removal. It only
notes what passes: the scaler, the last (scaled, unscaled) loss pair, and each ``step`` call, after which
``on_step(scaler, optimizer)`` is called (a GradScaler that found an overflow skips ``optimizer.step()``, so
the optimizer's own hooks never fire for that iteration). Nothing is changed or read on the device.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ris_stability.observe import guard

_SCALER_CLASS = torch.amp.GradScaler


class ScalerSpy:
    def __init__(self, on_step: Callable[[Any, Any], None] | None = None):
        self.scaler: Any = None
        self.on_step = on_step
        self._pair: tuple[Tensor, Tensor] | None = None  # (scaled, unscaled) of the last scale() call
        self._originals: dict[str, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> "ScalerSpy":
        if self.installed:
            return self
        scale, step = _SCALER_CLASS.scale, _SCALER_CLASS.step
        self._originals = {"scale": scale, "step": step}
        spy = self

        def spied_scale(scaler: Any, outputs: Any) -> Any:
            scaled = guard.users_call(scale, scaler, outputs)
            if isinstance(outputs, Tensor) and isinstance(scaled, Tensor):
                spy.scaler, spy._pair = scaler, (scaled, outputs)
            return scaled

        def spied_step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            result = guard.users_call(step, scaler, optimizer, *args, **kwargs)
            spy.scaler = scaler
            if spy.on_step is not None:
                guard.call("scaler.step", spy.on_step, scaler, optimizer)
            return result

        spied_scale.__wrapped__ = scale  # type: ignore[attr-defined]
        spied_step.__wrapped__ = step  # type: ignore[attr-defined]
        _SCALER_CLASS.scale, _SCALER_CLASS.step = spied_scale, spied_step
        return self

    def remove(self) -> None:
        if self._originals:
            _SCALER_CLASS.scale, _SCALER_CLASS.step = self._originals["scale"], self._originals["step"]
        self._originals, self._pair = {}, None

    def true_loss(self, loss: Tensor | None) -> Tensor | None:
        """The unscaled loss when ``loss`` is what the scaler's last ``scale`` call returned, else ``loss``."""
        pair, self._pair = self._pair, None
        if pair is not None and loss is pair[0]:
            return pair[1]
        return loss


__all__ = ["ScalerSpy"]
