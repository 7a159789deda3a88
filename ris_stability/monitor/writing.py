"""What the StabilityMonitor writes for a step: its trace row, its capsule, hazard and liveness events, and the
events of other parts of a run (``event``). A mixin of StabilityMonitor, kept apart so that the monitor's file
holds the step's checks and this one the records they leave."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ris_stability.linalg.hazards import site_hazards
from ris_stability.monitor.context import LoopContext
from ris_stability.observe.loopstack import optimizers_of
from ris_stability.records.capsule import Capsule, capsule_path, capture_rng, clone_state, rng_state
from ris_stability.records.capsule_store import CapsuleStore
from ris_stability.records.capsule_writer import CapsuleWriter

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"  # spike snapshots: finite steps kept for a precision audit, apart from crash capsules


class MonitorWriting:
    """The monitor's writing half (see StabilityMonitor for the state it uses)."""

    capsule_background = True  # False: capsules written in the step (the old path; tests, benchmarks/capsule_bench.py)
    _capsule_writer: CapsuleWriter | None = None

    def event(self, kind: str, severity: str, message: str, *, nonfinite: bool = False, **data: Any) -> None:
        """An event of the run (e.g. the driver's finding) in the trace and, for warnings and errors, the live view."""
        if self.writer is not None:
            self.writer.event(kind, severity, message, **data)
        if self.live is not None and severity != "info" and data.get("step") is not None:
            self.live.update(data["step"], event=message, nonfinite=nonfinite)

    def _write_capsule(self, ctx: LoopContext, reason: str, purpose: str = "crash") -> Path:
        """A crash capsule of a non-finite step (capsules/, listed in ``capsules``), or with ``purpose`` "spike"
        a snapshot of a finite spike (snapshots/spike_NNNNNN.pt, listed in ``snapshots``): same content."""
        # After backward the optimizer has not stepped: parameters and optimizer state are still pre-step.
        local = self.dist is not None and self._decision is not None
        meta = {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "replayer": self.replayer, "lr": float(ctx.lr),
                "loss": float(ctx.loss.detach()) if ctx.loss is not None else math.nan,
                "grads_finite": bool(ctx.grads_finite) if ctx.grads_finite is not None else False}
        if local:  # the replay runs this rank's batch alone: its reference is the local, not the reduced, result
            meta.update(grads_finite=self._decision.local_ok, rank=self.dist.rank, world_size=self.dist.world,
                        origin_ranks=self._decision.origins, local_grads=self.dist.local_grads is not None)
        opts = [clone_state(opt.state_dict()) for opt in optimizers_of(ctx)]
        if local:
            grads = self.dist.local_grads
        elif ctx.born_grads is not None:  # as backward made them, before the script sanitised or clipped them
            grads = ctx.born_grads
        else:  # at optimizer.step; when the script rewrote them since backward, the names of those born non-finite
            grads = {n: p.grad.detach().clone() for n, p in self._model.named_parameters() if p.grad is not None}
            if ctx.born_names is not None:
                meta.update(grads_at="optimizer.step", born_nonfinite=list(ctx.born_names))
        if self._rng.snapshot is None:  # no step has started (a capsule outside any step)
            rng = capture_rng()
        else:
            snapshot, exact = self._rng.verified()
            rng = rng_state(snapshot)
            if not exact:  # random moved since it was last copied: its state now stands in (records/step_rng.py)
                meta["python_rng"] = "at capsule"
                log.warning("capsule of step %d: Python's random state moved since it was last copied; the capsule "
                            "holds its state at the capsule, exact unless the step itself drew from random "
                            "(it is copied at every step from now on)", ctx.step)
        # Copies on the device, taken now: the script's next step may change the model, the optimizer, the batch.
        cap = Capsule(step=ctx.step, batch=clone_state(self.batch_state(ctx.batch)),
                      model_state=clone_state(self._model.state_dict()),
                      optimizer_state=(opts[0] if len(opts) == 1 else {"optimizers": opts}) if opts else None,
                      rng=rng,
                      config_text=self.config_text, reason=reason, meta=meta,
                      grads=grads)
        if purpose == "spike":  # its path (known now) goes into the spike's message; written in the background
            return self._write_snapshot(cap)
        store = self.capsule_store

        def job() -> tuple[Path | None, list[Path], list[Path]]:  # on the writer thread (records/capsule_writer.py)
            path, dropped = store.write(cap)
            return path, dropped, list(store.kept)

        def done(result: Any, err: BaseException | None) -> None:  # on the training thread, in order
            self._capsule_done(cap, result, err)

        self.capsule_writer.submit(job, done)
        return capsule_path(self.run_dir, ctx.step) if self.cfg.max_capsules >= 1 else None

    def _write_snapshot(self, cap: Capsule) -> Path:
        """A spike snapshot (snapshots/spike_NNNNNN.pt) by the same background writer as the capsules."""
        path = self.run_dir / SNAPSHOT_DIR / f"spike_{cap.step:06d}.pt"
        self.snapshots.append(path)

        def done(result: Any, err: BaseException | None) -> None:  # on the training thread, in order
            if err is not None:  # a full disk: training goes on
                self.snapshots.remove(path)
                self.writer.event("capsule_not_written", "warning", f"spike snapshot for step {cap.step} not "
                                  f"written: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                  step=cap.step)
                return
            self.writer.event("snapshot_written", "info", f"spike snapshot for step {cap.step} written",
                              step=cap.step, path=str(path.relative_to(self.run_dir)))

        self.capsule_writer.submit(lambda: cap.save(path), done)
        return path

    def _capsule_done(self, cap: Capsule, result: Any, err: BaseException | None) -> None:
        """The events of a capsule write, once it is done (the write's own error: one warning event)."""
        if err is not None:  # a full disk (torch.save wraps it in RuntimeError): training goes on
            self.writer.event("capsule_not_written", "warning", f"capsule for step {cap.step} not written: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; free space "
                              "on the run folder's disk to keep the next ones", step=cap.step)
            return
        path, dropped, kept = result
        self.capsules[:] = kept
        if path is None:
            return
        self.writer.event("capsule_written", "info", f"capsule for step {cap.step} written", step=cap.step,
                          path=str(path.relative_to(self.run_dir)), replayer=self.replayer,
                          params_digest=cap.meta["params_digest"])
        for old in dropped:
            self.writer.event("capsule_dropped", "info", f"capsule {old.name} deleted: over the run's capsule budget "
                              f"({self.cfg.max_capsules} capsules, {self.cfg.max_capsule_mb} MB; the first and the "
                              "most recent are kept)", step=int(old.stem.rpartition("_")[2]),
                              path=str(old.relative_to(self.run_dir)))

    @property
    def capsule_writer(self) -> CapsuleWriter:
        """Writes the run's capsules off the training thread (``capsule_background`` False: in the step, the old
        synchronous path); its events are recorded at each step's end and at the run's end (drain_capsules)."""
        if self._capsule_writer is None:
            self._capsule_writer = CapsuleWriter(background=self.capsule_background)
        return self._capsule_writer

    def drain_capsules(self) -> None:
        """Every capsule submitted so far on disk and its events written (before the summary: nothing lost)."""
        if self._capsule_writer is not None:
            self._capsule_writer.drain()

    def collect_capsules(self) -> None:
        """The events of the capsules written since the last call (cheap when none)."""
        if self._capsule_writer is not None:
            self._capsule_writer.collect()

    @property
    def capsule_store(self) -> CapsuleStore:
        """The run's capsules under its budget (made at the first capsule: under DDP the run folder is the
        rank's shard by then)."""
        if self._capsule_store is None:
            self._capsule_store = CapsuleStore(self.run_dir, self.cfg.max_capsules,
                                               int(self.cfg.max_capsule_mb * 2 ** 20))
        return self._capsule_store

    def _write_row(self, head: dict[str, Any], loss: float, grads: dict[str, float], sites: dict[str, dict[str, Any]],
                   dead: list[float], ripe: list[str]) -> None:
        """A step's row, once its device values are read (step_reads.py): ``head`` (the host part taken at the
        step's end), ``grads`` (the grad monitor's row), ``sites`` (matrix statistics), ``dead``/``ripe``
        (liveness and the ripe loss terms' change flags, sampled steps only)."""
        step = head["step"]
        row: dict[str, Any] = {**head, "nonfinite": step in self.nonfinite_steps, "loss": loss,
                               "spike": step in self.spike_steps}
        row.update(grads)
        for name, site in sites.items():
            row.update({f"mat/{name}/{k}": v for k, v in site["stats"].items()})
            row[f"mat/{name}/vec_grad"] = 1.0 if site["vec_grad"] else 0.0
            if site.get("grad_norm") is not None:
                row[f"mat/{name}/grad_in"] = site["grad_norm"]
            row.update({f"mat/{name}/{k}": v for k, v in (site.get("backward") or {}).items() if math.isfinite(v)})
            self._flag(step, name, site)
        self.writer.step(row)
        if dead or ripe:
            self._report_dead(step, *self.grads.dead_from(dead, ripe))
        if self.live is not None:
            self.live.update(step + 1, row=row)

    def _flag(self, step: int, name: str, site: dict[str, Any]) -> None:
        bad = step in self.nonfinite_steps  # a tie is a fault only where the gradients went non-finite
        for hazard in site_hazards(name, site, self._dtype, nonfinite=bad):  # the right hazard for the site's op
            if (name, hazard.kind) not in self._flagged:
                self._flagged.add((name, hazard.kind))
                self.writer.event(hazard.kind, hazard.severity, hazard.message, step=step, **hazard.data)

    def _report_dead(self, step: int, params: list[str], terms: list[str]) -> None:
        missing = [p for p in params if self.grads.never_had_grad(p)]
        zero = [p for p in params if p not in missing]
        n = self.grads.dead_after
        for names, what in ((missing, f"received no gradient in {n}+ finite steps (grad is None: the loss does not "
                                      "depend on them)"),
                            (zero, f"gradient exactly zero in every one of {n}+ finite steps")):
            if names:
                self.writer.event("dead_parameter", "warning", f"{what}: {', '.join(names[:8])}"
                                  + (f" (+{len(names) - 8})" if len(names) > 8 else ""), step=step, names=names,
                                  gradient="none" if names is missing else "zero")
        if terms:
            self.writer.event("dead_loss_term", "warning", f"loss term(s) constant over {n}+ finite steps: "
                              f"{', '.join(terms)}", step=step, names=terms)

