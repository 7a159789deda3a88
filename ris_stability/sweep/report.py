"""`risdiag report --sweep STORAGE --study NAME`: the sweep's report.md, stability map, importances and
the best trial with the command that re-runs it (best.toml): ``risdiag trace -- COMMAND`` for a script
sweep, ``risdiag trace --config best.toml`` for the pipeline, a one-trial ``risdiag sweep`` for a custom
target. It reads the storage and never creates one (a mistyped path is an error, not an empty study)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ris_stability.records import UsageError
from ris_stability.report import markdown as md
from ris_stability.report.canvas import save_figure
from ris_stability.sweep.map import plot_stability_map
from ris_stability.sweep.command import stored_settings
from ris_stability.sweep.storage import fail_stale, load_study, open_storage
from ris_stability.sweep.target import DEFAULT_TARGET, load_target
from ris_stability.sweep.template import CommandTemplate, shell_text

log = logging.getLogger(__name__)

MAP_FILE = "figures/stability_map.png"
BEST_FILE = "best.toml"
BEST_SPACE_FILE = "best-space.toml"  # custom targets: the best parameters as a one-point space
REASON_CHARS = 160  # prune reasons are cut in the table (the full text is in the trial's attributes)


def outcome(t: FrozenTrial) -> str:
    """stable | nonfinite | pruned: RULE | failed | running."""
    if t.state == TrialState.COMPLETE:
        return t.user_attrs.get("status", "stable")
    if t.state == TrialState.PRUNED:
        return f"pruned: {t.user_attrs.get('prune_rule', 'median')}"
    if t.state == TrialState.FAIL:
        return "failed"
    return "running"


def _why(t: FrozenTrial) -> str:
    if t.state == TrialState.PRUNED:
        return t.user_attrs.get("prune_reason", "Optuna's pruner")
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("error", "its worker stopped (no heartbeat: killed or lost)")
    return ""


def _link(t: FrozenTrial, out_dir: Path) -> str:
    report = t.user_attrs.get("report")
    target = report or t.user_attrs.get("run_dir")
    if not target:
        return md.MISSING
    rel = Path(os.path.relpath(Path(target).resolve(), out_dir.resolve())).as_posix()
    label = "report" if report else "run folder"
    return f"[{label}]({rel})" + (f" ({t.user_attrs['host']})" if t.user_attrs.get("host") else "")


def _trial_table(trials: list[FrozenTrial], keys: list[str], metric: str, out_dir: Path) -> str:
    headers = ["trial", *keys, "state", metric, "non-finite steps", "smallest gap (site)", "prune / fail reason", "run"]
    rows = []
    for t in trials:
        gap = t.user_attrs.get("min_gap")
        site = t.user_attrs.get("min_gap_site") or ""
        why = _why(t)
        rows.append([t.number, *(md.fmt(t.params.get(k)) if not isinstance(t.params.get(k), str) else t.params[k]
                                 for k in keys), outcome(t), md.fmt(t.value if t.state == TrialState.COMPLETE else None),
                     md.fmt(t.user_attrs.get("nonfinite_steps")),
                     f"{md.fmt(gap)} ({site})" if site else md.fmt(gap),
                     why[:REASON_CHARS] + ("..." if len(why) > REASON_CHARS else ""), _link(t, out_dir)])
    return md.table(headers, rows)


def _importances(study: optuna.Study) -> str:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 2:
        return f"Not computed: {len(done)} completed trial(s); importances need at least 2."
    try:
        imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ImportError) as err:
        return f"Not computed: {type(err).__name__}: {err}"
    return md.table(["parameter", "importance"], [[k, md.fmt(v)] for k, v in imp.items()]) + (
        f"\n\nOptuna's default evaluator over the {len(done)} completed trials (pruned and failed trials have no "
        "objective and are not included: the stability map shows them).")


def _best_script(best: FrozenTrial, settings: dict[str, Any], out_dir: Path, head: str) -> str:
    template = CommandTemplate(tuple(settings["command"]))
    argv = template.render(best.params)
    env = template.env(best.params)
    run = shell_text(["risdiag", "trace", "--out", f"runs/best-{best.number:04d}", "--", *argv])
    where = settings.get("cwd", "the folder the sweep ran in")
    text = (head + f"# run it from {where}: {run}\n"
            + "# (the parameters also reach the script as environment variables, below)\n"
            + "[params]\n" + "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in best.params.items())
            + "\n[script]\ncommand = [" + ", ".join(json.dumps(a) for a in argv) + "]\n"
            + "\n[script.env]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in env.items()))
    (out_dir / BEST_FILE).write_text(text)
    return (f"Trial {best.number}: {settings['metric']} = {md.fmt(best.value, 4)} with {best.params}. Re-run it: "
            f"{md.code(run)} (also in [{BEST_FILE}]({BEST_FILE}), with the RISDIAG_PARAM_* environment variables).")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _best(study: optuna.Study, settings: dict[str, Any], out_dir: Path) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "No completed trial: no best configuration."
    head = f"# Best trial {best.number} of study {study.study_name!r}: {settings['metric']} = {best.value:.6g}\n"
    if settings.get("command"):
        return _best_script(best, settings, out_dir, head)
    try:
        target = load_target(settings["target"], settings["config"], settings["overrides"], settings["steps"])
        text = target.resolved_toml(best.params)
    except (UsageError, OSError) as err:
        return f"Best trial {best.number} ({best.params}); its configuration could not be rebuilt here: {err}"
    best_file = (out_dir / BEST_FILE).as_posix()
    if settings["target"] == DEFAULT_TARGET:
        run = f"risdiag trace --config {best_file}"
    else:  # a custom target has no trace command: a one-trial sweep with every parameter fixed re-runs it
        space = out_dir / BEST_SPACE_FILE
        space.write_text("".join(f"[params.{json.dumps(k)}]\ntype = \"categorical\"\nchoices = [{_toml(v)}]\n\n"
                                 for k, v in best.params.items()))
        run = shell_text(["risdiag", "sweep", "--config", settings["config"] or "", "--target", settings["target"],
                          *[x for o in settings["overrides"] for x in ("--set", o)],
                          *(["--steps", str(settings["steps"])] if settings["steps"] else []),
                          "--space", space.as_posix(), "--trials", "1", "--metric", settings["metric"],
                          "--storage", f"sqlite:///{(out_dir / 'best.db').as_posix()}", "--study", f"best-{best.number}"])
    (out_dir / BEST_FILE).write_text(head + f"# parameters: {best.params}\n# run it: {run}\n" + text)
    return (f"Trial {best.number}: {settings['metric']} = {md.fmt(best.value, 4)} with {best.params}. Full configuration: "
            f"[{BEST_FILE}]({BEST_FILE}); re-run it with {md.code(run)}.")


def _what(settings: dict[str, Any]) -> list[tuple[str, Any]]:
    if settings.get("command"):
        return [("command", md.code(" ".join(settings["command"])))]
    return [("target", md.code(settings["target"])), ("config", md.code(settings["config"])),
            ("fixed overrides", settings["overrides"] or "none"), ("steps per trial", settings["steps"] or "config's")]


def _counts(trials: list[FrozenTrial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[outcome(t)] = counts.get(outcome(t), 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))


def build_sweep_report(storage_url: str, study_name: str, out: Path) -> Path:
    """Write ``out`` (report.md), its stability map and best.toml; returns the report path."""
    study = load_study(open_storage(storage_url, create=False), study_name)  # never creates a file or study
    settings = stored_settings(study)
    study = load_study(open_storage(storage_url, settings.get("heartbeat_s", 10), create=False), study_name)
    fail_stale(study)  # a killed worker's trial is reported as failed, not running forever
    trials = study.get_trials(deepcopy=False)
    out_dir = out.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {str(out)!r}: cannot create {out_dir} ({err.strerror or err}); choose a writable "
                         "path") from None
    keys = list(settings["space"])
    points = [{"number": t.number, "params": t.params, "outcome": outcome(t)} for t in trials]
    save_figure(plot_stability_map(points, settings["space"]), out_dir / MAP_FILE)
    space_rows = [[k, spec["type"], spec.get("choices") or f"[{md.fmt(spec['low'])}, {md.fmt(spec['high'])}]"
                   + (" log" if spec.get("log") else "")] for k, spec in settings["space"].items()]
    blocks = [
        md.heading(f"Sweep {study_name}", 1),
        md.key_value_table([("storage", md.code(storage_url)), *_what(settings),
                            ("objective", f"{settings['direction']} {settings['metric']}"),
                            ("trials", f"{len(trials)}: {_counts(trials)}"), ("pruning rules", settings["rules"])]),
        md.heading("Search space"), md.table(["parameter", "type", "range / choices"], space_rows),
        md.heading("Stability map"), md.image("stability map", MAP_FILE),
        md.heading("Trials"), _trial_table(trials, keys, settings["metric"], out_dir),
        md.heading("Parameter importances"), _importances(study),
        md.heading("Best configuration"), _best(study, settings, out_dir),
    ]
    out.write_text(md.document(blocks))
    log.info("sweep report written to %s (%d trials)", out, len(trials))
    return out
