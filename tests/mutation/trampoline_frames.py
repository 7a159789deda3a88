"""pytest plugin for mutation runs of code that reports the user's source lines (the locator).

mutmut calls every mutated function through a trampoline in its own package
(``mutmut/mutation/trampoline.py``). ``ris_stability.observe.frames`` takes every frame outside torch and
ris_stability for the user's, so in the mutated tree each location the locator reports would be the
trampoline's line, and every test that checks one fails for every mutant (and the clean run too). This
plugin adds mutmut's folder to the frames that are skipped; outside a mutmut run it changes nothing.

It also imports ``torch._dynamo``, which the first dispatch-mode run imports lazily (about 800 modules,
several seconds): loaded in the fork server's collection, it is paid once instead of once per mutant.

Load it from a shard's ``tests`` with ``"-p", "tests.mutation.trampoline_frames"`` (shards.toml).
"""
from __future__ import annotations

import os
import sys

import torch._dynamo  # noqa: F401  (the warm-up, see above)

from ris_stability.observe import frames

if "mutmut" in sys.modules:
    _MUTMUT = os.path.dirname(os.path.abspath(sys.modules["mutmut"].__file__)) + os.sep
    if _MUTMUT not in frames._SKIP_DIRS:
        frames._SKIP_DIRS = frames._SKIP_DIRS + (_MUTMUT,)
        frames._is_user.cache_clear()
