"""Data-parallel runs (2 ranks, gloo, CPU): collective skip decisions, the originating rank, rank shards,
a rank that dies. Each rank is a subprocess of tests/ris_stability/scripts/ddp_worker.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ris_stability.monitor import distributed
from ris_stability.replay.bisect import bisect_capsule
from ris_stability.records.capsule import Capsule
from ris_stability.report.ranks import ranks_blocks
from ris_stability.numerics.tolerances import eps_of

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "scripts" / "ddp_worker.py"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, mode: str, steps: int = 6) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(run_dir), mode, str(steps)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def read_events(shard: Path) -> list[dict]:
    return [json.loads(line) for line in (shard / "events.jsonl").read_text().splitlines()]


def _result(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / f"result{rank}.json").read_text())


def test_shard_dirs_layout(tmp_path):
    (tmp_path / "rank1").mkdir()
    (tmp_path / "rank12").mkdir()
    (tmp_path / "rankx").mkdir()
    assert distributed.shard_dirs(tmp_path) == {0: tmp_path, 1: tmp_path / "rank1", 12: tmp_path / "rank12"}
    assert distributed.shard_dir(tmp_path, 0) == tmp_path and distributed.shard_dir(tmp_path, 3) == tmp_path / "rank3"


def test_bucket_view_gradients_are_not_captured_as_local():
    """With gradient_as_bucket_view=True DDP averages .grad in place while backward runs: the monitor must
    not store those as the rank's local gradients (a one-rank group is enough to build the wrapper)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        views = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), gradient_as_bucket_view=True)
        assert not distributed.grads_are_bucket_views(plain) and distributed.grads_are_bucket_views(views)
        assert distributed.grads_are_bucket_views(torch.nn.ModuleList([plain, views]))
    finally:
        dist.destroy_process_group()
    assert not distributed.active()


@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad-copied-to-bucket", "grad-is-bucket-view"])
def test_locator_follows_a_nan_through_the_ddp_gradient_bucket(bucket_view):
    """DDP copies each gradient into a slice of a flat bucket, all-reduces the bucket and copies it back: the
    armed locator must name the op that made the NaN (the sqrt backward at a zero row), not the all-reduce
    that found it already in the bucket (a one-rank group runs the same reducer)."""
    import torch.distributed as dist
    from torch import nn

    from ris_stability.locate.armed import ArmedLocator

    class RowNorm(nn.Module):
        def forward(self, h):
            return h / (torch.sqrt((h * h).sum(-1, keepdim=True)) + 1.0)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 8, bias=False), RowNorm(),
                                                                  nn.Linear(8, 1)), gradient_as_bucket_view=bucket_view)
        x = torch.randn(16, 8)
        x[3] = 0.0
        armed = ArmedLocator({"model": model}).__enter__()
        try:
            loss = model(x).square().mean()
            armed.backward_started()
            loss.backward()
            finding = armed.finish(loss, model.parameters())
        finally:
            armed.close()
    finally:
        dist.destroy_process_group()
    assert torch.isnan(model.module[0].weight.grad).any()
    assert (finding.phase, finding.node, finding.module) == ("backward", "SqrtBackward0", "model.module.1")
    assert "sqrt" in finding.cause


def test_single_process_is_inert():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1


def test_fault_on_rank1_is_attributed_to_rank1_and_both_ranks_skip(tmp_path):
    procs = _launch(tmp_path, "fault")
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    r0, r1 = _result(tmp_path, 0), _result(tmp_path, 1)
    assert r0["skipped"] == r1["skipped"] == [2, 3]
    assert r0["stepped"] == r1["stepped"] == [0, 1, 4, 5]
    assert r0["params"] == r1["params"]  # no rank stepped alone: the replicas stay identical
    for shard in (tmp_path, tmp_path / "rank1"):
        bad = [e for e in read_events(shard) if e["kind"].startswith("nonfinite")]
        assert [e["step"] for e in bad] == [2, 3]
        assert all(e["data"]["origin_ranks"] == [1] for e in bad)
        assert "originating rank(s) [1]" in bad[0]["message"]
    assert r0["capsules"] == [] and len(r1["capsules"]) == 2  # written from the originating rank only
    cap = Capsule.load(r1["capsules"][0])
    assert cap.meta["rank"] == 1 and cap.meta["origin_ranks"] == [1] and not cap.meta["grads_finite"]
    assert torch.isnan(cap.batch["batch"]["x"]).any()  # the local batch that produced it
    rows = [json.loads(line) for line in (tmp_path / "rank1" / "steps.jsonl").read_text().splitlines()]
    local = {r["step"]: r["local/nonfinite"] for r in rows}
    assert local[2] == 1.0 and local[0] == 0.0
    rows0 = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert {r["step"]: r["local/nonfinite"] for r in rows0}[2] == 0.0  # rank 0's own data was clean
    report = "\n".join(ranks_blocks(tmp_path))  # rank 0's report reads every shard
    assert "| 2 | 1 |" in report and "| 3 | 1 |" in report and "| 1 | 6 | 2 [2, 3] |" in report


def test_a_rank_whose_loss_alone_is_nonfinite_makes_every_rank_skip(tmp_path):
    """Rank 1's loss is NaN at step 2 while every gradient stays finite: the all-reduced gradients are clean,
    so only the collective decision (not rank 0's own verdict) can make rank 0 skip with it."""
    procs = _launch(tmp_path, "lossnan", steps=4)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    r0, r1 = _result(tmp_path, 0), _result(tmp_path, 1)
    assert r0["skipped"] == r1["skipped"] == [2] and r0["stepped"] == r1["stepped"] == [0, 1, 3]
    assert r0["params"] == r1["params"]
    bad = [e for e in read_events(tmp_path) if e["kind"].startswith("nonfinite")]
    assert [e["step"] for e in bad] == [2] and bad[0]["data"]["origin_ranks"] == [1]
    assert bad[0]["data"]["local_finite"] is True


def test_origin_capsule_holds_local_gradients_and_bisect_replays_them_bit_exact(tmp_path):
    """Rank 1's step 2 has a finite loss and a NaN in one bias gradient only; its other local gradients are
    finite and differ from the all-reduced average. The capsule stores the local ones (captured before DDP
    writes the average back), so a one-process replay of rank 1's batch matches them bit for bit."""
    procs = _launch(tmp_path, "gradnan", steps=4)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    r0, r1 = _result(tmp_path, 0), _result(tmp_path, 1)
    assert r0["skipped"] == r1["skipped"] == [2]
    assert r0["captured"] == [] and r1["captured"] == [2]  # clean steps clone nothing
    assert r0["capsules"] == [] and len(r1["capsules"]) == 1
    cap = Capsule.load(r1["capsules"][0])
    assert cap.meta["local_grads"] and cap.meta["loss"] == cap.meta["loss"]  # finite local loss
    assert torch.isnan(cap.grads["2.bias"]).all() and torch.isfinite(cap.grads["0.weight"]).all()
    result = bisect_capsule(Path(r1["capsules"][0]), replayer=f"{WORKER}:replay")
    assert result.outcome.differences == [] and result.outcome.bit_exact
    assert result.outcome.bad_parameters == ["2.bias"]


def _line_of(path: Path, text: str) -> int:
    """The number of the one line of ``path`` that contains ``text`` (where a host read is expected)."""
    [line] = [i for i, src in enumerate(path.read_text().splitlines(), 1) if text in src]
    return line


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), *args]


def _check_seed_nan_run(run_dir: Path, steps: int) -> None:
    """Both ranks skipped the same steps, the report names the originating rank(s)."""
    skipped = [json.loads((d / "summary.json").read_text())["skipped_steps"] for d in (run_dir, run_dir / "rank1")]
    assert skipped[0] == skipped[1] and skipped[0] and set(skipped[0]) <= set(range(steps))
    origins = [e["data"]["origin_ranks"] for e in read_events(run_dir) if e["kind"].startswith("nonfinite")]
    assert len(origins) == len(skipped[0]) and all(o and set(o) <= {0, 1} for o in origins)
    report = (run_dir / "report.md").read_text()
    assert "## Ranks (data-parallel)" in report and "originating rank(s)" in report


def test_ris_trace_under_torchrun_one_all_reduce_per_step(tmp_path):
    """The acceptance run (`risdiag trace --config configs/seed-nan.toml --steps 10` on 2 ranks, gloo) through a
    wrapper that counts each rank's dist.all_reduce calls: exit 1, the same skipped steps on both ranks,
    origin ranks in the report, and the monitor's decision is each step's only all-reduce (the loop's own
    finite check stays local)."""
    steps = 10
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = _torchrun(str(WORKER.parent / "count_collectives.py"), str(tmp_path / "counts"), "ris_stability.cli", "trace",
                    "--config", str(ROOT / "configs" / "seed-nan.toml"), "--steps", str(steps), "--set", "data.n_val=8",
                    "--no-live", "--out", str(tmp_path / "run"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    _check_seed_nan_run(tmp_path / "run", steps)
    for r in (0, 1):
        assert json.loads((tmp_path / "counts" / f"collectives{r}.json").read_text()) == {"all_reduce": steps}


def test_traced_script_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m ris_stability.cli trace --out DIR -- python ddp_rows.py`: an outside-style
    script that joins its gloo group and wraps its model in DDP itself, a gradient-only fault on rank 1 at
    steps 0 and 2 (step 0 runs before the monitor attaches at the first optimizer step). Both ranks skip
    those steps (replicas stay identical), rank 1 is named as the origin of both and writes the capsules with
    its local gradients, rank 0 writes the report from both shards, one all-reduce per step, exit 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = _torchrun(str(WORKER.parent / "count_collectives.py"), str(tmp_path), "ris_stability.cli", "trace",
                    "--no-live", "--out", str(run_dir), "--", "python", str(WORKER.parent / "ddp_rows.py"),
                    "--steps", "6", "--fault-steps", "0", "2", "--params", str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for shard in (run_dir, run_dir / "rank1"):
        assert (shard / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert json.loads((shard / "summary.json").read_text())["skipped_steps"] == [0, 2]
        bad = [e for e in read_events(shard) if e["kind"].startswith("nonfinite")]
        assert [(e["step"], e["data"]["origin_ranks"]) for e in bad] == [(0, [1]), (2, [1])]
    assert not (run_dir / "capsules").exists()
    caps = [Capsule.load(p) for p in sorted((run_dir / "rank1" / "capsules").glob("*.pt"))]
    assert [c.step for c in caps] == [0, 2]
    for cap in caps:  # the local gradients, under the model's own names; NaN where the zero row's sqrt was
        assert cap.meta["local_grads"] and sorted(cap.grads) == ["head.bias", "head.weight", "proj.weight"]
        assert torch.isnan(cap.grads["proj.weight"]).any() and torch.isfinite(cap.grads["head.bias"]).all()
    params = [json.loads((tmp_path / f"params{r}.json").read_text()) for r in (0, 1)]
    assert params[0] == params[1]
    assert (run_dir / "report.md").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    assert "## Ranks (data-parallel)" in report and "originating rank(s) [1]" in report
    # The finding is rank 1's, where the sqrt backward made the NaN (not the all-reduce that carried it);
    # rank 0 only received it and says where the finding is.
    assert not (run_dir / "finding.json").exists()
    finding = json.loads((run_dir / "rank1" / "finding.json").read_text())
    # named as the events name parameters: without DDP's "module." wrapper segment
    assert (finding["node"], finding["module"]) == ("SqrtBackward0", "model.norm")
    lines = (WORKER.parent / "ddp_rows.py").read_text().splitlines()
    fault_line = next(i for i, line in enumerate(lines, 1) if "FAULT: sqrt" in line)
    assert finding["location"] == f"tests/ris_stability/scripts/ddp_rows.py:{fault_line}"
    assert [e["data"]["origin_ranks"] for e in read_events(run_dir) if e["kind"] == "finding_elsewhere"] == [[1]]
    assert "## Finding (in-process locator), rank 1" in report and "`SqrtBackward0`" in report
    assert "`rank1/capsules/step_000000.pt`" in report
    assert "finding (rank 1)" in proc.stdout and "SqrtBackward0 in" in proc.stdout
    assert (run_dir / distributed.RANK0_DONE).exists()
    for r in (0, 1):
        assert json.loads((tmp_path / f"collectives{r}.json").read_text()) == {"all_reduce": 6}


def test_a_rank_aborting_at_exit_does_not_cost_the_report(tmp_path):
    """torchrun stops every rank as soon as one exits with an error. Rank 1 aborts when its interpreter exits
    (as gloo's teardown sometimes does): it first waits for rank 0's done mark, so the report is complete."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = _torchrun("-m", "ris_stability.cli", "trace", "--no-live", "--out", str(tmp_path), "--", "python",
                    str(WORKER.parent / "ddp_rows.py"), "--steps", "3", "--fault-steps", "1", "--abort-at-exit")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (tmp_path / "report.md").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## Ranks (data-parallel)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / distributed.RANK0_DONE).exists()


def test_watch_in_ones_own_ddp_script(tmp_path):
    """`with ris_stability.watch(model, optimizer, out=DIR):` around a DDP loop launched by torchrun: per-rank
    shards, both ranks skip the faulty steps, rank 0 alone writes the report once rank 1's shard is closed,
    and it names rank 1's finding. Rank 1 aborts at exit: the report is complete all the same."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = _torchrun(str(WORKER.parent / "ddp_rows.py"), "--steps", "4", "--fault-steps", "1", "2", "--watch",
                    str(run_dir), "--abort-at-exit")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 1's abort
    for shard in (run_dir, run_dir / "rank1"):
        assert json.loads((shard / "summary.json").read_text())["skipped_steps"] == [1, 2]
    assert not (run_dir / "rank1" / "report.md").exists()
    report = (run_dir / "report.md").read_text()
    assert "## Ranks (data-parallel)" in report and "## Finding (in-process locator), rank 1" in report
    assert "`SqrtBackward0`" in report and "`rank1/capsules/step_000001.pt`" in report


def test_traced_script_under_torchrun_without_a_process_group(tmp_path):
    """torchrun starts 2 processes of a script that joins no group (no DDP): each rank trains alone. Each
    writes its own shard (rank 1: rank1/), says so in a `no_process_group` event, keeps its own verdict
    (rank 1 skipped its faulty steps and exits 1, rank 0 is clean) and rank 0's report covers both."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = _torchrun("-m", "ris_stability.cli", "trace", "--no-live", "--out", str(run_dir), "--", "python",
                    str(WORKER.parent / "ddp_rows.py"), "--steps", "4", "--fault-steps", "1", "2", "--no-group")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 1's own non-finite verdict
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run_dir, run_dir / "rank1")]
    assert [(s["status"], s["skipped_steps"]) for s in summaries] == [("clean", []), ("nonfinite", [1, 2])]
    for r, shard in ((0, run_dir), (1, run_dir / "rank1")):
        [event] = [e for e in read_events(shard) if e["kind"] == "no_process_group"]
        assert f"rank {r} of 2" in event["message"] and "trains alone" in event["message"]
    report = (run_dir / "report.md").read_text()
    assert "joined no process group" in report and "## Finding (in-process locator), rank 1" in report
    assert "rank 1" in proc.stdout and "nonfinite, 4 steps, non-finite 2: 1, 2" in proc.stdout


def test_a_peer_that_dies_while_rank0_writes_its_run_leaves_the_report(tmp_path):
    """Rank 1 aborts once rank 0 has written its summary (rank 0 is waiting for rank 1's shard): torchrun then
    sends rank 0 SIGTERM. That signal asks for what rank 0 is already doing, so it finishes its run without
    waiting for the dead peer: summary.json stays, report.md is written and shows rank 1's shard as open."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = _torchrun("-m", "ris_stability.cli", "trace", "--no-live", "--out", str(run_dir), "--", "python",
                    str(WORKER.parent / "ddp_rows.py"), "--steps", "3", "--fault-steps",
                    "--abort-once", str(run_dir / "summary.json"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0 and "SIGABRT" in proc.stderr, output
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "clean", output
    assert "SIGTERM received while the run is being written" in proc.stderr, output
    report = (run_dir / "report.md").read_text()
    assert "## Ranks (data-parallel)" in report and "incomplete (no summary.json)" in report, report
    assert not (run_dir / "rank1" / "summary.json").exists()


@pytest.mark.slow
def test_acceptance_seed_nan_10_steps_two_ranks(tmp_path):
    """The acceptance command as documented: torchrun, 2 processes, gloo, seed-nan for 10 steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = _torchrun("-m", "ris_stability.cli", "trace", "--config", str(ROOT / "configs" / "seed-nan.toml"),
                    "--steps", "10", "--no-live", "--out", str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    _check_seed_nan_run(tmp_path, 10)
    capsule = sorted((tmp_path / "rank1" / "capsules").glob("step_*.pt"))[0]  # rank 1 is an origin of every step
    outcome = bisect_capsule(capsule).outcome  # one process, rank 1's batch, its local gradients as reference
    assert outcome.nonfinite and outcome.bit_exact, outcome.differences


@pytest.mark.slow
def test_monitor_changes_nothing_under_ddp_and_each_form_reduces_once_per_step(tmp_path):
    """2 ranks, quickstart, 3 steps: `python -m ris_model train` (its own finite check, one all-reduce per step)
    and `risdiag trace --config` (the monitor's decision instead, one all-reduce per step) end with the same
    weights bit for bit."""
    from ris_model.checkpoint import load_checkpoint

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--config", str(ROOT / "configs" / "quickstart.toml"), "--steps", "3", "--set", "data.n_val=8",
              "--set", "train.val_every=0"]
    runs = {"off": ["ris_model", "train", *common], "on": ["ris_stability.cli", "trace", *common, "--no-live",
                                                           "--no-report"]}
    for name, argv in runs.items():
        cmd = _torchrun(str(WORKER.parent / "count_collectives.py"), str(tmp_path / name / "counts"), *argv,
                        "--out", str(tmp_path / name / "run"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in (0, 1):
            assert json.loads((tmp_path / name / "counts" / f"collectives{r}.json").read_text()) == {"all_reduce": 3}
    off, on = (load_checkpoint(tmp_path / n / "run" / "checkpoints" / "last.pt").model for n in ("off", "on"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


def test_host_reads_per_step_under_ddp(tmp_path):
    """Each rank reads once when backward ends (whether its local gradients, before DDP averages them, must be
    kept for an origin capsule), once at the step's check (verdict, loss and collective decision, after the one
    all-reduce) and at its end only when its row still has device values (step 0's update ratios): no row lost."""
    procs = _launch(tmp_path, "reads", steps=4)
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-2000:]
    one_read = _line_of(ROOT / "ris_stability" / "monitor" / "readback.py", "# the one host read")
    decision = _line_of(ROOT / "ris_stability" / "monitor" / "distributed.py", "not bool(torch.isfinite(self._sq))")
    for rank in (0, 1):
        result = _result(tmp_path, rank)
        assert [result["reads"].get(str(s), 0) for s in range(4)] == [3, 2, 2, 2], result["read_where"]
        local, read = f"__bool__@monitor/distributed.py:{decision}", f"tolist@monitor/readback.py:{one_read}"
        where = result["read_where"]
        assert sorted(where["0"]) == [local, read, read] and sorted(where["2"]) == [local, read]
        assert result["reads"].get("setup", 0) == 0
        assert [result["copies"].get(str(s), 0) for s in range(1, 4)] == [0, 0, 0]  # no host-to-device copy after step 0


def test_dead_rank_stops_the_others_with_a_clear_message(tmp_path):
    procs = _launch(tmp_path, "die")
    assert procs[1].returncode == 3 and procs[0].returncode == 1, procs[0].stderr[-2000:]
    r0 = _result(tmp_path, 0)
    assert r0["stepped"] == [0, 1, 2] and r0["status"].startswith("stopped")
    stop = [e for e in read_events(tmp_path) if e["kind"] == "run_stopped"]
    assert stop and stop[0]["data"].get("rank_lost") and "another rank stopped or died" in stop[0]["message"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "rank_lost"
    for shard in (tmp_path, tmp_path / "rank1"):  # flushed line by line: rank 1's shard holds steps 0..2
        steps = [json.loads(line)["step"] for line in (shard / "steps.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_at_the_same_global_batch():
    """benchmarks/ddp_loss_match.py on quickstart: at step 0 the 2-rank loss (mean of the ranks' equal-share
    losses) and the averaged gradient's norm equal the 1-process ones to float32 reduction-order tolerance (a
    wrong share, a sum instead of an average, or other samples would be off by percents); over the steps the
    curves stay within the run-to-run noise of another train.seed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_loss_match.py"), "--steps", "5", "--seeds",
                           "0", "1", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = 64 * eps_of(torch.float32)
    assert r["first_rel_diff"] <= tol and r["first_grad_norm_rel_diff"] <= tol, r
    assert r["max_rel_diff"] < r["seed_max_rel_diff"][0], r
