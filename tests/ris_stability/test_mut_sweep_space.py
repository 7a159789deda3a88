"""Search-space files and the metric plumbing of a sweep, by what the user sees: the parameter a trial is
given, the message a bad file gets, the value a script's report reaches the sweep with."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.records import UsageError  # noqa: E402
from ris_stability.sweep import metrics  # noqa: E402
from ris_stability.sweep.space import Param, SpaceError, load_space, override_text, parse_space  # noqa: E402


def _one(spec: dict, key: str = "train.lr"):
    return parse_space({"params": {key: spec}}, "s.toml").params[0]


BAD = [
    ({"type": "float", "low": 1}, "parameter 'train.lr' (float) has no 'high'; add e.g. high = 0.1"),
    ({"type": "int", "low": 1.5, "high": 3}, "parameter 'train.lr': low = 1.5 must be an integer"),
    ({"type": "float", "low": True, "high": 3}, "low = True must be a finite number"),
    ({"type": "float", "low": "a", "high": 3}, "low = 'a' must be a finite number"),
    ({"type": "float", "low": 0.0, "high": math.inf}, "high = inf must be a finite number"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": 1}, "log = 1 must be true or false"),
    ({"type": "float", "low": 2.0, "high": 1.0}, "low = 2.0 > high = 1.0 (bounds reversed?)"),
    ({"type": "float", "low": -1.0, "high": 1.0, "log": True}, "log = true needs low > 0, got low = -1.0"),
    ({"type": "float", "low": 0.0, "high": 1.0, "step": 0.0}, "step = 0.0 must be > 0 and cannot be combined"),
    ({"type": "float", "low": 0.1, "high": 1.0, "step": 0.1, "log": True}, "step = 0.1 must be > 0 and cannot"),
    ({"type": "categorical", "choices": "ab"}, "choices must be a non-empty list, got 'ab'"),
    ({"type": "categorical", "choices": [1, 1]}, "choices [1, 1] repeat a value"),
    ({"type": "categorical", "choices": [[1], 2]}, "choices must be strings, numbers or booleans"),
    ({"type": "categorical", "choices": ["a"], "low": 1}, "unknown field 'low' for type 'categorical'; valid fields: "
                                                           "choices, type"),
    ({"type": None}, "type = None; valid types: float, int, categorical"),
    ("float", "must be a table ([params.\"train.lr\"]), got 'float'"),
]


@pytest.mark.parametrize("spec, message", BAD, ids=[m[:30] for _, m in BAD])
def test_a_bad_parameter_is_refused_naming_the_file_the_key_and_the_fix(spec, message) -> None:
    with pytest.raises(SpaceError) as err:
        _one(spec)
    assert str(err.value).startswith("space file s.toml: parameter 'train.lr'") and message in str(err.value)


def test_a_range_may_be_a_single_point_and_log_needs_only_a_positive_low() -> None:
    p = _one({"type": "float", "low": 1e-3, "high": 1e-3, "log": True})
    assert (p.low, p.high, p.log, p.step) == (1e-3, 1e-3, True, None)
    assert _one({"type": "int", "low": 0, "high": 4, "step": 2}).step == 2
    assert _one({"type": "categorical", "choices": [1, True, "x", 0.5]}).choices == (1, True, "x", 0.5)


@pytest.mark.parametrize("data, message", [
    ({"params": {}, "other": 1}, "unknown top-level key 'other'; parameters go in [params.\"section.key\"] tables"),
    ({"params": {}}, "no parameters; add e.g. [params.\"train.lr\"] with type, low, high"),
    ({"params": [1]}, "no parameters"),
    ({"params": {"1bad": {"type": "float"}}}, "parameter '1bad' is not a name"),
    ({"params": {"a b": {"type": "float"}}}, "parameter 'a b' is not a name"),
])
def test_bad_space_tables(data, message) -> None:
    with pytest.raises(SpaceError, match=None) as err:
        parse_space(data, "f")
    assert str(err.value).startswith("space file f: ") and message in str(err.value)


def test_load_space_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="does not exist; see configs/space-quickstart.toml"):
        load_space(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[params\n")
    with pytest.raises(SpaceError, match="is not valid TOML"):
        load_space(tmp_path / "bad.toml")
    (tmp_path / "s.toml").write_text('[params."a-b.c_d"]\ntype = "int"\nlow = 1\nhigh = 9\nlog = true\n')
    space = load_space(tmp_path / "s.toml")
    assert space.keys == ["a-b.c_d"] and space.source == str(tmp_path / "s.toml")
    assert space.to_dict() == {"a-b.c_d": {"type": "int", "low": 1, "high": 9, "log": True}}


def test_suggest_passes_bounds_step_and_log_to_the_sampler() -> None:
    calls: list = []

    class Trial:
        def suggest_float(self, key, low, high, step=None, log=False):
            calls.append(("float", key, low, high, step, log))
            return low

        def suggest_int(self, key, low, high, step=1, log=False):
            calls.append(("int", key, low, high, step, log))
            return high

        def suggest_categorical(self, key, choices):
            calls.append(("cat", key, choices))
            return choices[-1]

    space = parse_space({"params": {"f": {"type": "float", "low": 1, "high": 2.5, "step": 0.5},
                                    "g": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                                    "i": {"type": "int", "low": 2, "high": 8},
                                    "j": {"type": "int", "low": 1, "high": 64, "log": True},
                                    "c": {"type": "categorical", "choices": ["u", "v"]}}})
    assert space.suggest(Trial()) == {"f": 1.0, "g": 1e-3, "i": 8, "j": 64, "c": "v"}
    assert calls == [("float", "f", 1.0, 2.5, 0.5, False), ("float", "g", 1e-3, 1e-1, None, True),
                     ("int", "i", 2, 8, 1, False), ("int", "j", 1, 64, 1, True), ("cat", "c", ["u", "v"])]
    assert [type(v) for v in calls[0][2:4]] == [float, float] and [type(v) for v in calls[2][2:4]] == [int, int]
    described = [p.describe() for p in space.params]
    assert described == ["[1, 2.5] step 0.5", "[0.001, 0.1] log", "[2, 8]", "[1, 64] log", "{'u', 'v'}"]
    assert space.to_dict()["f"] == {"type": "float", "low": 1, "high": 2.5, "log": False, "step": 0.5}
    assert space.to_dict()["c"] == {"type": "categorical", "choices": ["u", "v"]}


def test_check_probes_both_bounds_and_every_choice_against_the_config() -> None:
    space = parse_space({"params": {"a": {"type": "float", "low": 0.5, "high": 2.0},
                                    "b": {"type": "categorical", "choices": ["x", "y"]}}}, "sp.toml")
    seen: list = []
    space.check(lambda key, value: seen.append((key, value)))
    assert seen == [("a", 0.5), ("a", 2.0), ("b", "x"), ("b", "y")]

    def refuse_y(key, value):
        if value == "y":
            raise UsageError("y is not a mode")
    with pytest.raises(SpaceError) as err:
        space.check(refuse_y)
    assert str(err.value) == "space file sp.toml: parameter 'b' = 'y' is rejected by the config: y is not a mode"
    with pytest.raises(KeyError):  # only the config's UsageError is turned into a space error
        space.check(lambda key, value: (_ for _ in ()).throw(KeyError(key)))


def test_override_text_is_a_toml_literal() -> None:
    assert override_text("a.b", True) == "a.b=true" and override_text("a", False) == "a=false"
    assert override_text("m", 'say "hi" \\ bye') == 'm="say \\"hi\\" \\\\ bye"'
    assert override_text("lr", 0.001) == "lr=0.001" and override_text("n", 3) == "n=3"
    assert Param("k", "float", 1, 2).probe_values() == [1, 2]


# --- metrics ------------------------------------------------------------------------------------------------
def test_report_metric_reaches_every_handler_as_a_float_until_removed() -> None:
    torch = pytest.importorskip("torch")
    got: list = []
    remove = metrics.add_handler(lambda name, value, step: got.append((name, value, step, type(value))))
    other = metrics.add_handler(lambda name, value, step: got.append("other"))
    try:
        metrics.report_metric("val", torch.tensor(0.25))
        metrics.report_metric("acc", 3, step=7)
    finally:
        remove()
        remove()  # a second removal is harmless
    metrics.report_metric("after", 1.0)
    other()
    assert got == [("val", 0.25, None, float), "other", ("acc", 3.0, 7, float), "other", "other"]
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="name must be a non-empty string"):
            metrics.report_metric(bad, 1.0)


def test_trace_metrics_and_values_of_a_step_row() -> None:
    assert metrics.is_trace_metric("loss") and metrics.is_trace_metric("loss/mse")
    assert not metrics.is_trace_metric("loss/") and not metrics.is_trace_metric("val_loss")
    row = {"loss": 2, "a": "nan", "b": "inf", "c": "-inf", "d": "text", "e": True, "f": None}
    assert metrics.trace_value(row, "loss") == 2.0 and type(metrics.trace_value(row, "loss")) is float
    assert math.isnan(metrics.trace_value(row, "a"))
    assert (metrics.trace_value(row, "b"), metrics.trace_value(row, "c")) == (math.inf, -math.inf)
    assert [metrics.trace_value(row, k) for k in ("d", "e", "f", "missing")] == [None] * 4


def test_last_json_metrics_takes_the_numbers_of_the_last_json_line() -> None:
    out = '{"val_loss": 1.0}\nnoise\n {"val_loss": 0.5, "n": 3, "ok": true, "s": "x"} \n{broken}\nlast words\n'
    assert metrics.last_json_metrics(out) == {"val_loss": 0.5, "n": 3.0}
    assert metrics.last_json_metrics('{"a": 1}\n[1, 2]\n') == {"a": 1.0}
    assert metrics.last_json_metrics("no json here\n") == {}


def test_named_in_source_matches_whole_words(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text('report_metric("val_loss", v)\nmy_acc = 1\n')
    assert metrics.named_in_source("val_loss", script)
    assert not metrics.named_in_source("acc", script) and not metrics.named_in_source("val", script)
    assert not metrics.named_in_source("val.loss", script)  # the dot is literal
    assert metrics.named_in_source("anything", None) and metrics.named_in_source("x", tmp_path / "missing.py")
