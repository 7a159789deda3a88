"""An fp16 GradScaler loop under every front door, with no scaler handed to the monitor: the loss is logged in
true units (not the scaled loss), the scaler's overflow iterations are routine skipped steps (not merged into the
next step, not non-finite), and the run is clean."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability.cli import main

SCRIPT = Path(__file__).parent / "scripts" / "amp_scaler.py"
INIT_SCALE = 2.0 ** 20  # fp16 overflows at this scale: the first iteration(s) are the scaler's to skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]


def _check(run: Path, iterations: int) -> None:
    rows = _rows(run)
    summary = json.loads((run / "summary.json").read_text())
    overflow = summary["amp_overflow_steps"]
    assert summary["status"] == "clean" and summary["nonfinite_steps"] == []
    assert 0 in overflow  # the first iteration overflows at INIT_SCALE
    assert [r["step"] for r in rows] == list(range(iterations))  # one row per iteration: none merged
    assert all(r["skipped"] == (r["step"] in overflow) for r in rows)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) and 0.5 < x < 5 for x in losses), losses  # cross-entropy of 4 classes, unscaled
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "amp_overflow"] == overflow
    assert not [e for e in events if e["kind"] in ("nonfinite_grad", "nonfinite_loss", "capsule_written")]


def _loop(steps: int) -> None:
    """The same loop as the script, in-process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for _ in range(steps):
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


def test_script_trace_logs_true_loss_and_overflows(tmp_path):
    code = main(["trace", "--no-live", "--no-report", "--out", str(tmp_path), "--", "python", str(SCRIPT),
                 "--steps", "10"])
    assert code == 0
    _check(tmp_path, 10)


def test_watch_logs_true_loss_and_overflows(tmp_path):
    from ris_stability import watch

    with watch(out=tmp_path, report=False):
        _loop(10)
    _check(tmp_path, 10)


def test_lightning_logs_true_loss_and_overflows(tmp_path):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ris_stability.attach.lightning import StabilityCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(320, 8), torch.randint(0, 4, (320,)))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))
    cb = StabilityCallback(out=tmp_path, report=False)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", plugins=[plugin], callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=32))
    _check(tmp_path, 10)


def test_hf_trainer_logs_true_loss_and_overflows(tmp_path):
    """The Trainer's accelerator is handed a GradScaler (on CPU accelerate makes none): a float32 loss at scale
    2**127 overflows, the scaler backs off, and the monitor sees it without being told of the scaler."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the hf extra)")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ris_stability.attach.hf_trainer import StabilityTrainerCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (24, 12))]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    cb = StabilityTrainerCallback(out=tmp_path / "run", report=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    trainer.train()
    rows = _rows(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "clean" and 0 in summary["amp_overflow_steps"]
    assert [r["step"] for r in rows] == list(range(6))
    assert all(2.0 < r["loss"] < 5.0 for r in rows)  # ~ln(32), not 3.5 * 2**127
