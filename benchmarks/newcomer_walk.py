"""A newcomer's walk through the README, scripted: clone the repository into a temporary folder, run the
README's flows there with small step counts, and check each command's exit code, the texts the README quotes,
one progress line per interval in the plain log, and a clean `git status` at the end.

    python benchmarks/newcomer_walk.py [--repo PATH] [--keep]

Each command runs as the README writes it, with `risdiag` = `python -m ris_stability.cli` from the clone
(PYTHONPATH=clone, so an installed copy elsewhere is not what is tested). Prints one line per step and a
verdict; exits 1 when a check fails. Not a test: it takes about 15 minutes on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RISDIAG = [sys.executable, "-m", "ris_stability.cli"]
SEED_NAN = ["--config", "configs/seed-nan.toml", "--steps", "6", "--no-report"]
TINY = ["--set", "data.batch_size=4", "--set", "train.val_every=0", "--set", "data.n_val=0"]


class Walk:
    def __init__(self, clone: Path):
        self.clone, self.failures, self.rows = clone, [], []
        self.env = {**os.environ, "PYTHONPATH": str(clone), "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'runs' / 'mlflow.db'}", "COLUMNS": "100"}
        for key in ("WANDB_DIR", "MLFLOW_EXPERIMENT_NAME"):
            self.env.pop(key, None)

    def run(self, name: str, argv: list[str], expect: int, quotes: tuple[str, ...] = (), timeout: int = 900,
            env: dict | None = None) -> str:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=self.clone, env={**self.env, **(env or {})}, capture_output=True,
                               text=True, timeout=timeout)
            code, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = -1, str(exc.stdout or ""), f"timed out after {timeout} s"
        text = " ".join(re.sub("[│┃║]", " ", out + "\n" + err).split())  # panels and tables wrap at spaces
        problems = [] if code == expect else [f"exit {code}, expected {expect}"]
        problems += [f"missing text {q!r}" for q in quotes if q not in text]
        self.note(name, problems, f"exit {code}, {time.perf_counter() - t0:.0f} s")
        if problems:
            tail = "\n".join((out + err).strip().splitlines()[-15:])
            print(f"    --- last lines of {name} ---\n    " + tail.replace("\n", "\n    "))
        return out + "\n" + err

    def note(self, name: str, problems: list[str], detail: str = "") -> None:
        self.rows.append((name, not problems))
        if problems:
            self.failures.append(f"{name}: {'; '.join(problems)}")
        print(f"[{'ok' if not problems else 'FAIL'}] {name}: {detail}{' -- ' + '; '.join(problems) if problems else ''}",
              flush=True)

    def newest(self, pattern: str) -> str:
        found = sorted((self.clone / "runs").glob(pattern), key=lambda p: p.stat().st_mtime)
        return str(found[-1].relative_to(self.clone)) if found else f"runs/{pattern}"


def progress_lines_once(walk: Walk, name: str, log: str) -> None:
    """One progress line per interval: no step twice, and no second progress logger (ris_model.train)."""
    steps = re.findall(r"ris_stability\.cli\.live: step (\d+)/", log)
    doubled = [s for s, n in Counter(steps).items() if n > 1]
    other = re.findall(r"ris_model\.train: step \d+ loss", log)
    problems = ([f"steps logged twice: {doubled[:5]}"] if doubled else []) + (
        [f"{len(other)} extra progress lines from ris_model.train"] if other else []) + (
        [] if steps else ["no progress line"])
    walk.note(name, problems, f"{len(steps)} progress lines, {len(log.splitlines())} log lines in all")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="repository to clone")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="newcomer-"))
    clone = tmp / "ris-diag"
    subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    print(f"clone of {args.repo} at {head.strip()} in {clone}", flush=True)
    w = Walk(clone)
    t0 = time.perf_counter()

    # The main job, piped (no TTY): plain progress lines, summary, run folder under runs/.
    log = w.run("trace quickstart (40 steps, no TTY)", [*RISDIAG, "trace", "--config", "configs/quickstart.toml",
                                                          "--steps", "40"], 0, ("hazard=", "run folder", "runs/quickstart-"))
    progress_lines_once(w, "plain log: one progress line per interval", log)
    quick = w.newest("quickstart-*")
    files = [f for f in ("config.resolved.toml", "steps.jsonl", "events.jsonl", "summary.json", "report.md",
                         "figures", "checkpoints") if not (clone / quick / f).exists()]
    w.note("run folder files named in the README", [f"missing {f}" for f in files], quick)

    # See a NaN, then fix it.
    w.run("trace seed-nan", [*RISDIAG, "trace", *SEED_NAN], 1, ("non-finite steps", "capsules"))
    nan = w.newest("seed-nan-*")
    capsules = sorted((clone / nan / "capsules").glob("step_*.pt"))
    w.note("seed-nan: 5 crash capsules", [] if len(capsules) == 5 else [f"{len(capsules)} capsules"], nan)
    w.run("bisect --float64 --export", [*RISDIAG, "bisect", nan, "--float64", "--export", "runs/repro"], 0,
          ("LinalgEighBackward0", "aten.div_.Tensor", "loss.subspace", "ris_model/loss.py:99",
           "cluster of 122 at 1.3e-05", "with ris_stability.gap_aware():", "diagonal loading"))
    w.run("python runs/repro/reproduce.py", [sys.executable, "runs/repro/reproduce.py"], 0,
          ("backward: gradient of input 0 has",))
    w.run("trace seed-nan --gap-aware", [*RISDIAG, "trace", *SEED_NAN, "--gap-aware"], 0, ("non-finite steps",))
    fixed = w.newest("seed-nan-*")
    w.run("trace seed-nan --set loss.eigh_backward=gap_aware",
          [*RISDIAG, "trace", *SEED_NAN, "--set", "loss.eigh_backward=gap_aware"], 0)
    w.run("compare", [*RISDIAG, "compare", nan, fixed], 0, ("metrics differ", "non-finite steps", "runs/compare-"))
    w.run("align seed-misaligned", [*RISDIAG, "align", "--config", "configs/seed-misaligned.toml"], 1)
    w.run("report", [*RISDIAG, "report", nan], 0, ("report written to",))

    # Your own training script.
    w.run("trace a script (planted fault)", [*RISDIAG, "trace", "--out", "runs/planted", "--", "python",
                                            "examples/planted_fault.py", "--steps", "20"], 1,
          ("non-finite origin, phase backward", "cluster of 6 at 1.0e-03", "aten.div_.Tensor",
           "model.features.1", "examples/planted_fault.py:26"))
    w.run("bisect with a replayer", [*RISDIAG, "bisect", "runs/planted", "--replayer",
                                     "examples/planted_fault.py:replay", "--float64"], 0, ("LinalgEighBackward0",))

    # Sinks: TensorBoard, MLflow (sqlite), W&B (offline); nothing may land in the clone's root.
    w.run("trace with --tensorboard --mlflow --wandb", [*RISDIAG, "trace", "--config", "configs/quickstart.toml",
                                                       "--steps", "3", *TINY, "--out", "runs/sinks", "--tensorboard",
                                                       "runs/tb", "--mlflow", "--wandb"], 0)
    stray = [n for n in ("mlruns", "wandb", "mlflow.db") if (clone / n).exists()]
    tb = list((clone / "runs" / "tb" / "sinks").glob("events.out.tfevents.*"))
    wb = list((clone / "runs" / "sinks").glob("wandb/offline-run-*/run-*.wandb"))
    w.note("sinks wrote their files under runs/", [f"{n}/ in the working directory" for n in stray]
           + ([] if tb else ["no TensorBoard events"]) + ([] if wb else ["no W&B offline run"]))

    # Sweeps.
    w.run("sweep (2 trials x 2 steps)", [*RISDIAG, "sweep", "--config", "configs/quickstart.toml", "--space",
                                         "configs/space-quickstart.toml", "--trials", "2", "--steps", "2",
                                         "--storage", "sqlite:///runs/sweep.db", "--study", "quick", "--seed", "0",
                                         "--set", "data.batch_size=4", "--set", "data.n_val=8"], 0, ("study quick",))
    w.run("report --sweep", [*RISDIAG, "report", "--sweep", "sqlite:///runs/sweep.db", "--study", "quick"], 0,
          ("runs/sweep-quick/report.md",))
    report = clone / "runs" / "sweep-quick" / "report.md"
    # best.toml exists when a trial completed (the report links it); a study of pruned trials has none
    wanted = ["report.md"] + (["best.toml"] if report.is_file() and "(best.toml)" in report.read_text() else [])
    missing = [n for n in wanted if not (report.parent / n).is_file()]
    w.note("sweep report files", [f"missing runs/sweep-quick/{n}" for n in missing], ", ".join(wanted))

    # Help and mistakes.
    for cmd in ("trace", "bisect", "report", "compare", "align", "sweep"):
        w.run(f"risdiag {cmd} --help", [*RISDIAG, cmd, "--help"], 0, ("exit codes:",), timeout=120)
    (clone / "runs" / "typo.toml").write_text("[train]\nlrr = 1.0\n")
    w.run("config typo names the file", [*RISDIAG, "trace", "--config", "runs/typo.toml"], 2,
          ("runs/typo.toml", "train.lrr", "valid keys"), timeout=120)

    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    w.note("git status clean", [f"dirty: {status.strip()[:300]}"] if status.strip() else [])
    print(f"\n{sum(ok for _, ok in w.rows)} of {len(w.rows)} checks passed in {time.perf_counter() - t0:.0f} s "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
    for failure in w.failures:
        print("FAILED", failure)
    if args.keep:
        print(f"clone kept in {clone}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if w.failures else 0


if __name__ == "__main__":
    sys.exit(main())
