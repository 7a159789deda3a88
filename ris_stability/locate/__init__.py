"""The NaN locator: which op, autograd node, module and line first produced a non-finite value, and why.

Parts, one file each:

* ``locator``    the Locator and ``locate_nonfinite``: the run driver (forward, backward, finding);
* ``taint``      the dispatch mode: non-finite outputs, origins and their taint, raising ops;
* ``masks``      intentional infinities (a mask's -inf) versus the NaN an op makes of them;
* ``nodes``      the function mode: forward context of each autograd node;
* ``inputs``     argument binding, root discovery, non-finite inputs before the call;
* ``ops``        op classification (trivial, fresh, overwriting, spectral) and value summaries;
* ``phase``      the complex-phase checks of eigh/svd backward that dispatch modes skip;
* ``stack``      the module stack and forward context recorded for each autograd node;
* ``causes``     plain-words cause and remedies from an observation;
* ``finding``    the Finding record and its text form;
* ``reproducer`` a standalone torch-only script that reproduces a finding.

Private torch APIs used here: the dispatch mode (``torch.utils._python_dispatch``), autograd-node
access (``torch._C._current_autograd_node``, a node's ``_forward_cls`` and ``_saved_*`` tensors). The few
other private uses of ris_stability are listed in docs/architecture.md.
"""

from ris_stability.locate.finding import Finding, format_finding
from ris_stability.locate.inputs import LocatorUsageError
from ris_stability.locate.locator import Locator, locate_nonfinite

__all__ = ["Finding", "Locator", "LocatorUsageError", "format_finding", "locate_nonfinite"]
