"""A replayer for capsules of scripts/once_nan.py (what a user writes for `risdiag bisect --replayer`): the
model from the script, its pre-step state, the keyword input the capsule recorded; the target is rebuilt
from the input as the script builds it (it never enters a module, so no capsule holds it)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

_spec = importlib.util.spec_from_file_location("once_nan_script", Path(__file__).parent / "scripts" / "once_nan.py")
once_nan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(once_nan)


def replay(capsule, dtype=None):
    model = once_nan.Net()
    model.load_state_dict(capsule.model_state)
    x = capsule.batch["inputs"]["model"]["kwargs"]["x"]
    if dtype is not None:
        model, x = model.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    return SimpleNamespace(model=model, roots={"model": model},
                           loss=lambda: torch.nn.functional.mse_loss(model(x=x), x.sum(-1, keepdim=True)))
