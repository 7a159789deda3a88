"""The Hugging Face Trainer callback on a tiny randomly initialised GPT-2 (built from a config, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the hf extra)")


class ZeroNormScale(nn.Module):
    """A planted fault: the final norm scaled by the square root of a norm that is exactly 0, so the
    forward stays finite (sqrt(0) = 0) and the backward of sqrt divides by 0."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return y + y * torch.sqrt((x - x).pow(2).sum(-1, keepdim=True))


def _trainer(tmp_path: Path, callback, planted: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    if planted:
        model.transformer.ln_f = ZeroNormScale(model.transformer.ln_f)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (16, 12))]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return model, Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_trainer_with_a_planted_fault_names_it_in_report_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from ris_stability.attach.hf_trainer import StabilityTrainerCallback

    cb = StabilityTrainerCallback(out=tmp_path / "run", tensorboard=tmp_path / "tb")
    model, trainer = _trainer(tmp_path, cb, planted=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert cb.result is not None and cb.result.status == "nonfinite"
    assert cb.result.skipped_steps == cb.result.nonfinite_steps and cb.result.nonfinite_steps
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every step skipped: nothing moved
    report = (tmp_path / "run" / "report.md").read_text()
    assert "SqrtBackward0" in report and "transformer.ln_f" in report
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    findings = " ".join(e.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]
                        if tag.startswith("findings") for e in acc.Tensors(tag))
    assert "SqrtBackward0" in findings


def test_clean_trainer_run_is_clean_and_leaves_no_hook(tmp_path: Path) -> None:
    from ris_stability.attach.hf_trainer import StabilityTrainerCallback

    backward = torch.Tensor.backward
    cb = StabilityTrainerCallback(out=tmp_path / "run")
    model, trainer = _trainer(tmp_path, cb, planted=False)
    before = model.transformer.wte.weight.detach().clone()
    trainer.train()
    assert cb.result.status == "clean" and cb.result.steps == 4
    assert not torch.equal(before, model.transformer.wte.weight)  # the optimizer stepped
    assert torch.Tensor.backward is backward  # the attachment removed itself
    assert (tmp_path / "run" / "report.md").is_file()
