"""An outside-style sweep target for the generic sweep tests (not ris_model): a tiny whitening network
whose layer decomposes its feature covariance with eigh and projects on the eigenvectors, a hand-written
loop driven through MonitorSession, and planted faults chosen by the config key ``model.fault``:

- ``tie``: the covariance is replaced by mean(diag) * I, an exact n-fold tie whose eigenvectors receive
  gradient (torch's eigh backward divides by zero gaps);
- ``nan``: a NaN in the targets from step 2 on (a non-finite loss without any tie);
- ``explode``: the loss is scaled by 100**step and the weights stay put (the gradient norm grows 100x per
  step and stays finite).

The config is a TOML file with [model] / [train] tables; ``--set``-style overrides are checked like a real
config's (unknown key, wrong type, invalid choice: UsageError naming the key).
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import UsageError

DEFAULTS: dict[str, Any] = {"model.width": 6, "model.fault": "none", "train.lr": 1e-2, "train.steps": 6,
                            "train.val_every": 2, "train.sleep_s": 0.0, "train.seed": 0}
FAULTS = ("none", "tie", "nan", "explode")


class Whitening(nn.Module):
    def __init__(self, width: int, fault: str):
        super().__init__()
        self.inp, self.out, self.fault = nn.Linear(4, width), nn.Linear(width, 1), fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        c = h.T @ h / h.shape[0] + 1e-3 * torch.eye(h.shape[1])
        if self.fault == "tie":
            c = c.diagonal().mean() * torch.eye(h.shape[1])
        w, v = torch.linalg.eigh(c)
        return self.out((h @ v) / torch.sqrt(w))


def _value(key: str, value: Any) -> Any:
    if key not in DEFAULTS:
        raise UsageError(f"unknown key {key!r}; valid keys: {', '.join(sorted(DEFAULTS))}")
    want = type(DEFAULTS[key])
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or isinstance(value, bool):
        raise UsageError(f"{key} = {value!r}: expected {want.__name__}")
    if key == "model.fault" and value not in FAULTS:
        raise UsageError(f"{key} = {value!r}: valid choices {', '.join(FAULTS)}")
    if key in ("model.width", "train.steps") and value < 1:
        raise UsageError(f"{key} = {value!r}: must be >= 1")
    return value


class WhiteningTarget:
    def __init__(self, config: str, overrides: list[str], steps: int | None):
        data = tomllib.loads(Path(config).read_text()) if config else {}
        self.base = dict(DEFAULTS)
        for section, table in data.items():
            for k, v in table.items():
                self.base[f"{section}.{k}"] = _value(f"{section}.{k}", v)
        for text in overrides:
            key, _, raw = text.partition("=")
            self.base[key] = _value(key, tomllib.loads(f"v = {raw}")["v"])
        if steps is not None:
            self.base["train.steps"] = steps
        self.name = "whitening"
        self.metrics = ("loss",)  # what run() returns: checked against --metric before any trial

    def check(self, key: str, value: Any) -> None:
        _value(key, value)

    def resolved_toml(self, params: Mapping[str, Any]) -> str:
        cfg = {**self.base, **params}
        lines = []
        for section in ("model", "train"):
            lines.append(f"[{section}]")
            lines += [f"{k.split('.', 1)[1]} = {v!r}".replace("'", '"') for k, v in cfg.items() if k.startswith(section)]
        return "\n".join(lines) + "\n"

    def run(self, params: Mapping[str, Any], run_dir: Path, hooks: Any) -> dict[str, float]:
        cfg = {**self.base, **{k: _value(k, v) for k, v in params.items()}}
        torch.manual_seed(cfg["train.seed"])
        model = Whitening(cfg["model.width"], cfg["model.fault"])
        opt = torch.optim.SGD(model.parameters(), lr=cfg["train.lr"])
        x_val, y_val = torch.randn(64, 4), torch.randn(64, 1)
        mon = StabilityMonitor(run_dir, MonitorConfig(), listeners=(hooks.observe,))
        val = {}
        with MonitorSession(mon, model, opt) as s:
            for step in range(cfg["train.steps"]):
                x, y = torch.randn(32, 4), torch.randn(32, 1)
                if cfg["model.fault"] == "nan" and step >= 2:
                    y[0, 0] = math.nan
                s.start_step(step, {"x": x, "y": y}, lr=cfg["train.lr"])
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean() * (100.0 ** step if cfg["model.fault"] == "explode" else 1.0)
                s.after_forward(loss, {"mse": loss})
                loss.backward()
                if s.after_backward() and cfg["model.fault"] != "explode":
                    opt.step()
                s.end_step()
                hooks.on_step_end(s.ctx)
                time.sleep(cfg["train.sleep_s"])
                with torch.no_grad():
                    val = {"loss": float(((model(x_val) - y_val) ** 2).mean())}
                last = step + 1 == cfg["train.steps"] or s.stop_requested
                if (step + 1) % cfg["train.val_every"] == 0 and not last:
                    hooks.report(step, val, s.ctx)
                if s.stop_requested:
                    break
        return val


def make_target(config: str, overrides: list[str], steps: int | None) -> WhiteningTarget:
    return WhiteningTarget(config, overrides, steps)
