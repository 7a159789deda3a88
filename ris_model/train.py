"""Training: a pure, replayable ``train_step`` and the ``train`` loop with callbacks.

``train_step`` depends only on its arguments (model/optimizer state, batch, settings): replaying it from
the same state on the same batch gives the same result bit for bit. The loop adds the schedule (a pure
function of the step), validation, checkpoints and the callback points of ``callbacks.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ris_model.callbacks import CallbackList, StepContext
from ris_model.checkpoint import check_compatible, load_checkpoint, restore, save_checkpoint
from ris_model.config import RunConfig, dumps_toml
from ris_model.data import Batch, SimDataset, train_batch
from ris_model.infer import aux_estimates, k_from_logits
from ris_model.loss import CompositeLoss
from ris_model.metrics import localization_errors
from ris_model.model import build_model
from ris_model import parallel
from ris_model.schedule import lr_at
from ris_model.simulate import System, make_system

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient under ``train.nonfinite = "stop"``."""

    def __init__(self, step: int, message: str, parameter: str | None = None):
        super().__init__(message)
        self.step, self.parameter = step, parameter


@dataclass(frozen=True)
class StepSettings:
    """Everything a step needs besides state and data."""

    lr: float
    grad_clip: float = 0.0  # 0 disables clipping
    amp: bool = False
    amp_dtype: str = "bfloat16"
    nonfinite: str = "skip"  # "skip" | "stop"

    @staticmethod
    def from_config(cfg: RunConfig, step: int) -> "StepSettings":
        t = cfg.train
        return StepSettings(lr=lr_at(t, step), grad_clip=t.grad_clip, amp=t.amp, amp_dtype=t.amp_dtype,
                            nonfinite=t.nonfinite)


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    terms: dict[str, float]
    grads_finite: bool
    skipped: bool
    skip_reason: str  # "" | "nonfinite" | "amp_overflow" | a callback's reason
    grad_norm: float  # total gradient norm before clipping (nan when the gradients are non-finite)
    lr: float
    amp_scale: float | None = None


def _first_nonfinite(model: torch.nn.Module) -> tuple[str, int, int] | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name, int((~torch.isfinite(p.grad)).sum()), p.grad.numel()
    return None


def _nonfinite_error(step: int, loss: torch.Tensor, model: torch.nn.Module) -> NonFiniteError:
    bad = _first_nonfinite(model)
    where = (f"first in parameter {bad[0]!r} ({bad[1]} of {bad[2]} entries)" if bad
             else "in the loss (no parameter gradient is non-finite)")
    return NonFiniteError(step, (
        f"step {step}: non-finite gradient {where}; loss = {float(loss.detach()):.6g}. Likely cause: an eigh backward "
        "through eigenvectors of a covariance with tied eigenvalues (shrinkage/diagonal loading ties the noise "
        "eigenvalues; 0/0 in 1/(lambda_j - lambda_i)). Next step: locate the op with risdiag bisect, or set "
        "loss.eigh_backward=\"gap_aware\", covariance.shrinkage=0, or train.nonfinite=\"skip\"."),
        parameter=bad[0] if bad else None)


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def _autocast(settings: StepSettings, device_type: str):
    if not settings.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, settings.amp_dtype))


def _decide(ctx: StepContext, finite: bool, settings: StepSettings, scaler: Any) -> str:
    """The skip reason ("" to step). Raises NonFiniteError under the "stop" policy."""
    if ctx.skip_requested:
        return ctx.skip_requested
    if finite:
        return ""
    if scaler is not None:
        return "amp_overflow"  # GradScaler found inf/NaN: it skips and lowers the scale
    if settings.nonfinite == "stop":
        raise _nonfinite_error(ctx.step, ctx.loss, ctx.model)
    return "nonfinite"


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
               settings: StepSettings, *, step: int = 0, scaler: Any = None, callbacks: Any = None,
               ctx: StepContext | None = None, agree: Callable[[bool, Any], bool] = parallel.all_true) -> StepResult:
    """One optimizer step: forward (autocast if AMP), fp32 loss, backward, checks, clip, step or skip.

    ``agree(finite, device)``: how the ranks agree on the step's finiteness (default ``parallel.all_true``,
    one all-reduce under DDP); a callback that takes that collective decision itself in
    ``on_after_backward`` is given ``parallel.local_only``, so the step has one all-reduce, not two.

    Non-finite loss or gradients: skipped and reported (skip_reason "nonfinite") or NonFiniteError under
    settings.nonfinite == "stop". Under fp16 AMP (a GradScaler is passed) they are the scaler's business:
    it skips the step and halves the scale (skip_reason "amp_overflow"), so a persistent NaN shows as a
    collapsing amp_scale rather than as an error.
    """
    cbs = callbacks if callbacks is not None else CallbackList()
    if ctx is None:
        ctx = StepContext(cfg=None, system=None, model=model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler)
        ctx.begin_step(step, batch, settings.lr)
    batch.check_finite()
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
    optimizer.zero_grad(set_to_none=True)
    with _autocast(settings, batch.y.device.type):
        outputs = model(batch)
    loss, terms = loss_fn(outputs, batch)  # outside autocast: the loss and all linear algebra in fp32
    ctx.outputs, ctx.loss, ctx.terms = outputs, loss, {k: v.detach() for k, v in terms.items()}
    cbs.on_after_forward(ctx)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # Collective under DDP: every rank skips or steps together (a rank's NaN loss is its own alone).
    ctx.grads_finite = agree(_grads_finite(params) and bool(torch.isfinite(loss)), loss.device)
    cbs.on_after_backward(ctx)
    # Checked again after the callbacks: the decision rests on the gradients the optimizer would apply.
    ctx.grads_finite = finite = bool(ctx.grads_finite) and _grads_finite(params)
    if finite:
        clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")
        ctx.grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    cbs.on_before_optimizer_step(ctx)
    reason = _decide(ctx, finite, settings, scaler)
    if scaler is not None:
        if not reason or reason == "amp_overflow":
            scaler.step(optimizer)  # skips by itself on overflow
        scaler.update()
    elif not reason:
        optimizer.step()
    ctx.skipped, ctx.skip_reason = bool(reason), reason
    ctx.result = StepResult(
        step=step, loss=float(loss.detach()), terms={k: float(v) for k, v in ctx.terms.items()}, grads_finite=finite,
        skipped=bool(reason), skip_reason=reason, lr=settings.lr,
        grad_norm=float(ctx.grad_norm) if ctx.grad_norm is not None else float("nan"),
        amp_scale=float(scaler.get_scale()) if scaler is not None else None)
    return ctx.result


@torch.no_grad()
def validate(model: torch.nn.Module, loss_fn: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean loss, terms, K accuracy and the aux head's localisation over ``batches`` (eval mode; the loss
    uses the same builder as inference). aux_matched: fraction of true sources the aux slots 0..K_hat-1
    find within the metrics gate; aux_rmse_deg: RMS direction error of those (cheap: no MUSIC)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        outputs = model(batch)
        loss, terms = loss_fn(outputs, batch)
        k_hat = k_from_logits(outputs.k_logits)
        loc = localization_errors(aux_estimates(outputs, k_hat), batch.phi, batch.theta, batch.r, batch.mask)
        vals = {"loss": float(loss), **{k: float(v) for k, v in terms.items()},
                "k_acc": float((k_hat == batch.k).float().mean()),
                "aux_matched": loc["n_matched"] / max(loc["n_true"], 1),
                "aux_rmse_deg": math.hypot(loc["rmse_phi_deg"], loc["rmse_theta_deg"]) if loc["n_matched"] else 0.0}
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v * batch.size
        n += batch.size
    model.train(was_training)
    return {k: v / n for k, v in sums.items()} if n else {}


@dataclass
class TrainResult:
    cfg: RunConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: list[StepResult] = field(default_factory=list)
    val_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    n_skipped: int = 0
    next_step: int = 0
    stopped: str = ""  # reason a callback gave to request_stop, "" when none
    step_time_s: float = float("nan")  # mean wall time of train_step (data generation excluded)
    out_dir: Path | None = None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; none on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)


def make_scaler(cfg: RunConfig) -> Any:
    """A GradScaler for fp16 AMP (bf16 has fp32's exponent range and needs none)."""
    if cfg.train.amp and cfg.train.amp_dtype == "float16":
        return torch.amp.GradScaler(cfg.train.device.split(":")[0])
    return None


@dataclass
class _Run:
    """The objects one run works with (built by ``_setup``)."""

    ctx: StepContext
    val_batches: list[Batch]
    start: int
    stop: int
    result: TrainResult


def configure_threads(cfg: RunConfig) -> None:
    """Set torch's intra-op thread count to ``train.threads`` (0 leaves it) for the whole process.

    144 x 144 batched linear algebra gains little from MKL threads and collapses when the cores are shared
    (see music.single_threaded). The count also changes reduction orders: a bit-exact replay of a step
    must run with the same count, so ``train`` leaves it set and replayers call this first.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def _setup(cfg: RunConfig, out_dir: Path | None, steps: int | None, resume: str | Path | None) -> _Run:
    configure_threads(cfg)
    parallel.init_from_env(cfg.train.device)
    system = make_system(cfg)
    device = torch.device(cfg.train.device)
    model = build_model(cfg, system).to(device)
    loss_fn = CompositeLoss(cfg, system).to(device)
    optimizer, scaler = make_optimizer(cfg, model), make_scaler(cfg)
    start = 0
    torch.manual_seed(cfg.train.seed)  # dropout and any other torch randomness of the loop
    if resume is not None:
        ckpt = load_checkpoint(resume)
        check_compatible(ckpt, cfg)
        restore(ckpt, model, optimizer, scaler)
        start = ckpt.next_step
    model = parallel.wrap(model)  # after restore: checkpoints hold the bare module's names
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if parallel.world()[0] == 0:
            (out_dir / "config.resolved.toml").write_text(dumps_toml(cfg))
    val = list(SimDataset(cfg, "val", system=system).batches()) if cfg.train.val_every and cfg.data.n_val else []
    val = [b.to(device) for b in val]
    ctx = StepContext(cfg=cfg, system=system, model=model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler,
                      out_dir=out_dir, step=start)
    stop = cfg.train.steps if steps is None else min(steps, cfg.train.steps)
    return _Run(ctx, val, start, stop, TrainResult(cfg, model, optimizer, next_step=start, out_dir=out_dir))


def _log_step(run: _Run, res: StepResult, log_file: Any, progress: bool) -> None:
    run.result.history.append(res)
    if log_file is not None:
        log_file.write(json.dumps(asdict(res)) + "\n")
    if progress and (res.step % run.ctx.cfg.train.log_every == 0 or res.skipped):
        logger.info("step %d loss %.4g lr %.3g |g| %.3g%s", res.step, res.loss, res.lr, res.grad_norm,
                    f" SKIPPED ({res.skip_reason})" if res.skipped else "")


def _periodic(run: _Run, step: int, last: bool) -> None:
    """Validation and checkpoints after step ``step``."""
    t, ctx = run.ctx.cfg.train, run.ctx
    if run.val_batches and ((step + 1) % t.val_every == 0 or last):
        ctx.val = validate(parallel.bare(ctx.model), ctx.loss_fn, run.val_batches)
        run.result.val_history.append((step, ctx.val))
        logger.info("step %d val loss %.4g k_acc %.3f aux_matched %.3f", step, ctx.val["loss"], ctx.val["k_acc"],
                    ctx.val["aux_matched"])
    if ctx.out_dir is not None and parallel.world()[0] == 0 and (last or (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0)):
        name = "last.pt" if last else f"step_{step + 1:06d}.pt"
        save_checkpoint(ctx.out_dir / "checkpoints" / name, ctx.cfg, step + 1, parallel.bare(ctx.model), ctx.optimizer,
                        ctx.scaler)


class _Prefetch:
    """Simulates the batch of step s + 1 on a worker thread while step s trains (the second core of a
    2-core machine). Batches are pure functions of the step, so the stream is the same as without it.
    Under DDP each rank simulates only its share of every global batch."""

    def __init__(self, cfg: RunConfig, system: System, start: int, stop: int):
        self.cfg, self.system, self.stop = cfg, system, stop
        self.part = parallel.share(cfg.data.batch_size, *parallel.world())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ris-batch")
        self.pending = {start: self._submit(start)} if start < stop else {}

    def _submit(self, step: int) -> Any:
        return self.pool.submit(train_batch, self.cfg, self.system, step, self.part)

    def get(self, step: int) -> Batch:
        future = self.pending.pop(step, None) or self._submit(step)
        if step + 1 < self.stop:
            self.pending[step + 1] = self._submit(step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def train(cfg: RunConfig, callbacks: Iterable[Any] = (), out_dir: str | Path | None = None,
          steps: int | None = None, resume: str | Path | None = None,
          agree: Callable[[bool, Any], bool] = parallel.all_true, progress: bool = True) -> TrainResult:
    """Train ``cfg``. ``steps`` runs only the first ``steps`` steps of the configured schedule (the
    schedule itself is not rescaled); ``resume`` continues from a checkpoint of the same config;
    ``agree``: the ranks' finite-check agreement of every step (see ``train_step``); ``progress``: log a
    line every ``train.log_every`` steps and at each skipped step (False when a caller shows progress itself;
    validation lines and train_log.jsonl are written either way)."""
    run = _setup(cfg, Path(out_dir) if out_dir is not None else None, steps, resume)
    ctx, cbs, res, times = run.ctx, CallbackList(callbacks), run.result, []
    device = torch.device(cfg.train.device)
    log_file = (open(ctx.out_dir / "train_log.jsonl", "a")
                if ctx.out_dir is not None and parallel.world()[0] == 0 else None)
    batches = _Prefetch(cfg, ctx.system, run.start, run.stop)
    try:
        cbs.on_train_start(ctx)
        for step in range(run.start, run.stop):
            ctx.begin_step(step, batches.get(step).to(device), lr_at(cfg.train, step))
            cbs.on_step_start(ctx)
            t0 = time.perf_counter()
            out = train_step(ctx.model, ctx.loss_fn, ctx.batch, ctx.optimizer, StepSettings.from_config(cfg, step),
                             step=step, scaler=ctx.scaler, callbacks=cbs, ctx=ctx, agree=agree)
            times.append(time.perf_counter() - t0)
            ctx.n_skipped += out.skipped
            _log_step(run, out, log_file, progress)
            cbs.on_step_end(ctx)
            res.next_step = step + 1
            _periodic(run, step, last=step + 1 == run.stop or bool(ctx.stop_requested))
            if ctx.stop_requested:
                break
        cbs.on_train_end(ctx)
    except BaseException as exc:
        cbs.on_exception(ctx, exc)
        raise
    finally:
        batches.close()
        if log_file is not None:
            log_file.close()
    res.n_skipped, res.stopped = ctx.n_skipped, ctx.stop_requested
    res.step_time_s = sum(times) / len(times) if times else float("nan")
    return res
