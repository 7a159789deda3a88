"""The locator's answer: where a run first went non-finite, and why.

A :class:`Finding` is plain data (strings, numbers, tuples) so that it can be written to JSON
(``to_dict`` / ``from_dict``), embedded in a trace event, and rendered without rich
(:func:`format_finding`). :class:`TensorSummary` describes one tensor (an op's input or output, or a
bad argument) by its shape, dtype, value range, non-finite counts and, for linear-algebra inputs, the
spectral statistics of :mod:`ris_stability.numerics.stats`.

JSON convention (as in the trace format): a non-finite float is written as ``null``. ``from_dict``
reads ``null`` back as ``None`` for the summary's value range and as NaN for spectral statistics
(so an infinite condition number comes back as NaN: the JSON form is for reading, not for arithmetic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

PHASES: tuple[str, ...] = ("input", "forward", "backward", "error")
FINDING_SCHEMA = "risdiag-finding"
FINDING_VERSION = 1


class FindingFormatError(ValueError):
    """A dict handed to ``Finding.from_dict`` / ``TensorSummary.from_dict`` is not a valid finding."""


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _check_keys(data: Mapping[str, Any], cls: type, what: str, extra: tuple[str, ...] = ()) -> None:
    valid = {f.name for f in fields(cls)} | set(extra)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise FindingFormatError(
            f"{what}: unknown key(s) {unknown}; valid keys are {sorted(valid)}. "
            "The dict was probably written by a different version of ris_stability."
        )


@dataclass(frozen=True)
class TensorSummary:
    """What one tensor looked like. ``min``/``max`` are over the finite entries (of ``|z|`` for
    complex tensors, where ``min``/``max`` describe magnitudes); None when there is no finite entry.
    ``spectral`` holds worst-over-batch statistics (keys of ``numerics.stats.STAT_KEYS``) or is empty."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float | None = None
    max: float | None = None
    absmax: float | None = None
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    spectral: Mapping[str, float] = field(default_factory=dict)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @classmethod
    def of(cls, name: str, t: torch.Tensor, spectral: Mapping[str, float] | None = None) -> "TensorSummary":
        """Summarise ``t`` (any dtype, any device); integer and bool tensors get value ranges too."""
        with torch.no_grad():
            t = t.detach()
            shape = tuple(int(s) for s in t.shape)
            if t.numel() == 0:
                return cls(name, shape, str(t.dtype).replace("torch.", ""), spectral=dict(spectral or {}))
            if t.dtype == torch.bool:
                t = t.to(torch.uint8)
            mag = t.abs() if t.is_complex() else t
            if t.is_floating_point() or t.is_complex():
                nan = int(torch.isnan(t).sum())
                inf = int(torch.isinf(t).sum())
                finite = mag[torch.isfinite(mag)]
            else:
                nan = inf = 0
                finite = mag.reshape(-1)
            zeros = int((t == 0).sum())
            lo = hi = amax = None
            if finite.numel():
                lo, hi = float(finite.min()), float(finite.max())
                amax = float(finite.abs().max())
        return cls(name, shape, str(t.dtype).replace("torch.", ""), lo, hi, amax, nan, inf, zeros,
                   dict(spectral or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "min": _json_float(self.min), "max": _json_float(self.max), "absmax": _json_float(self.absmax),
            "nan": self.nan, "inf": self.inf, "zeros": self.zeros,
            "spectral": {k: _json_float(v) for k, v in self.spectral.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSummary":
        _check_keys(data, cls, "TensorSummary.from_dict")
        try:
            return cls(
                name=str(data["name"]), shape=tuple(int(s) for s in data["shape"]), dtype=str(data["dtype"]),
                min=data.get("min"), max=data.get("max"), absmax=data.get("absmax"),
                nan=int(data.get("nan", 0)), inf=int(data.get("inf", 0)), zeros=int(data.get("zeros", 0)),
                spectral={k: math.nan if v is None else float(v) for k, v in data.get("spectral", {}).items()},
            )
        except KeyError as exc:
            raise FindingFormatError(f"TensorSummary.from_dict: missing key {exc}; got keys {sorted(data)}") from exc


@dataclass(frozen=True)
class Finding:
    """Where and why a run first produced a non-finite value (or raised).

    phase:    "input" (an argument already held NaN/Inf), "forward", "backward", or "error" (an op raised).
    op:       the aten op whose output first went non-finite from finite inputs (or that raised),
              e.g. "aten.log", "aten.div.Tensor"; "" when no op is to blame (phase input).
    node:     the autograd node running the op in backward (e.g. "LinalgEighBackward0"), else "".
    module:   dotted path of the innermost nn.Module active in the forward op (for backward: the forward
              op that created ``node``); "" outside any module.
    location: "file.py:LINE" of the innermost frame outside torch that issued the forward call; for
              phase input the path of the bad argument, e.g. "batch['x']" or "model.lin.weight".
    stack:    the frames outside torch of that call, innermost first (stack[0] == location), so a
              helper's line is followed by the model line that called it.
    function: the torch-level function that issued ``op`` in forward (e.g. "torch.linalg.eigh"), or "".
    inputs:   summaries of the op's inputs (plus, for an eigh backward, the forward eigenvalues).
    output:   summary of the first non-finite output, when there is one.
    culprit:  the input values at the first non-finite output element of an elementwise op, in words.
    cause:    one plain sentence; remedies: suggestions (text only: nothing is ever changed for you).
    message:  the exception text for phase error; otherwise extra notes (may be "").
    context:  where intentional infinities (a mask's -inf) that this op turned into NaN came from, or "".
    """

    phase: str
    cause: str
    op: str = ""
    node: str = ""
    module: str = ""
    location: str = ""
    stack: tuple[str, ...] = ()
    function: str = ""
    inputs: tuple[TensorSummary, ...] = ()
    output: TensorSummary | None = None
    culprit: str = ""
    remedies: tuple[str, ...] = ()
    message: str = ""
    context: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise FindingFormatError(f"Finding.phase must be one of {PHASES}, got {self.phase!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "remedies", tuple(self.remedies))
        object.__setattr__(self, "stack", tuple(self.stack))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become null), tagged with schema and version."""
        return {
            "schema": FINDING_SCHEMA, "version": FINDING_VERSION,
            "phase": self.phase, "cause": self.cause, "op": self.op, "node": self.node,
            "module": self.module, "location": self.location, "stack": list(self.stack),
            "function": self.function,
            "inputs": [s.to_dict() for s in self.inputs],
            "output": None if self.output is None else self.output.to_dict(),
            "culprit": self.culprit, "remedies": list(self.remedies), "message": self.message,
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Finding":
        _check_keys(data, cls, "Finding.from_dict", extra=("schema", "version"))
        if data.get("schema", FINDING_SCHEMA) != FINDING_SCHEMA:
            raise FindingFormatError(f"Finding.from_dict: schema {data.get('schema')!r} is not {FINDING_SCHEMA!r}")
        if int(data.get("version", FINDING_VERSION)) > FINDING_VERSION:
            raise FindingFormatError(
                f"Finding.from_dict: version {data['version']} is newer than this reader "
                f"({FINDING_VERSION}); upgrade ris_stability to read it"
            )
        if "phase" not in data or "cause" not in data:
            raise FindingFormatError(f"Finding.from_dict: 'phase' and 'cause' are required; got keys {sorted(data)}")
        out = data.get("output")
        return cls(
            phase=str(data["phase"]), cause=str(data["cause"]),
            op=str(data.get("op", "")), node=str(data.get("node", "")), module=str(data.get("module", "")),
            location=str(data.get("location", "")), stack=tuple(str(x) for x in data.get("stack", ())),
            function=str(data.get("function", "")),
            inputs=tuple(TensorSummary.from_dict(s) for s in data.get("inputs", ())),
            output=None if out is None else TensorSummary.from_dict(out),
            culprit=str(data.get("culprit", "")), remedies=tuple(str(r) for r in data.get("remedies", ())),
            message=str(data.get("message", "")), context=str(data.get("context", "")),
        )


def _fmt_num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


_SPECTRAL_SHOWN = ("n", "rank", "log10_cond", "lambda_min", "lambda_max", "min_gap", "max_cluster",
                   "cluster_value", "amplification", "cluster_leak")


def format_summary(s: TensorSummary) -> str:
    """One or two lines describing a tensor summary."""
    line = (f"{s.name}: {tuple(s.shape)} {s.dtype}  min {_fmt_num(s.min)}  max {_fmt_num(s.max)}  "
            f"absmax {_fmt_num(s.absmax)}  nan {s.nan}  inf {s.inf}  zeros {s.zeros}")
    if s.spectral:
        shown = [f"{k} {_fmt_num(s.spectral[k])}" for k in _SPECTRAL_SHOWN if k in s.spectral]
        line += "\n      spectral (worst over batch): " + ", ".join(shown)
    return line


def format_finding(f: Finding) -> str:
    """Plain-text rendering (no rich), one fact per line, for logs and terminals without a TTY."""
    where = f.op or "-"
    extras = [x for x in (f"node {f.node}" if f.node else "", f.function) if x]
    if extras:
        where += f"  ({', '.join(extras)})"
    lines = [
        f"non-finite origin, phase {f.phase}",
        f"  cause:    {f.cause}",
        f"  op:       {where}",
        f"  module:   {f.module or '(outside any module)'}",
        f"  location: {f.location or '-'}",
    ]
    if len(f.stack) > 1:
        lines.append(f"  called from: {' <- '.join(f.stack[1:])}")
    if f.culprit:
        lines.append(f"  culprit:  {f.culprit}")
    if f.context:
        lines.append(f"  context:  {f.context}")
    if f.output is not None:
        lines.append(f"  output:   {format_summary(f.output)}")
    if f.inputs:
        lines.append("  inputs:")
        lines.extend(f"    {format_summary(s)}" for s in f.inputs)
    if f.remedies:
        lines.append("  remedies:")
        lines.extend(f"    - {r}" for r in f.remedies)
    if f.message:
        lines.append("  message:  " + f.message.strip().replace("\n", "\n            "))
    return "\n".join(lines)
