"""Automatic attachment of the stability monitor to training loops we do not own.

* ``driver``  StepDriver: events (step start, backward, optimizer step) -> monitor, skip, armed locator;
* ``hooks``   AutoAttach: global optimizer / backward / module hooks that produce those events;
* ``watch``   ``watch(model, optimizer, out=...)`` context manager and the Watcher behind it.
"""

from ris_stability.attach.driver import NonFiniteError, StepDriver
from ris_stability.attach.hooks import AutoAttach
from ris_stability.attach.watch import Watcher, watch

__all__ = ["AutoAttach", "NonFiniteError", "StepDriver", "Watcher", "watch"]
