"""Front doors and the one step driver they feed.

* ``driver``     StepDriver: a loop's events -> the monitor, the step's skip / stop decision, the armed locator;
* ``hooks``      AutoAttach: global optimizer / backward / module hooks that produce those events;
* ``watch``      ``watch(model, optimizer, out=...)`` and the Watcher behind every front door;
* ``session``    MonitorSession: explicit calls from a hand-written loop;
* ``callbacks``  LoopCallbacks: a loop with a callback protocol of its own;
* ``script``     ``risdiag trace -- python SCRIPT.py``: the script run under the hooks;
* ``lightning``, ``hf_trainer``: callbacks for those trainers (optional extras, imported on demand);
* ``finish``     finish_run: the one end of every run (summary, DDP wait, report).
"""

from ris_stability.attach.driver import StepDriver
from ris_stability.attach.hooks import AutoAttach
from ris_stability.attach.session import MonitorSession
from ris_stability.attach.watch import Watcher, watch
from ris_stability.monitor import NonFiniteError

__all__ = ["AutoAttach", "MonitorSession", "NonFiniteError", "StepDriver", "Watcher", "watch"]
