"""Step-start RNG snapshots: Python's random state copied only while it has to be, and capsules whose RNG is
the state their step started from (exactly, or said not to be)."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records.capsule import Capsule
from ris_stability.records.step_rng import StepRng


def python_state(capsule: Capsule) -> tuple:
    internal = capsule.rng["python"]["internal"]
    return capsule.rng["python"]["version"], tuple(int(x) for x in internal.tolist()), capsule.rng["python"]["gauss"]


def test_still_random_is_copied_only_at_first_and_on_checks():
    rng = StepRng(still_steps=2)
    for _ in range(10):
        rng.start()
    assert rng.copies == 3 and not rng.moves  # the first copy, then two steps that found it still
    rng.start(check=True)
    assert rng.copies == 4
    snapshot, exact = rng.verified()
    assert exact and snapshot[1] == random.getstate() and rng.copies == 4  # copied at this start: no check


def test_a_reused_copy_is_verified_when_used():
    rng = StepRng(still_steps=1)
    rng.start(), rng.start(), rng.start()
    copies = rng.copies
    snapshot, exact = rng.verified()
    assert exact and snapshot[1] == random.getstate() and rng.copies == copies + 1
    assert rng.verified() == (snapshot, True) and rng.copies == copies + 1  # verified once per step


def test_three_still_steps_by_default():
    rng = StepRng()
    for _ in range(10):
        rng.start()
    assert rng.copies == 4 and not rng.moves


def test_random_drawn_between_steps_is_copied_every_step_once_seen():
    rng = StepRng(still_steps=1)
    starts = []
    for step in range(6):
        starts.append(random.getstate())
        rng.start()
        assert rng.snapshot[1] == starts[-1]
        random.random()  # a script drawing from random in each step
    assert rng.moves and rng.copies == 6


def test_a_move_between_checks_gives_the_live_state_and_says_so():
    rng = StepRng(still_steps=1)
    rng.start(), rng.start(), rng.start()
    random.shuffle(list(range(5)))  # an epoch boundary between two checks
    torch_state = torch.get_rng_state()
    rng.start()  # reuses the copy
    live = random.getstate()
    snapshot, exact = rng.verified()
    assert not exact and snapshot[1] == live and rng.moves
    assert torch.equal(snapshot[0], torch_state)  # torch's state as taken at the start
    assert rng.verified() == (snapshot, False)  # the same answer for the rest of the step
    copies = rng.copies
    rng.start()
    assert rng.copies == copies + 1  # copied at every step from now on


def test_bad_setting_and_use_before_start_are_clear():
    with pytest.raises(ValueError, match="still_steps=0"):
        StepRng(still_steps=0)
    with pytest.raises(RuntimeError, match=r"^StepRng\.verified\(\) before any start"):
        StepRng().verified()


def train_step(session: MonitorSession, model: nn.Module, opt: torch.optim.Optimizer, step: int,
               x: torch.Tensor) -> None:
    """One step of a loop that gates its own update on the monitor's verdict."""
    opt.zero_grad(set_to_none=True)
    session.start_step(step, batch={"x": x})
    loss = model(x)
    session.after_forward(loss)
    loss.backward()
    if session.after_backward():
        opt.step()
    session.end_step()


class Dropper(nn.Module):
    """Research-style layer drop drawn from Python's random, and a NaN on the step the test names."""

    def __init__(self, bad_step: int, draws: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)
        self.bad_step, self.draws, self.step = bad_step, draws, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.draws and random.random() < 0.5:
            h = h * 0.5
        out = self.b(h).pow(2).mean()
        return out * float("nan") if self.step == self.bad_step else out


@pytest.mark.parametrize("draws", [True, False])
@pytest.mark.parametrize("shuffle_at", [None, 5])
def test_capsule_holds_the_random_state_its_step_started_from(tmp_path, draws, shuffle_at):
    torch.manual_seed(0)
    random.seed(1)
    model = Dropper(bad_step=7, draws=draws)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(every=10, policy="skip"))
    at_start = {}
    with MonitorSession(monitor, model, opt) as s:
        for step in range(9):
            if step == shuffle_at:
                random.shuffle(list(range(10)))  # between steps, like an epoch's shuffle
            model.step = step
            at_start[step] = random.getstate()
            train_step(s, model, opt, step, x)
    capsule = Capsule.load(tmp_path / "run" / "capsules" / "step_000007.pt")
    assert python_state(capsule) == at_start[7]
    assert ("cuda" in capsule.rng) == torch.cuda.is_initialized()  # CUDA states only where CUDA is in use
    # Drawing in every step is seen at step 1 and copied from then on; a shuffle between checks is seen when the
    # capsule is written, and the capsule says its state was taken then (exact here: the step drew nothing).
    said = capsule.meta.get("python_rng")
    assert said == ("at capsule" if shuffle_at is not None and not draws else None)
    assert monitor._rng.moves == (draws or shuffle_at is not None)


class RowDrop(nn.Module):
    """A layer drop drawn from Python's random in forward; an all-zero input row makes the sqrt backward NaN in
    ``lin``'s gradient while ``head``'s stays finite and depends on the draw."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4, bias=False), nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if random.random() < 0.5:
            h = h * 0.5
        return self.head(torch.sqrt((h ** 2).sum(-1, keepdim=True))).mean()


def replayer(capsule: Capsule, dtype: str | None):
    from types import SimpleNamespace

    from ris_stability.records.capsule import restore_rng
    model = RowDrop()
    model.load_state_dict(capsule.model_state)
    restore_rng(capsule.rng)
    x = capsule.batch["batch"]["x"]  # a MonitorSession capsule keeps the batch it was given under "batch"
    return SimpleNamespace(model=model, roots={"model": model}, loss=lambda: model(x))


def test_a_step_drawing_from_random_replays_bit_exact(tmp_path):
    from ris_stability.replay.bisect import replay

    torch.manual_seed(0)
    random.seed(3)
    model = RowDrop()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(every=10))
    with MonitorSession(monitor, model, opt) as s:
        for step in range(9):
            x = torch.randn(5, 3)
            if step == 7:
                x[2] = 0.0
            train_step(s, model, opt, step, x)
    capsule = Capsule.load(tmp_path / "run" / "capsules" / "step_000007.pt")
    capsule.meta["replayer"] = f"{__name__}:replayer"
    assert replay(capsule).bit_exact
    # The same step from a Python state whose first draw falls the other way is not: the check can tell.
    random.setstate(python_state(capsule))
    first = random.random() < 0.5
    while True:
        other = random.getstate()
        if (random.random() < 0.5) != first:
            break
    capsule.rng["python"]["internal"] = torch.tensor(other[1], dtype=torch.int64)
    assert not replay(capsule).bit_exact
