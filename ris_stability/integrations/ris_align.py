"""The RIS pipeline's alignment check (`risdiag align`): the matrices each loss term consumes against the
matrix inference feeds to MUSIC, through the generic ``check_alignment``."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ris_model.config import RunConfig, load_config
from ris_model.data import Batch, SimDataset
from ris_model.infer import Prediction, predict
from ris_model.loss import TERMS, CompositeLoss, LossInputs
from ris_model.model import build_model
from ris_model.simulate import make_system
from ris_model.train import validate
from ris_stability.instruments.alignment import (
    AlignmentError, AlignmentResult, check_alignment, default_rtol, one_thread, relative_difference,
)

from ris_stability.integrations.ris import config_errors_are_usage_errors

log = logging.getLogger(__name__)



ALIGN_EXIT_ALIGNED, ALIGN_EXIT_MISALIGNED, ALIGN_EXIT_UNCHECKED = 0, 1, 2
_COV_NAMES = {"pred": "R_pred", "blend": "R_blend", "eff": "R_eff"}


@dataclass
class _LossSpy:
    """Records the LossInputs (hence THE builder's outputs) of every CompositeLoss call, per phase."""

    phase: str = ""
    seen: dict[str, LossInputs] = field(default_factory=dict)

    @contextmanager
    def attached(self, loss_fn: CompositeLoss) -> Iterator[None]:
        original = loss_fn.inputs  # CompositeLoss.forward calls self.inputs: shadow it on this instance only

        def inputs(outputs: Any, batch: Any) -> LossInputs:
            inp = original(outputs, batch)
            self.seen[self.phase] = inp
            return inp

        loss_fn.inputs = inputs
        try:
            yield
        finally:
            del loss_fn.inputs


def _term_consumers(loss_fn: CompositeLoss) -> dict[str, torch.nn.Module]:
    return {f"loss.{name}" + (" (w=0)" if loss_fn.weights[name] == 0 else ""): getattr(loss_fn, name)
            for name in TERMS}


def _validation_problems(val: LossInputs | None, pred: Prediction, cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Validation must build R_pred / R_blend / R_eff exactly as inference does on the same batch."""
    if val is None:
        return [f"validation ran no CompositeLoss, so its builder settings are unknown ({cfg.name})"], []
    problems = []
    for attr, name in _COV_NAMES.items():
        v, i = getattr(val.cov, attr), getattr(pred.cov, attr)
        diff = relative_difference(v, i)
        tol = default_rtol(i.shape[-1], i.dtype)
        if diff > tol:
            problems.append(f"validation builds {name} differently from inference: relative difference {diff:.3g} > "
                            f"{tol:.2g}; compare covariance settings of the loss and of predict()")
    note = f"validation and inference both build with {cfg.covariance}" if not problems else None
    return problems, [note] if note else []


def align_config(cfg: RunConfig, batch_size: int = 4) -> AlignmentResult:
    """Run the training loss, validation and inference of ``cfg`` on one validation batch (model in eval
    mode, untrained weights of ``cfg.train.seed``) and compare the matrices each loss term consumes with
    the one inference feeds to MUSIC; also check validation builds its covariances like inference.

    Matrices are named R_pred / R_blend / R_eff by identity with the builder's outputs of each path (by
    equality for MUSIC's complex128 copy).
    """
    system = make_system(cfg)
    device = torch.device(cfg.train.device)
    model = build_model(cfg, system).to(device).eval()
    loss_fn = CompositeLoss(cfg, system).to(device)
    batch: Batch = SimDataset(cfg, "val", size=batch_size, system=system).batch(list(range(batch_size))).to(device)
    spy, predictions = _LossSpy(), []

    def phase(name: str, fn):
        def run(b: Batch) -> Any:
            spy.phase = name
            return fn(b)
        return run

    def infer(b: Batch) -> Prediction:
        predictions.append(predict(cfg, model, b, system))
        return predictions[-1]

    def names() -> dict[str, list[torch.Tensor]]:
        covs = [inp.cov for inp in spy.seen.values()] + [p.cov for p in predictions]
        known: dict[str, Any] = {name: [getattr(c, attr) for c in covs] for attr, name in _COV_NAMES.items()}
        return {**known, "R_true": batch.R_true, "R_samp": batch.R_samp}

    # One batch of 144 x 144 factorisations: threads gain nothing and, on shared cores, cost 10-100x.
    with spy.attached(loss_fn), one_thread():
        result = check_alignment(
            {"train": phase("train", lambda b: loss_fn(model(b), b)),
             "val": phase("val", lambda b: validate(model, loss_fn, [b]))},
            infer, batch, roots={"model": model, "loss": loss_fn}, consumers=_term_consumers(loss_fn), names=names)
    problems, notes = _validation_problems(spy.seen.get("val"), predictions[0], cfg)
    if not result.aligned and cfg.loss.covariance == "pred":
        notes.append("likely cause: loss.covariance = \"pred\" makes the covariance terms consume R_pred while MUSIC "
                     "runs on R_eff (R_blend, shrunk if configured); next step: --set loss.covariance=blend")
    return result.merge(AlignmentResult((), tuple(notes), tuple(problems)))


@config_errors_are_usage_errors
def run_align(config_path: str, overrides: list[str], as_json: bool) -> tuple[int, str]:
    """`risdiag align`: (exit code, text to print). 0 aligned, 1 misaligned, 2 nothing could be compared.
    Config errors reach the CLI as usage errors."""
    cfg = load_config(config_path, overrides)
    try:
        result = align_config(cfg)
    except AlignmentError as err:
        return ALIGN_EXIT_UNCHECKED, f"risdiag align {config_path}: cannot check: {err}"
    code = ALIGN_EXIT_ALIGNED if result.aligned else ALIGN_EXIT_MISALIGNED
    if as_json:
        return code, json.dumps({"config": config_path, "name": cfg.name, **result.to_dict()}, indent=2)
    head = f"risdiag align {config_path} (loss.covariance = {cfg.loss.covariance!r}, {cfg.covariance})"
    return code, head + "\n" + result.format_table()


