"""Capsules written off the training thread (records/capsule_writer.py): the step returns before the file exists,
the run's end waits for it (complete and loadable, its event in the trace), a failed write is one event, the
budget keeps the same capsules as the synchronous path, and the writer runs jobs in order."""
from __future__ import annotations

import errno
import json
import threading

import torch

from ris_stability import watch
from ris_stability.records.capsule import Capsule
from ris_stability.records.capsule_writer import CapsuleWriter
from tests.ris_stability.test_capsule_store import Tiny  # NaN on every step

REAL_SAVE = torch.save


def train(run_dir, steps: int, after_step=None, **options):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, out=run_dir, report=False, **options) as w:
        for step in range(steps):
            loss = model(x=torch.randn(4, 3))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(step)
    return w


def events(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


def test_the_step_returns_before_the_capsule_exists_and_finish_waits_for_it(tmp_path, monkeypatch):
    gate = threading.Event()
    threads = set()

    def slow_save(obj, f, *args, **kwargs):  # the disk is slow: the write waits until the test lets it go
        threads.add(threading.current_thread().name)
        assert gate.wait(timeout=30), "the test never released the writer"
        return REAL_SAVE(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    run_dir = tmp_path / "run"
    capsule = run_dir / "capsules" / "step_000000.pt"
    seen = []

    def after_step(step):
        seen.append(capsule.is_file())
        if step == 1:  # the run's end comes while the writer still waits
            threading.Timer(0.3, gate.set).start()

    w = train(run_dir, 2, after_step)
    assert seen == [False, False]  # the training steps returned while the capsule was still being written
    assert threads and all(name.startswith("risdiag-") for name in threads)  # written on the writer thread
    assert capsule.is_file()  # finish waited for it (checked before anything that reads capsules back)
    assert [e["data"]["path"] for e in events(run_dir, "capsule_written")] == ["capsules/step_000000.pt",
                                                                             "capsules/step_000001.pt"]
    assert [p.name for p in w.monitor.capsules] == ["step_000000.pt", "step_000001.pt"]
    cap = Capsule.load(capsule)
    assert cap.step == 0 and cap.meta["grads_finite"] is False and cap.batch


def test_a_failed_background_write_is_an_event_and_training_goes_on(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run_dir = tmp_path / "run"
    w = train(run_dir, 3)
    assert w.nonfinite_steps == [0, 1, 2]
    failed = events(run_dir, "capsule_not_written")
    assert [e["step"] for e in failed] == [0, 1, 2]
    assert all("No space left on device" in e["message"] and e["severity"] == "warning" for e in failed)
    assert not events(run_dir, "capsule_written") and w.monitor.capsules == []
    assert not list((run_dir / "capsules").glob("**/*.pt")) if (run_dir / "capsules").is_dir() else True


def test_the_budget_holds_with_background_writes(tmp_path, monkeypatch):
    def slow_save(obj, f, *args, **kwargs):  # slower than a step: the queue fills, the writes lag behind
        threading.Event().wait(0.05)
        return REAL_SAVE(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    run_dir = tmp_path / "run"
    w = train(run_dir, 8, max_capsules=3)
    kept = sorted(p.name for p in (run_dir / "capsules").glob("step_*.pt"))
    assert kept == ["step_000000.pt", "step_000006.pt", "step_000007.pt"]
    assert [p.name for p in w.monitor.capsules] == kept
    assert json.loads((run_dir / "summary.json").read_text())["capsules_dropped"] == 5
    assert [e["step"] for e in events(run_dir, "capsule_dropped")] == [1, 2, 3, 4, 5]
    assert len(events(run_dir, "capsule_written")) == 8
    assert len(list((run_dir / "capsules" / "state").glob("*.pt"))) == 2  # skip: one model, one optimizer state
    assert all(Capsule.load(run_dir / "capsules" / name).step == int(name[5:11]) for name in kept)


def test_the_writer_runs_jobs_in_order_and_reports_on_the_calling_thread():
    writer = CapsuleWriter(max_pending=1)
    order, reports = [], []

    def job(i):
        def run():
            order.append((i, threading.current_thread().name))
            if i == 2:
                raise RuntimeError("disk gone")
            return i
        return run

    for i in range(4):
        writer.submit(job(i), lambda result, err: reports.append((result, type(err).__name__ if err else None,
                                                                  threading.current_thread().name)))
    writer.drain()
    assert [i for i, _ in order] == [0, 1, 2, 3] and {name for _, name in order} == {"risdiag-capsules"}
    main = threading.current_thread().name
    assert reports == [(0, None, main), (1, None, main), (None, "RuntimeError", main), (3, None, main)]
    assert writer.pending == 0
    writer.close()

    inline = CapsuleWriter(background=False)  # the old synchronous path: done before submit returns
    got = []
    inline.submit(lambda: 7, lambda result, err: got.append(result))
    assert got == [7]


def test_a_spike_snapshot_is_written_by_the_background_writer(tmp_path, monkeypatch):
    """A finite spike's snapshot takes the same path as a crash capsule: its name is in the spike's message at
    once, the step returns before the file exists, the run's end waits for it; a failed write is an event and
    the snapshot is not listed."""
    gate, threads = threading.Event(), set()

    def slow_save(obj, f, *args, **kwargs):
        threads.add(threading.current_thread().name)
        assert gate.wait(timeout=30), "the test never released the writer"
        return REAL_SAVE(obj, f, *args, **kwargs)

    def spiking(run_dir, after_step=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with watch(model, opt, out=run_dir, report=False) as w:
            for step in range(16):
                x = torch.randn(4, 3) * (30.0 if step == 14 else 1.0)
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
                if after_step is not None:
                    after_step(step)
        return w

    monkeypatch.setattr(torch, "save", slow_save)
    run_dir = tmp_path / "run"
    snapshot, seen = run_dir / "snapshots" / "spike_000014.pt", []

    def after_step(step):
        seen.append(snapshot.is_file())
        if step == 15:
            threading.Timer(0.3, gate.set).start()

    w = spiking(run_dir, after_step)
    (spike,) = events(run_dir, "gradient_spike")
    assert spike["step"] == 14 and "snapshots/spike_000014.pt" in spike["message"]
    assert seen[14:] == [False, False] and threads and all(n.startswith("risdiag-") for n in threads)
    assert snapshot.is_file() and Capsule.load(snapshot).step == 14 and w.monitor.snapshots == [snapshot]
    assert [e["data"]["path"] for e in events(run_dir, "snapshot_written")] == ["snapshots/spike_000014.pt"]

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    w = spiking(tmp_path / "full")
    (failed,) = events(tmp_path / "full", "capsule_not_written")
    assert failed["step"] == 14 and "spike snapshot" in failed["message"] and w.monitor.snapshots == []
