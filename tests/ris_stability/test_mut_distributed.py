"""Data-parallel pieces in one process: the collective decision of RankWatch (on a one-rank gloo group, a
peer's flag added where the test needs a second rank), the shard layout, and the file-based waits at the end
of a run. Each test checks what a user of a DDP run sees: the verdict, the originating ranks, the waits."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ris_stability.monitor import distributed
from ris_stability.records import shards


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _watched(capture: bool = True, early: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    watch = distributed.RankWatch()
    watch.attach(model, capture=capture, early=early)
    return model, watch


def _step(model, watch, step: int, nan_input: bool = False, nan_loss: bool = False) -> torch.Tensor:
    watch.start_step(step)
    x = torch.ones(4, 3)
    if nan_input:
        x[0, 0] = math.nan
    loss = model(x).pow(2).mean()
    if nan_loss:  # a non-finite loss whose gradients stay finite (the constant has none)
        loss = loss + torch.tensor(math.nan)
    model.zero_grad()
    loss.backward()
    return loss


def test_a_clean_step_is_ok_and_reports_the_local_gradient_norm(group) -> None:
    model, watch = _watched()
    loss = _step(model, watch, 0)
    decision = watch.decide(loss)
    expected = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
    assert decision.ok and decision.origins == [] and decision.local_ok
    assert decision.local_grad_norm == pytest.approx(expected, rel=1e-12)
    assert watch.local_grads is None  # nothing copied on a clean step


def test_a_nonfinite_loss_with_finite_gradients_is_a_bad_step(group) -> None:
    model, watch = _watched()
    loss = _step(model, watch, 4, nan_loss=True)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    decision = watch.decide(loss)
    assert not decision.ok and decision.origins == [0] and not decision.local_ok
    assert math.isfinite(decision.local_grad_norm) and watch.local_grads is None
    assert watch.decide(None).ok  # without the loss, the same gradients are fine


def test_nonfinite_local_gradients_are_captured_before_any_reduction(group) -> None:
    model, watch = _watched()
    loss = _step(model, watch, 2, nan_input=True)
    decision = watch.decide(loss)
    assert not decision.ok and decision.origins == [0] and math.isnan(decision.local_grad_norm)
    assert set(watch.local_grads) == {n for n, _ in model.named_parameters()}
    assert torch.isnan(watch.local_grads["0.weight"]).any()
    assert watch.local_grads["1.bias"] is not model[1].bias.grad  # a copy
    _step(model, watch, 3)  # the next step starts clean
    assert watch.decide(None).ok and watch.local_grads is None


def test_without_capture_nothing_is_copied_and_early_attach_keeps_the_first_backward(group) -> None:
    model, watch = _watched(capture=False)
    _step(model, watch, 0, nan_input=True)
    assert watch.local_grads is None and not watch.decide(None).ok
    model, early = _watched(early=True)
    x = torch.ones(2, 3)
    x[0, 0] = math.nan
    model(x).sum().backward()  # the traced script's first backward, before its step starts
    early.start_step(0)
    assert not early.decide(None).ok and early.local_grads is not None  # kept for step 0
    early.start_step(1)
    assert early.decide(None).ok and early.local_grads is None  # and reset for the next one


def test_a_peer_ranks_bad_step_is_every_ranks_decision(group, monkeypatch) -> None:
    """Rank 0 is clean; the other rank (its flag added by the reduction) had a non-finite loss: rank 0 skips
    too, and names the other rank as the origin."""
    model, watch = _watched()
    watch.world = 2
    real = dist.all_reduce

    def with_peer(flags, op=None, group=None):
        real(flags, op=op, group=group)
        flags[1] += 1.0  # rank 1's flag: its local loss was non-finite

    monkeypatch.setattr(dist, "all_reduce", with_peer)
    loss = _step(model, watch, 5)
    decision = watch.decide(loss)
    assert not decision.ok and decision.origins == [1] and decision.local_ok
    data: dict = {}
    note = distributed.origin_note(watch, decision, data)
    assert note == "; originating rank(s) [1] of 2 (local loss or gradients non-finite before the all-reduce; this is rank 0)"
    assert data == {"origin_ranks": [1], "rank": 0, "world_size": 2, "local_finite": True}


def test_a_failed_collective_is_a_rank_lost_error_naming_rank_and_step(group, monkeypatch) -> None:
    model, watch = _watched()

    def broken(*args, **kwargs):
        raise RuntimeError("Connection closed by peer " + "x" * 300)

    monkeypatch.setattr(dist, "all_reduce", broken)
    _step(model, watch, 7)
    with pytest.raises(distributed.RankLostError) as err:
        watch.decide(None)
    text = str(err.value)
    assert text.startswith("rank 0: the collective call at step 7 failed (RuntimeError: Connection closed by peer x")
    assert "x" * 200 not in text and "no rank steps alone" in text
    assert distributed.is_collective_failure(err.value)


def test_rename_and_detach(group) -> None:
    model, watch = _watched()
    wrapper = torch.nn.ModuleDict({"inner": model})
    _step(model, watch, 0, nan_input=True)
    watch.decide(None)
    watch.rename(wrapper)
    assert set(watch.local_grads) == {"inner.0.weight", "inner.0.bias", "inner.1.weight", "inner.1.bias"}
    watch.detach()
    assert watch.local_grads is None
    x = torch.ones(1, 3)
    x[0, 0] = math.nan
    model(x).sum().backward()  # no hook left: nothing seen
    assert watch.decide(None).ok


def test_origin_note_without_origins_and_outside_ddp() -> None:
    assert distributed.origin_note(None, distributed.Decision(ok=False), {}) == ""
    watch = distributed.RankWatch()
    assert distributed.origin_note(watch, None, {}) == ""
    watch.rank, watch.world = 1, 4
    data: dict = {}
    note = distributed.origin_note(watch, distributed.Decision(ok=True, origins=[], local_ok=True), data)
    assert note.startswith("; no rank's local loss or gradients were non-finite before the all-reduce (this is rank "
                           "1 of 4): the all-reduced gradient itself overflowed")
    assert data["origin_ranks"] == [] and data["local_finite"] is True


def test_collective_failures_are_told_from_other_errors() -> None:
    assert distributed.is_collective_failure(distributed.RankLostError("x"))
    assert not distributed.is_collective_failure(RuntimeError("gloo connection reset"))  # no group: not a peer
    assert not distributed.is_collective_failure(ValueError("nccl"))
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None:
        assert distributed.is_collective_failure(backend_error("peer gone"))


@pytest.mark.parametrize("env, expected", [({}, (0, 1)), ({"WORLD_SIZE": "2", "RANK": "1"}, (1, 2)),
                                           ({"WORLD_SIZE": "1", "RANK": "3"}, (0, 1)),
                                           ({"WORLD_SIZE": "x", "RANK": "1"}, (0, 1)),
                                           ({"WORLD_SIZE": "0"}, (0, 1)),
                                           ({"WORLD_SIZE": "3", "RANK": "y"}, (0, 3))])
def test_process_rank_outside_a_group_is_the_launchers(monkeypatch, env, expected) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.process_rank() == expected
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    distributed.barrier()  # no group: returns at once


def test_no_group_message_says_where_each_ranks_trace_is() -> None:
    assert "started as rank 0 of 2 (WORLD_SIZE)" in distributed.no_group_message(0, 2)
    assert "this rank's trace is the run folder itself" in distributed.no_group_message(0, 2)
    assert "this rank's trace is in rank3/. Call init_process_group" in distributed.no_group_message(3, 4)


# --- the run folder's shards and the waits at the end -----------------------------------------------------
def test_shard_dirs_skip_files_and_names_that_are_not_ranks(tmp_path: Path) -> None:
    (tmp_path / "rank2").mkdir()
    (tmp_path / "rank7").write_text("a file")
    (tmp_path / "rank").mkdir()
    (tmp_path / "rank1a").mkdir()
    (tmp_path / "rank10").mkdir()
    assert list(shards.shard_dirs(tmp_path).items()) == [(0, tmp_path), (2, tmp_path / "rank2"),
                                                         (10, tmp_path / "rank10")]


def _summary(run_dir: Path, r: int, mtime: float | None = None) -> None:
    shard = shards.shard_dir(run_dir, r)
    shard.mkdir(parents=True, exist_ok=True)
    (shard / "summary.json").write_text("{}")
    if mtime is not None:
        os.utime(shard / "summary.json", (mtime, mtime))


def test_wait_for_shards_names_the_ranks_not_closed_since_the_run_started(tmp_path: Path) -> None:
    since = time.time()
    _summary(tmp_path, 1)
    _summary(tmp_path, 2, mtime=since - 5.0)  # an earlier run's summary
    _summary(tmp_path, 3, mtime=since - 0.5)  # coarse filesystem timestamps: within a second counts
    assert shards.wait_for_shards(tmp_path, 5, since, timeout_s=0.0) == [2, 4]
    assert shards.wait_for_shards(tmp_path, 2, since, timeout_s=0.0) == []
    assert shards.wait_for_shards(tmp_path, 1, since, timeout_s=0.0) == []  # rank 0 never waits for itself


def test_wait_for_shards_waits_for_a_late_rank(tmp_path: Path) -> None:
    since = time.time()
    started = threading.Event()

    def late_rank1() -> None:
        started.wait()
        time.sleep(0.3)
        _summary(tmp_path, 1)

    thread = threading.Thread(target=late_rank1)
    thread.start()
    started.set()
    missing = shards.wait_for_shards(tmp_path, 2, since, timeout_s=60.0)
    seen = (tmp_path / "rank1" / "summary.json").is_file()
    thread.join()
    assert missing == [] and seen  # returned only once rank 1's shard was closed


def test_a_stop_request_ends_both_waits_at_once(tmp_path: Path) -> None:
    """stop() true (a termination signal came while the run is being written): the waits return what is still
    missing without waiting for their timeouts."""
    since, asked = time.time(), []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3  # true at the third look: the waits poll it

    assert shards.wait_for_shards(tmp_path, 3, since, timeout_s=60.0, stop=stop) == [1, 2]
    assert len(asked) == 3
    asked.clear()
    assert shards.wait_for_rank0(tmp_path, since, timeout_s=60.0, stop=stop) is False
    assert len(asked) == 3
    _summary(tmp_path, 1)
    _summary(tmp_path, 2)
    assert shards.wait_for_shards(tmp_path, 3, since, timeout_s=60.0, stop=lambda: True) == []


def test_rank0_done_mark_and_the_wait_for_it(tmp_path: Path, caplog) -> None:
    since = time.time()
    assert shards.wait_for_rank0(tmp_path, since, timeout_s=0.0) is False
    shards.mark_rank0_done(tmp_path)
    assert (tmp_path / shards.RANK0_DONE).is_file()
    assert shards.wait_for_rank0(tmp_path, since, timeout_s=0.0) is True
    assert shards.wait_for_rank0(tmp_path, since + 10.0, timeout_s=0.0) is False  # an earlier run's mark
    thread = threading.Timer(0.3, shards.mark_rank0_done, args=(tmp_path / "late",))
    (tmp_path / "late").mkdir()
    thread.start()
    assert shards.wait_for_rank0(tmp_path / "late", time.time(), timeout_s=60.0) is True
    thread.join()
    with caplog.at_level(logging.WARNING, logger="ris_stability.records.shards"):
        shards.mark_rank0_done(tmp_path / "missing" / "folder")
    assert "the other ranks wait for it until their timeout" in caplog.text


def test_peer_failures_are_told_by_their_words_inside_a_group(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "active", lambda: True)
    for words in ("Gloo: read failed", "NCCL error", "Connection closed by peer", "connection RESET", "Timed out"):
        assert distributed.is_collective_failure(RuntimeError(words)), words
    assert not distributed.is_collective_failure(RuntimeError("shape mismatch"))
    assert not distributed.is_collective_failure(ValueError("gloo"))


def test_the_decision_reduces_over_the_watchs_own_group(group, monkeypatch) -> None:
    mine = dist.new_group([0])
    seen: list = []
    real = dist.all_reduce

    def recording(flags, op=None, group=None):
        seen.append((group, flags.dtype, flags.device.type))
        real(flags, op=op, group=group)

    monkeypatch.setattr(dist, "all_reduce", recording)
    watch = distributed.RankWatch(group=mine)
    assert watch.local_grads is None and watch.step is None
    assert watch.decide(None).ok  # nothing attached: nothing seen, a clean step
    assert seen == [(mine, torch.float64, "cpu")]


def test_a_lost_peer_before_the_first_step_names_no_step(group, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("gloo")

    monkeypatch.setattr(dist, "all_reduce", broken)
    with pytest.raises(distributed.RankLostError, match="the collective call at step None failed"):
        distributed.RankWatch().decide(None)


def test_rename_keeps_parameters_outside_the_model_and_later_captures_use_new_names(group) -> None:
    model, watch = _watched()
    other = torch.nn.Linear(1, 1)
    watch.attach(other)  # a second module, not in the wrapper below
    wrapper = torch.nn.ModuleDict({"net": model})
    watch.rename(wrapper)
    _step(model, watch, 0, nan_input=True)
    watch.decide(None)
    assert set(watch.local_grads) == {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"}
    other(torch.tensor([[math.nan]])).sum().backward()
    watch.start_step(1)
    other(torch.tensor([[math.nan]])).sum().backward()
    watch.decide(None)
    assert {"weight", "bias"} <= set(watch.local_grads)  # the outside parameters keep their own names


def test_the_messages_of_a_lost_peer_and_of_a_missing_group_in_full() -> None:
    err = RuntimeError("x" * 250)
    assert distributed.rank_lost_message(2, 9, err) == (
        "rank 2: the collective call at step 9 failed (RuntimeError: " + "x" * 200 + "); another rank stopped or "
        "died, so this rank stops too (no rank steps alone). Its trace shard is flushed; look at the other ranks' "
        "shards (rank<r>/events.jsonl) for the first failure.")
    assert distributed.no_group_message(1, 2) == (
        "started as rank 1 of 2 (WORLD_SIZE), but no torch.distributed process group was joined: every rank trains "
        "alone, with its own non-finite verdicts (no collective skip); this rank's trace is in rank1/. Call "
        "init_process_group (and wrap the model in DDP) for data-parallel training")


def test_a_launcher_without_rank_is_rank_0_and_a_marker_within_a_second_counts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.process_rank() == (0, 2)
    since = float(int(time.time()))  # whole seconds: the marker's time below is exact
    _summary(tmp_path, 1, mtime=since - 1.0)  # exactly one second earlier: still this run's
    _summary(tmp_path, 2, mtime=since - 1.5)
    assert shards.wait_for_shards(tmp_path, 3, since, timeout_s=0.0) == [2]
