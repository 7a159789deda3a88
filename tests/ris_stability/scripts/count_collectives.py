"""Run ``python -m MODULE ARGS...`` (one rank under torchrun) counting this process's torch.distributed
all-reduce calls; ``{"all_reduce": n}`` in COUNT_DIR/collectives<rank>.json is rewritten at every call
(torchrun may stop a rank whose work is done as soon as rank 0 exits with the run's verdict, so nothing
is left for the end of the process). Once the module has returned, the process ends with ``os._exit`` and
the module's exit code: with torch 2.13's gloo a process that has destroyed its group can still abort while
the interpreter tears down ("terminate called without an active exception", about 1 run in 10 of a plain
two-rank DDP script here), which would make the exit code a coin toss.

argv: COUNT_DIR MODULE [ARGS...]. DDP's gradient buckets are reduced by its C++ reducer, not through
``dist.all_reduce``, so the count is the number of decisions the Python side asked the ranks to agree on.
"""

import json
import logging
import os
import runpy
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    count_dir, module, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    count_dir.mkdir(parents=True, exist_ok=True)
    target = count_dir / f"collectives{os.environ.get('RANK', '0')}.json"
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def save() -> None:
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(calls))
        partial.replace(target)

    def counted(*a, **k):
        calls["all_reduce"] += 1
        save()
        return original(*a, **k)

    dist.all_reduce = counted
    sys.argv = [module, *args]
    save()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
