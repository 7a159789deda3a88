"""Mutation testing of the instrument modules, one shard per module (mutmut).

    python tests/mutation/run.py                      # every shard, 2 workers
    python tests/mutation/run.py --shard spikes amp   # some shards
    python tests/mutation/run.py --list               # the shards and their files
    python tests/mutation/run.py --shard amp --rerun  # only the last run's survivors, against today's tests

Each shard is mutated in its own copy of the tree (outside the repository, under
--work), against only the tests named for it in shards.toml, so shards never share
state and the repository stays clean. The score of a shard is
killed / (mutants - equivalent), where timeouts count as killed and mutants no test
reaches count as survivors. Survivors are listed with their diff; a survivor that
is examined and found equivalent goes into equivalent.toml with a one-line reason.
Exit status: 0 every shard at or above --min-score, 1 some shard below it,
2 bad usage or a shard that could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COPIED = ("ris_stability", "ris_model", "tests", "configs", "benchmarks")  # tests read configs/ and benchmarks/
KILLED_CODES = {1, 3, 36, -24, 24, 152, 255}
SURVIVED_CODES = {0, 5, 33}
TIMEOUT_CODES = {36, -24, 24, 152, 255}  # counted as killed, but --rerun tests them again
# Lines that only emit log text are not behaviour a test should pin down.
IGNORED_LINES = [r"^\s*(_?log|logger|LOG)\.(debug|info|warning|error|exception)\("]


@dataclass
class ShardResult:
    name: str
    total: int = 0
    killed: int = 0
    equivalent: int = 0
    other: int = 0
    survivors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def score(self) -> float:
        denominator = self.total - self.equivalent - self.other
        return 100.0 * self.killed / denominator if denominator else 100.0


def load_shards() -> dict[str, dict]:
    shards = tomllib.loads((HERE / "shards.toml").read_text())
    for name, shard in shards.items():
        for path in shard["files"] + [t for t in shard["tests"] if not t.startswith("-")]:
            if not (ROOT / path.split("::")[0]).exists():
                raise SystemExit(f"shards.toml [{name}]: {path} does not exist; fix the path")
    return shards


def load_equivalents() -> dict[str, dict[str, str]]:
    return tomllib.loads((HERE / "equivalent.toml").read_text())


def _mutmut_section(shard: dict) -> str:
    def toml_list(values: list[str]) -> str:
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["ris_stability"]\n'
        f"only_mutate = {toml_list(shard['files'])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(shard['tests'])}\n"
        # no:unraisableexception: that plugin's gc.collect() calls at session end cost ~1.5 s CPU per mutant
        # (a forked child with torch/optuna/mlflow in its heap), ten times the test itself. tests.mutation.warm:
        # torch._dynamo imported once in the fork server instead of in every child (its first optimizer, 2-6 s).
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "tests.mutation.warm", "-q"]\n'
        f"do_not_mutate_patterns = {toml_list(IGNORED_LINES)}\n"
        'process_isolation = "forkserver"\n'
        'also_copy = ["ris_model", "configs", "benchmarks"]\n'
        "use_git_change_detection = false\n"
        # mutmut's wall limit is (clean test time + 1 s) x this; its default (15) turns kills on a busy 2-core
        # machine into timeouts, which hide survivors: a generous limit costs nothing when tests fail fast
        "timeout_multiplier = 60.0\n"
    )


def prepare(work: Path, shard: dict) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + _mutmut_section(shard))


def _diff(work: Path, mutant: str) -> str:
    shown = subprocess.run(["mutmut", "show", mutant], cwd=work, capture_output=True, text=True)
    lines = [ln for ln in shown.stdout.splitlines()
             if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return " | ".join(ln.strip() for ln in lines)[:300]


def _codes(work: Path, shard: dict) -> dict[str, int]:
    codes: dict[str, int] = {}
    for path in shard["files"]:
        meta = work / "mutants" / (path + ".meta")
        if meta.exists():
            codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def refresh_tests(work: Path, shard: dict) -> list[str]:
    """For --rerun: the last run's survivors and timeouts (a busy machine turns slow kills, or hides survivors,
    as timeouts), with the shard's tests and selection refreshed from the repository
    (and mutmut's test-to-function map dropped, so that new tests are mapped too)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for dest in (work / "tests", work / "mutants" / "tests"):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(ROOT / "tests", dest, ignore=ignore)
    section = (ROOT / "pyproject.toml").read_text() + _mutmut_section(shard)
    for dest in (work / "pyproject.toml", work / "mutants" / "pyproject.toml"):
        dest.write_text(section)
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    return [m for m, code in sorted(_codes(work, shard).items()) if code in SURVIVED_CODES | TIMEOUT_CODES]


def run_shard(name: str, shard: dict, work: Path, jobs: int, equivalents: dict[str, str],
              rerun: bool = False) -> ShardResult:
    result = ShardResult(name)
    command = ["mutmut", "run", "--max-children", str(jobs)]
    if rerun and (work / "mutants").is_dir():
        pending = [m for m in refresh_tests(work, shard) if m not in equivalents]
        command = command + pending if pending else []  # nothing left to re-test: count the kept verdicts
    else:
        prepare(work, shard)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    if command:
        with open(work / "mutmut.log", "w") as log:
            proc = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            result.error = f"mutmut exited {proc.returncode}; see {work / 'mutmut.log'}"
            return result
    result.seconds = time.perf_counter() - started
    for mutant, code in sorted(_codes(work, shard).items()):
        result.total += 1
        if mutant in equivalents:
            result.equivalent += 1
        elif code in KILLED_CODES:
            result.killed += 1
        elif code in SURVIVED_CODES:
            result.survivors.append(mutant)
        else:
            result.other += 1
    return result


def report(results: list[ShardResult], work_root: Path, min_score: float, show_diffs: bool) -> None:
    print(f"{'shard':<14}{'mutants':>8}{'killed':>8}{'equiv':>7}{'surv':>6}{'other':>7}{'score':>8}{'time':>8}")
    for r in results:
        if r.error:
            print(f"{r.name:<14} ERROR {r.error}")
            continue
        flag = "" if r.score >= min_score else "  < %.0f%%" % min_score
        print(f"{r.name:<14}{r.total:>8}{r.killed:>8}{r.equivalent:>7}{len(r.survivors):>6}"
              f"{r.other:>7}{r.score:>7.1f}%{r.seconds:>7.0f}s{flag}")
    for r in results:
        if r.survivors:
            print(f"\nsurvivors of {r.name} ({len(r.survivors)}):")
            for mutant in r.survivors:
                diff = _diff(work_root / r.name, mutant) if show_diffs else ""
                print(f"  {mutant}" + (f"\n      {diff}" if diff else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", nargs="+", metavar="NAME", help="shards to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "risdiag-mutation",
                        help="where the per-shard copies live (default ~/.cache/risdiag-mutation)")
    parser.add_argument("--min-score", type=float, default=85.0, help="score below which the run fails")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--no-diffs", action="store_true", help="list survivors without their diffs")
    parser.add_argument("--list", action="store_true", help="print the shards and exit")
    parser.add_argument("--rerun", action="store_true",
                        help="re-test only the last run's survivors and timeouts in --work, with the tests "
                             "refreshed from the repository (the other verdicts are kept; a shard never run is run "
                             "in full)")
    args = parser.parse_args(argv)
    if shutil.which("mutmut") is None:
        parser.error("mutmut is not installed: pip install -e '.[dev]'")
    shards = load_shards()
    if args.list:
        for name, shard in shards.items():
            print(f"{name}: {' '.join(shard['files'])}")
        return 0
    unknown = sorted(set(args.shard or ()) - set(shards))
    if unknown:
        parser.error(f"unknown shard(s) {', '.join(unknown)}; known: {', '.join(shards)}")
    equivalents = load_equivalents()
    results = []
    for name in args.shard or list(shards):
        print(f"[{time.strftime('%H:%M:%S')}] {name}: mutating {len(shards[name]['files'])} file(s)",
              file=sys.stderr, flush=True)
        results.append(run_shard(name, shards[name], args.work / name, args.jobs, equivalents.get(name, {}),
                                 rerun=args.rerun))
    report(results, args.work, args.min_score, not args.no_diffs)
    if args.json:
        args.json.write_text(json.dumps([dict(r.__dict__, score=r.score) for r in results], indent=2))
    if any(r.error for r in results):
        return 2
    return 0 if all(r.score >= args.min_score for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
