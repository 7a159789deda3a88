"""`risdiag locate RUN_DIR`, honest records and evidence-backed claims, on outside-style scripts
(tests/ris_stability/scripts/): a one-off NaN located with zero glue, an unseeded re-run that diverges, a
kwargs-only model whose numpy LambdaLR capsules load and replay bit-exact, a --gap-aware run whose
recorded command reproduces it, and a healthy eigh next to a sqrt NaN that is never called suspect."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from ris_stability import cli
from ris_stability.records import read_trace
from ris_stability.records.capsule import Capsule, state_digest
from tests.ris_stability.trace_factory import make_run

SCRIPTS = Path(__file__).parent / "scripts"
ONCE = str(SCRIPTS / "once_nan.py")
BAD_STEP, BATCH, STEPS = 7, 8, 12


def fault_line(script: str) -> int:
    lines = (SCRIPTS / script).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "# FAULT" in line)


def corrupt_index(seed: int = 0) -> int:
    """The record the seeded data order puts into step BAD_STEP (the script draws its order this way)."""
    perm = torch.randperm(STEPS * BATCH, generator=torch.Generator().manual_seed(seed))
    return int(perm[BAD_STEP * BATCH + 2])


def trace(run_dir: Path, *argv: str, options: tuple[str, ...] = ("--no-report", "--no-live")) -> int:
    return cli.main(["trace", "--out", str(run_dir), *options, "--", "python", *argv])


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_trace(run_dir).events if e["kind"] == kind]


@pytest.fixture(scope="module")
def one_off(tmp_path_factory):
    """A seeded run whose NaN happens at step 7 only: the in-process locator, armed after it, finds nothing."""
    run = tmp_path_factory.mktemp("once") / "run"
    code = trace(run, ONCE, "--corrupt-index", str(corrupt_index()), "--shuffle-seed", "0")
    return code, run


def test_one_off_nan_leaves_no_finding_but_suggests_locate(one_off):
    code, run = one_off
    assert code == cli.EXIT_NONFINITE
    t = read_trace(run)
    assert t.nonfinite_steps == [BAD_STEP] and t.skipped_steps == [BAD_STEP]
    assert not (run / "finding.json").exists()  # the fault did not recur in the armed steps
    from ris_stability.report.build import build_report

    text = build_report(run).read_text()
    assert f"`risdiag locate {run.name}`" in text and "risdiag bisect" not in text  # bisect has no replayer here


def test_capsule_of_a_numpy_lambdalr_loads_with_plain_numbers(one_off):
    _, run = one_off
    cap = Capsule.load(run / "capsules" / f"step_{BAD_STEP:06d}.pt")  # weights_only, as bisect and locate load
    groups = cap.optimizer_state["param_groups"]
    assert type(groups[0]["lr"]) is float and type(groups[0]["initial_lr"]) is float
    assert cap.meta["params_digest"] == state_digest(cap.model_state)
    written = events(run, "capsule_written")[0]["data"]
    assert written["params_digest"] == cap.meta["params_digest"] and written["replayer"] == ""


def test_locate_names_op_and_line_of_a_one_off_nan(one_off, capsys):
    _, run = one_off
    assert cli.main(["locate", str(run)]) == cli.EXIT_OK
    f = json.loads((run / "finding.json").read_text())
    assert (f["phase"], f["node"], f["module"]) == ("backward", "SqrtBackward0", "model.scale")
    assert f["op"].startswith("aten.") and f["location"].endswith(f"scripts/once_nan.py:{fault_line('once_nan.py')}")
    assert f["step"] == BAD_STEP and f["source"].startswith("risdiag locate")
    # the re-run reached the capsule's parameters and replayed its step bit for bit
    assert f["rerun"]["params_match"] is True and f["rerun"]["grads_bit_exact"] is True
    found = events(run, "finding")
    assert found and found[-1]["data"]["finding"]["node"] == "SqrtBackward0"
    report = (run / "report.md").read_text()
    assert "SqrtBackward0" in report and "risdiag locate" in report.split("## Finding")[1]
    assert "bit-exact with the capsule's" in capsys.readouterr().out


@pytest.mark.slow
def test_unseeded_rerun_says_where_it_diverged(tmp_path, capsys):
    run = tmp_path / "run"
    assert trace(run, ONCE, "--corrupt-index", str(corrupt_index())) == cli.EXIT_NONFINITE
    capsys.readouterr()
    assert cli.main(["locate", str(run), "--no-report"]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert "diverged from the recorded run at step 0" in out and "loss" in out
    assert "seed it" in out and "write a replayer" in out
    assert not (run / "finding.json").exists()
    diverged = events(run, "locate_diverged")
    assert diverged and diverged[0]["step"] == 0 and diverged[0]["data"]["rerun"]["diverged_at"] == 0


def test_locate_refuses_a_run_without_a_script(tmp_path, capsys):
    run = make_run(tmp_path / "synthetic")
    assert cli.main(["locate", str(run)]) == cli.EXIT_USAGE
    assert "not a run of `risdiag trace -- python SCRIPT.py`" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_gap_aware_run_is_recorded_and_its_command_reproduces_it(tmp_path):
    script = str(SCRIPTS / "eigh_whiten.py")
    plain, aware = tmp_path / "plain", tmp_path / "aware"
    assert trace(plain, script, "--steps", "8") == cli.EXIT_NONFINITE  # the option changes the run
    assert trace(aware, script, "--steps", "8", options=("--no-live", "--gap-aware")) == cli.EXIT_OK
    meta = json.loads((aware / "meta.json").read_text())
    assert meta["options"] == {"gap_aware": True} and "--gap-aware" in meta["command"]
    assert "gap_aware = true" in (aware / "config.resolved.toml").read_text()
    # re-running the recorded command reproduces the run, bit for bit
    argv = shlex.split(meta["command"])
    assert argv[:2] == ["risdiag", "trace"]
    again = tmp_path / "again"
    assert cli.main(["trace", "--out", str(again), "--no-live", "--no-report", *argv[2:]]) == cli.EXIT_OK
    a, b = read_trace(aware), read_trace(again)
    assert a.steps["loss"].tolist() == b.steps["loss"].tolist() and b.nonfinite_steps == []
    report = (aware / "report.md").read_text()
    assert "--gap-aware" in report  # the report's command
    look = report.split("## What to look at")[1].split("## ")[0]
    assert "already applied" in look and "try a gap-aware" not in look and "0/0" not in look


def test_healthy_eigh_next_to_a_sqrt_nan_is_never_suspect(tmp_path):
    run = tmp_path / "run"
    assert trace(run, str(SCRIPTS / "eigh_and_sqrt.py"), options=("--no-live",)) == cli.EXIT_NONFINITE
    bad = events(run, "nonfinite_grad")
    assert bad and all("suspect" not in e["message"] and "matrix" not in e["data"] for e in bad)
    assert not events(run, "tied_eigenvalues")
    f = json.loads((run / "finding.json").read_text())
    assert (f["phase"], f["node"], f["module"]) == ("backward", "SqrtBackward0", "model.norm")
    assert f["location"].endswith(f"scripts/eigh_and_sqrt.py:{fault_line('eigh_and_sqrt.py')}")
    report = (run / "report.md").read_text()
    assert "Suspect matrix" not in report and "linalg.eigh`:" not in report.split("## What to look at")[1].split("## ")[0]


def test_step_zero_one_off_with_keyword_inputs(tmp_path, capsys):
    """The fault in the first batch, before the first optimizer step: step 0's capsule holds the kwargs-only
    model's inputs, and locate arms the locator there although the driver does not know the model yet."""
    run = tmp_path / "run"
    first = int(torch.randperm(STEPS * BATCH, generator=torch.Generator().manual_seed(0))[2])
    assert trace(run, ONCE, "--corrupt-index", str(first), "--shuffle-seed", "0") == cli.EXIT_NONFINITE
    assert read_trace(run).nonfinite_steps == [0]
    cap = Capsule.load(run / "capsules" / "step_000000.pt")
    assert cap.batch["inputs"]["model"]["kwargs"]["x"].shape == (BATCH, 8)
    assert cli.main(["locate", str(run), "--no-report"]) == cli.EXIT_OK
    f = json.loads((run / "finding.json").read_text())
    assert (f["phase"], f["node"], f["module"]) == ("backward", "SqrtBackward0", "model.scale")
    assert f["location"].endswith(f"scripts/once_nan.py:{fault_line('once_nan.py')}")
    assert f["rerun"]["params_match"] is True and f["rerun"]["grads_bit_exact"] is True


def test_numpy_lambdalr_capsule_replays_bit_exact_under_bisect(one_off, capsys):
    """The same capsule through `risdiag bisect` with a replayer: loaded weights_only, its loss replayed bit for
    bit. The script's clip_grad_norm_ spread the NaN to every gradient before the capsule was taken (its first bad
    step, after clean ones, reads nothing extra), so the replay is held to the parameters the capsule names as
    non-finite at backward, and a different set is a difference."""
    _, run = one_off
    replayer = str(Path(__file__).parent / "once_nan_replayer.py") + ":replay"
    capsys.readouterr()
    assert cli.main(["bisect", str(run), "--replayer", replayer, "--json"]) == cli.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["bit_exact"] is True and out["replay"]["differences"] == []
    cap = Capsule.load(next((run / "capsules").glob("step_*.pt")))
    assert cap.meta["grads_at"] == "optimizer.step"
    assert sorted(cap.meta["born_nonfinite"]) == sorted(out["replay"]["bad_parameters"]) != []
    from ris_stability.replay.bisect import ReplayOutcome
    wrong = ReplayOutcome(step=7, loss=1.0, grads_finite=False, bad_parameters=["a"], recorded_loss=1.0,
                          recorded_grads_finite=False, recorded_born_nonfinite=["a", "b"])
    assert wrong.differences == ["non-finite gradients in ['a'] vs recorded at backward in ['a', 'b']"]
    assert (out["finding"]["node"], out["finding"]["module"]) == ("SqrtBackward0", "model.scale")
