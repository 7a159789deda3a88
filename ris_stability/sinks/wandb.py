"""Weights & Biases sink: the TensorBoard sink's scalars, texts and figures, as one W&B run per run folder.

Scalars carry the same slash-grouped names as the TensorBoard sink (``loss/<term>``, ``grad_norm/<module>``,
``update_ratio/<module>``, ``train/lr``, ``matrix/<site>/<stat>``), logged at their training step. Incidents
and findings become the tables ``incidents`` and ``findings`` (step, kind, severity, message), the report's
figures images ``figures/<name>``, and report.md, summary.json, events.jsonl and finding.json files of the
run; the resolved config and the run's metadata are the run's config. The run ends with the summary entry
``risdiag.status`` and exit code 1 for a crashed run.

W&B's own settings apply (``WANDB_PROJECT``, default "risdiag"; ``WANDB_ENTITY``; ``WANDB_MODE=offline``
to keep the run local and ``wandb sync`` it later). Its local files go to ``WANDB_DIR`` when set, else to
the run folder (``<run>/wandb/``), never to the working directory. W&B is told not to capture the
terminal, not to sample system metrics and not to read git, so the training process looks as it did.
Needs the ``wandb`` package (extra ``ris-diag[wandb]``).
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any, Mapping

from ris_stability.sinks.mlflow import flat_params

_FINDING_KINDS = ("finding", "precision_audit")  # as the TensorBoard sink: every other warning is an incident
_COLUMNS = ["step", "kind", "severity", "message"]
_META = ("command", "torch", "device", "dtype", "config_path", "config_hash")
_FILES = ("report.md", "summary.json", "events.jsonl", "finding.json")


class WandbRun:
    def __init__(self, run: Any):
        self.run = run
        self.last_step = 0
        self._rows: dict[str, list[list[Any]]] = {"incidents": [], "findings": []}

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        self.run.log(dict(scalars), step=step, commit=True)  # written now: a row never waits for the end

    def event(self, record: Mapping[str, Any]) -> None:
        if record.get("kind") in _FINDING_KINDS:
            table = "findings"
        elif record.get("severity") in ("warning", "error"):
            table = "incidents"
        else:
            return
        self._rows[table].append([record.get("step"), str(record.get("kind")), str(record.get("severity")),
                                  str(record.get("message"))])

    def publish(self, run_dir: Path) -> None:
        import wandb

        # W&B steps only move forward: what exists only at the end is logged one step after the last one.
        media: dict[str, Any] = {name: wandb.Table(columns=_COLUMNS, data=rows)
                                 for name, rows in self._rows.items() if rows}
        figures = run_dir / "figures"
        for png in sorted(figures.glob("*.png")) if figures.is_dir() else []:
            media[f"figures/{png.stem}"] = wandb.Image(str(png))
        capsules = sorted((run_dir / "capsules").glob("*.pt")) if (run_dir / "capsules").is_dir() else []
        if capsules:
            media["capsules"] = wandb.Table(columns=["capsule"], data=[[f"{run_dir.name}/capsules/{c.name}"]
                                                                       for c in capsules])
        if media:
            self.run.log(media, step=self.last_step + 1)
        for name in _FILES:  # copied into the run's files folder, which W&B uploads at the end (or on sync)
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, Path(self.run.dir) / name)

    def close(self, status: str) -> None:
        self.run.summary["risdiag.status"] = status
        self.run.finish(exit_code=1 if status == "crashed" else 0)


class WandbBackend:
    name = "wandb"

    def __init__(self, project: str | None = None):
        self.project = project or os.environ.get("WANDB_PROJECT") or "risdiag"

    def check(self) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ImportError("the wandb package is not installed: pip install 'ris-diag[wandb]'") from exc

    def open_run(self, run_dir: Path, meta: Mapping[str, Any]) -> WandbRun:
        import wandb

        config = {f"meta.{k}": str(meta[k]) for k in _META if meta.get(k) is not None}
        resolved = run_dir / "config.resolved.toml"
        if resolved.is_file():
            config.update(flat_params(tomllib.loads(resolved.read_text(encoding="utf-8"))))
        folder = Path(os.environ.get("WANDB_DIR") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                  x_disable_stats=True)
        run = wandb.init(project=self.project, name=run_dir.name, dir=str(folder), config=config,
                         reinit="create_new", settings=settings)
        return WandbRun(run)


__all__ = ["WandbBackend", "WandbRun"]
