"""The finding as a user reads it: the plain-text rendering line by line, and the JSON form read back."""
from __future__ import annotations

import math

import pytest

from ris_stability.locate.finding import Finding, FindingFormatError, TensorSummary, format_finding

_SPECTRUM = {"max_cluster": 2.0, "n": 3.0, "min_gap": 0.0, "lambda_max": 1.25, "not_shown": 7.0}


def _full() -> Finding:
    return Finding(
        phase="backward", cause="sqrt backward at 0", op="aten.div.Tensor", node="SqrtBackward0",
        module="net.head", location="m.py:7", stack=("m.py:7", "train.py:20", "train.py:3"),
        function="torch.sqrt",
        inputs=(TensorSummary("self", (2,), "float32", -1.0, 2.5, 2.5, 1, 0, 1),
                TensorSummary("values", (3,), "float64", 0.0, 1.25, 1.25, 0, 0, 1, _SPECTRUM)),
        output=TensorSummary("output", (2,), "float32", None, None, None, 1, 1, 0),
        culprit="at index (0,): self=0.0 -> inf", remedies=("first remedy", "second remedy"),
        message="line one\nline two", context="the mask values (-inf) were written on purpose by aten.fill_")


def test_a_full_finding_renders_every_fact_on_its_own_line():
    assert format_finding(_full()).splitlines() == [
        "non-finite origin, phase backward",
        "  cause:    sqrt backward at 0",
        "  op:       aten.div.Tensor  (node SqrtBackward0, torch.sqrt)",
        "  module:   net.head",
        "  location: m.py:7",
        "  called from: train.py:20 <- train.py:3",
        "  culprit:  at index (0,): self=0.0 -> inf",
        "  context:  the mask values (-inf) were written on purpose by aten.fill_",
        "  output:   output: (2,) float32  min -  max -  absmax -  nan 1  inf 1  zeros 0",
        "  inputs:",
        "    self: (2,) float32  min -1  max 2.5  absmax 2.5  nan 1  inf 0  zeros 1",
        "    values: (3,) float64  min 0  max 1.25  absmax 1.25  nan 0  inf 0  zeros 1",
        "      spectral (worst over batch): n 3, lambda_max 1.25, min_gap 0, max_cluster 2",
        "  remedies:",
        "    - first remedy",
        "    - second remedy",
        "  message:  line one",
        "            line two",
    ]


def test_a_bare_finding_renders_placeholders():
    assert format_finding(Finding(phase="input", cause="argument x already holds 1 NaN")).splitlines() == [
        "non-finite origin, phase input",
        "  cause:    argument x already holds 1 NaN",
        "  op:       -",
        "  module:   (outside any module)",
        "  location: -",
    ]
    only_function = format_finding(Finding(phase="error", cause="c", function="torch.linalg.eigh",
                                           stack=("m.py:1",)))
    assert "  op:       -  (torch.linalg.eigh)" in only_function.splitlines()
    assert "called from" not in only_function  # a single frame is the location itself
    two_frames = Finding(phase="forward", cause="c", location="m.py:1", stack=("m.py:1", "t.py:2"))
    assert "  called from: t.py:2" in format_finding(two_frames).splitlines()


def test_the_json_form_reads_back_with_non_finite_numbers_as_null():
    f = _full()
    data = f.to_dict()
    assert data["schema"] == "risdiag-finding" and data["version"] == 1
    assert data["output"]["min"] is None and data["inputs"][0]["min"] == -1.0
    again = Finding.from_dict(data)
    assert again == Finding.from_dict(again.to_dict())
    assert again.inputs == f.inputs and again.output == f.output  # every number back, null back to None
    assert again.inputs[1].spectral == {k: v for k, v in _SPECTRUM.items()}
    assert (again.stack, again.remedies, again.message, again.context, again.culprit) == (
        f.stack, f.remedies, f.message, f.context, f.culprit)
    inf_stat = TensorSummary("v", (1,), "float32", spectral={"amplification": math.inf})
    assert math.isnan(TensorSummary.from_dict(inf_stat.to_dict()).spectral["amplification"])


def test_a_damaged_summary_is_refused_with_the_reader_named():
    good = TensorSummary("v", (2,), "float32", 0.0, 1.0, 1.0).to_dict()
    with pytest.raises(FindingFormatError, match=r"^TensorSummary\.from_dict: unknown key\(s\) \['colour'\]"):
        TensorSummary.from_dict(dict(good, colour="red"))
    with pytest.raises(FindingFormatError, match=r"^TensorSummary\.from_dict: missing key 'dtype'"):
        TensorSummary.from_dict({k: v for k, v in good.items() if k != "dtype"})


def test_a_minimal_record_reads_back_with_empty_defaults():
    assert TensorSummary.from_dict({"name": "v", "shape": [2], "dtype": "float32"}) == TensorSummary(
        "v", (2,), "float32", None, None, None, 0, 0, 0, {})
    assert Finding.from_dict({"phase": "forward", "cause": "c"}) == Finding("forward", "c")


def test_a_finding_without_output_round_trips():
    bare = Finding("error", "c", message="m")
    assert bare.to_dict()["output"] is None and Finding.from_dict(bare.to_dict()) == bare


def test_records_of_another_kind_or_a_newer_version_are_refused_by_name():
    good = Finding("forward", "c").to_dict()
    with pytest.raises(FindingFormatError, match=r"^Finding\.from_dict: schema 'risdiag-trace' is not "
                                                 r"'risdiag-finding'$"):
        Finding.from_dict(dict(good, schema="risdiag-trace"))
    with pytest.raises(FindingFormatError, match=r"^Finding\.from_dict: version 2 is newer than this reader \(1\); "
                                                 r"upgrade ris_stability to read it$"):
        Finding.from_dict(dict(good, version=2))
    assert Finding.from_dict(dict(good, version=0)) == Finding("forward", "c")  # older versions are read
    for missing in ("phase", "cause"):
        with pytest.raises(FindingFormatError, match=r"^Finding\.from_dict: 'phase' and 'cause' are required; "
                                                     r"got keys \["):
            Finding.from_dict({k: v for k, v in good.items() if k != missing})
    with pytest.raises(FindingFormatError) as unknown:
        Finding.from_dict(dict(good, colour="red"))
    assert str(unknown.value).startswith("Finding.from_dict: unknown key(s) ['colour']; valid keys are [")
    assert str(unknown.value).endswith(". The dict was probably written by a different version of ris_stability.")
    assert "'schema'" in str(unknown.value) and "'version'" in str(unknown.value)
