"""Where the NaN is born: outside-style scripts that act between backward and optimizer.step (sanitise, clip,
gate their own step, run their own anomaly mode, configure their own logging), traced with zero glue."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ris_stability.cli import main
from ris_stability.records.capsule import Capsule

SCRIPTS = Path(__file__).parent / "scripts"
HIDES = SCRIPTS / "svd_hides_nan.py"
SVD_LINE = next(i for i, line in enumerate(HIDES.read_text().splitlines(), 1) if "torch.linalg.svd(cov)" in line)


def _trace(tmp_path: Path, script: Path, *args: str, report: bool = False) -> int:
    return main(["trace", "--no-live", *([] if report else ["--no-report"]), "--out", str(tmp_path), "--",
                 "python", str(script), *args])


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["kind"] == kind]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]


def test_nan_hidden_by_the_script_is_a_nonfinite_step_located_at_the_svd(tmp_path):
    """(a) nan_to_num on every .grad, clipping, its own step gate: every step is non-finite at birth."""
    assert _trace(tmp_path, HIDES, "--steps", "6") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["nonfinite_steps"] == list(range(6))
    bad = _events(tmp_path, "nonfinite_grad")
    assert bad and "replaced by the script before optimizer.step" in bad[0]["message"]
    assert bad[0]["data"]["replaced_by_script"] and "embed.weight" in bad[0]["data"]["nonfinite_parameters"]
    finding = json.loads((tmp_path / "finding.json").read_text())
    assert finding["phase"] == "backward" and finding["node"] == "LinalgSvdBackward0"
    assert finding["module"] == "model.sub" and finding["location"].endswith(f"svd_hides_nan.py:{SVD_LINE}")
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(6)) and all(r["skipped"] for r in rows)
    cap = Capsule.load(next((tmp_path / "capsules").iterdir()))
    assert not all(bool(torch.isfinite(g).all()) for g in cap.grads.values())  # the gradients as born


def test_one_gated_batch_is_a_trace_not_a_usage_error(tmp_path):
    assert _trace(tmp_path, HIDES, "--steps", "1") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps"] == [0]


def test_the_scripts_own_anomaly_mode_becomes_a_finding_and_a_report(tmp_path, capsys):
    """(b) set_detect_anomaly(True) raises inside backward: the run is crashed, yet it has its finding (the node,
    module and forward line that anomaly mode recorded), a report, and the user's traceback without ours."""
    assert _trace(tmp_path, HIDES, "--steps", "3", "--anomaly", report=True) == 4
    err = capsys.readouterr().err
    shown = err.split("Traceback (most recent call last)", 1)[1].split("risdiag trace:")[0]
    assert "returned nan values" in shown and "ris_stability/attach" not in shown and "svd_hides_nan.py" in shown
    finding = json.loads((tmp_path / "finding.json").read_text())
    assert finding["node"] == "LinalgSvdBackward0" and finding["module"] == "model.sub"
    assert finding["location"].endswith(f"svd_hides_nan.py:{SVD_LINE}") and "anomaly mode" in finding["message"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "crashed"
    report = (tmp_path / "report.md").read_text()
    assert "LinalgSvdBackward0" in report


@pytest.mark.parametrize(("args", "skipped"), [
    (["--skip", "2"], [2]),
    (["--skip", "0", "3", "5"], [0, 3, 5]),
    (["--skip", "--accumulate", "3"], []),
], ids=["one-gated", "first-and-last-gated", "accumulation"])
def test_steps_as_the_script_means_them(tmp_path, args, skipped):
    """A step the script's own gate skips is a skipped step, not merged into the next; accumulation (several
    backward calls, zero_grad only after a step) stays one step."""
    assert _trace(tmp_path, SCRIPTS / "gated_steps.py", "--steps", "6", *args) == 0
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["step"] for r in rows if r["skipped"]] == skipped
    if "--accumulate" in args:
        assert all(r.get("micro_batches") == 3 for r in rows)
    events = _events(tmp_path, "step_skipped")
    assert [e["step"] for e in events] == skipped and all("skipped optimizer.step" in e["message"] for e in events)


def test_the_scripts_logging_basicconfig_still_works(tmp_path):
    """(f) the toolkit logs through its own handler: the script's basicConfig(filename=...) writes its file."""
    script = tmp_path / "logs.py"
    script.write_text(
        "import logging, sys, torch\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO, format='%(message)s')\n"
        "m = torch.nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for step in range(3):\n"
        "    opt.zero_grad(); loss = m(torch.randn(4, 3)).pow(2).mean(); loss.backward(); opt.step()\n"
        "    logging.getLogger('mine').info('step %d', step)\n")
    log_file = tmp_path / "mine.log"
    done = subprocess.run([sys.executable, "-m", "ris_stability.cli", "trace", "--no-live", "--no-report", "--out",
                           str(tmp_path / "run"), "--", "python", str(script), str(log_file)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "following optimizer" in done.stderr  # the toolkit's own lines still reach the terminal
    assert log_file.read_text().splitlines() == ["step 0", "step 1", "step 2"]


def test_watch_sees_the_nan_a_loop_hides(tmp_path):
    """The same check at birth under ``watch``: the loop zeroes its NaN gradients and steps anyway (observe
    policy so that nothing is hidden from it); the trace still says every step was non-finite at backward."""
    from ris_stability import watch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, out=tmp_path, report=False, on_nonfinite="observe") as w:
        for _ in range(3):
            opt.zero_grad()
            w_sum = model.weight.sum()
            loss = model(torch.randn(8, 4)).pow(2).mean() + torch.sqrt(w_sum - w_sum)  # sqrt'(0) = inf
            loss.backward()
            for p in model.parameters():
                p.grad.nan_to_num_(nan=0.0)
            opt.step()
    assert w.nonfinite_steps == [0, 1, 2]
    assert all(e["data"].get("replaced_by_script") for e in _events(tmp_path, "nonfinite_grad"))


def test_report_of_a_run_that_recorded_no_step(tmp_path):
    """`risdiag report` works on any run folder with a run_start: a run that stopped before its first step gets
    a report of what ran, how it ended and its events (a folder without even a run_start is still refused)."""
    assert _trace(tmp_path, SCRIPTS / "never_steps.py") == 2
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "No step was recorded" in report and "no_steps" in report and "run_start" in report


def test_a_fault_after_clean_steps_in_a_rewriting_script(tmp_path, capsys):
    """A script that rewrites its gradients (nan_to_num_, clipping) reads nothing extra on its clean steps. Its
    first bad step's capsule names the parameters non-finite at backward and keeps the gradients as the script
    left them (said in its meta; `risdiag locate` replays them bit for bit); while the fault lasts the check
    at backward keeps the gradients as born, so the next capsule holds them."""
    assert _trace(tmp_path, HIDES, "--steps", "6", "--clean-until", "3") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite_steps"] == [3, 4, 5]
    caps = {c.step: c for c in map(Capsule.load, sorted((tmp_path / "capsules").glob("step_*.pt")))}
    first, next_ = caps[3], caps[4]
    assert first.meta["grads_at"] == "optimizer.step" and "embed.weight" in first.meta["born_nonfinite"]
    assert all(bool(torch.isfinite(g).all()) for g in first.grads.values())  # after the script's nan_to_num_
    assert "grads_at" not in next_.meta
    assert not bool(torch.isfinite(next_.grads["embed.weight"]).all())  # as born
    assert main(["locate", str(tmp_path), "--no-report"]) == 0
    finding = json.loads((tmp_path / "finding.json").read_text())
    assert finding["step"] == 3 and finding["node"] == "LinalgSvdBackward0"
    assert finding["rerun"]["params_match"] is True and finding["rerun"]["grads_bit_exact"] is True


def test_a_huge_finite_gradient_is_not_a_nonfinite_step(tmp_path):
    """On CPU the checks screen the gradients with float32 norms (a max-magnitude reduction is ~5x slower there);
    a gradient whose every element is finite but whose norm overflows float32 (2e25 per element) is confirmed on
    its exact peaks: a finite step, not skipped, at the check at backward and at optimizer.step alike."""
    from ris_stability import watch
    from ris_stability.numerics.norms import finite_screen

    huge = torch.full((4,), 2e25)
    assert not bool(finite_screen([huge]).isfinite().all())  # the screen alone would raise the alarm
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, opt, out=tmp_path, report=False, on_nonfinite="skip", every=2) as w:  # step 1 not sampled
        for step in range(3):
            opt.zero_grad()
            (model(torch.ones(2, 4)) * (1e25 if step == 1 else 1.0)).sum().backward()
            assert step != 1 or torch.isfinite(model.weight.grad).all() and model.weight.grad.abs().min() > 1e25
            opt.step()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite_steps"] == [] and summary["skipped_steps"] == [] and w.nonfinite_steps == []
    assert finite_screen([torch.tensor([1.0, float("nan")]), torch.ones(3)]).isnan().tolist() == [True, False]
