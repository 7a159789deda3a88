"""StabilityCallback with a real Lightning Trainer on the CPU: a planted fault is skipped and named."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs the optional extra "
                         "ris-diag[lightning]")
from ris_stability.attach.lightning import StabilityCallback  # noqa: E402

FAULT_STEP = 3


class RowNorm(nn.Module):
    def forward(self, h):
        return h / (torch.sqrt((h * h).sum(-1, keepdim=True)) + 1.0)  # FAULT: zero rows from FAULT_STEP on


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4, bias=False), RowNorm())
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx >= FAULT_STEP:
            x = x.clone()
            x[0] = 0.0
        return nn.functional.mse_loss(self.head(self.body(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(-1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_lightning_run_names_the_planted_fault(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    cb = StabilityCallback(out=tmp_path / "run")
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=tmp_path)
    trainer.fit(model, loader())
    run = cb.result
    assert run.status == "nonfinite" and run.nonfinite_steps == [3, 4, 5] and run.skipped_steps == [3, 4, 5]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    finding = json.loads((tmp_path / "run" / "finding.json").read_text())
    assert (finding["phase"], finding["node"], finding["module"]) == ("backward", "SqrtBackward0", "model.body.1")
    fault = next(i for i, line in enumerate(open(__file__).read().splitlines(), 1) if "# FAULT" in line)
    assert finding["location"].endswith(f"test_lightning.py:{fault}")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "SqrtBackward0" in report and "model.body.1" in report
