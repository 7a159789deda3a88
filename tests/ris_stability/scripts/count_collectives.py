"""Run ``python -m MODULE ARGS...`` (one rank under torchrun) counting this process's torch.distributed
all-reduce calls; writes ``{"all_reduce": n}`` to COUNT_DIR/collectives<rank>.json when the module exits.

argv: COUNT_DIR MODULE [ARGS...]. DDP's gradient buckets are reduced by its C++ reducer, not through
``dist.all_reduce``, so the count is the number of decisions the Python side asked the ranks to agree on.
"""

import json
import os
import runpy
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    count_dir, module, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counted(*a, **k):
        calls["all_reduce"] += 1
        return original(*a, **k)

    dist.all_reduce = counted
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        count_dir.mkdir(parents=True, exist_ok=True)
        (count_dir / f"collectives{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main()
