"""A reader that survives damage (issue #30): Hypothesis damages a run folder (a cut at a random offset,
garbage bytes, duplicated lines, values of the wrong type, an enormous line, a damaged or missing JSON file)
and feeds it to `risdiag report` and `risdiag compare`: each either writes its output from what is sound
(exit 0) or refuses in one line naming the file (exit 2); never a traceback."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ris_stability import cli
from ris_stability.records import reader
from tests.ris_stability.trace_factory import make_run

FILES = ("steps.jsonl", "events.jsonl", "summary.json", "meta.json")
WRONG = [[1, 2], {"a": 1}, "text", True, None, -3, 1e308]


@st.composite
def damages(draw) -> list[tuple]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "garbage", "duplicate", "wrong-type", "enormous", "delete"]))
        out.append((kind, draw(st.sampled_from(FILES)), draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=40)),
                    draw(st.sampled_from(range(len(WRONG))))))
    return out


def damage(run: Path, kind: str, name: str, where: float, junk: bytes, wrong: int) -> None:
    path = run / name
    if not path.exists():
        return
    data = path.read_bytes()
    at = int(where * len(data))
    if kind == "cut":
        path.write_bytes(data[:at])
    elif kind == "garbage":
        path.write_bytes(data[:at] + junk + data[at:])
    elif kind == "delete":
        path.unlink()
    elif kind == "enormous":
        path.write_bytes(data[:at] + b"\n{\"step\": 1, \"x\": \"" + b"y" * (reader.MAX_LINE_BYTES + 10) + b"\"}\n" + data[at:])
    elif name.endswith(".jsonl"):
        lines = data.decode("utf-8", "replace").splitlines()
        if not lines:
            return
        i = min(int(where * len(lines)), len(lines) - 1)
        if kind == "duplicate":
            lines.insert(i, lines[i])
        else:
            try:
                row = json.loads(lines[i])
            except json.JSONDecodeError:
                return
            if isinstance(row, dict) and row:
                key = sorted(row)[int(where * (len(row) - 1))]
                row[key] = WRONG[wrong]
                lines[i] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")


def _records(path: Path) -> list:
    """The lines of a JSONL file that parse, read independently of the reader under test."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n")
            if line.strip() and len(line) < reader.MAX_LINE_BYTES and _json(line)]


def _meta(run: Path) -> dict | None:
    meta = json.loads((run / "meta.json").read_text())
    return meta if isinstance(meta, dict) else None


def sound(run: Path) -> bool:
    """Whether the folder keeps a sound meta.json and at least one sound step row (told apart independently)."""
    try:
        meta, rows = _meta(run), _records(run / "steps.jsonl")
    except (OSError, ValueError):
        return False
    return meta is not None and meta.get("schema") is not None and any(
        isinstance(r, dict) and type(r.get("step")) is int and r["step"] >= 0 for r in rows)


def started(run: Path) -> bool:
    """Whether the folder keeps a sound meta.json and a sound run_start event (enough for an outline report)."""
    try:
        meta, events = _meta(run), _records(run / "events.jsonl")
    except (OSError, ValueError):
        return False
    return meta is not None and any(isinstance(e, dict) and e.get("kind") == "run_start" for e in events)


def _json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except ValueError:
        return False
    return True


def check(damage_list: list[tuple], capsys) -> None:
    folder = Path(tempfile.mkdtemp(prefix="risdamage-"))
    try:
        good = make_run(folder / "good", n_steps=6, nonfinite_at=(3,))
        bad = make_run(folder / "bad", n_steps=6, nonfinite_at=(3,))
        for d in damage_list:
            damage(bad, *d)
        code = cli.main(["report", str(bad), "--out", str(folder / "report" / "report.md")])
        # what is sound is read; a folder with no sound row but a sound run_start gets an outline report (0) or,
        # when its rows are present but unusable, a one-line refusal (2); a folder with neither is refused
        assert code == 0 if sound(bad) else code in ((0, 2) if started(bad) else (2,))
        code2 = cli.main(["compare", str(good), str(bad), "--out", str(folder / "compare")])
        assert code2 in (0, 2)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err[-3000:]
        for line in err.splitlines():
            if "error:" in line:  # a refusal: one line naming the file or folder
                assert "bad" in line, line
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@settings(deadline=None, max_examples=10, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage_list=damages())
def test_damaged_folders_are_read_or_refused_in_one_line(damage_list, capsys):
    check(damage_list, capsys)


@pytest.mark.slow
@settings(deadline=None, max_examples=150, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage_list=damages())
def test_damaged_folders_are_read_or_refused_in_one_line_long(damage_list, capsys):
    check(damage_list, capsys)
