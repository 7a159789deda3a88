"""A training script's own anomaly mode, turned into a finding.

Under ``torch.autograd.set_detect_anomaly(True)`` backward stops with "Function 'XBackward0' returned nan
values in its 0th output." and torch keeps, on every node of the graph, the forward stack that created it
(``node.metadata["traceback_"]``). :func:`anomaly_finding` reads both: the node, the forward line (innermost
frame outside torch and this toolkit), the module whose ``forward`` holds that line, the spectrum the node
saved (eigh / SVD) and the cause and remedies of the node's rule - the same finding the locator would give,
without re-running anything.
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Iterator, Mapping

from torch import Tensor, nn

from ris_stability.locate.causes import Observation, explain
from ris_stability.locate.finding import Finding, TensorSummary
from ris_stability.locate.ops import _spectral_stats
from ris_stability.observe.frames import MAX_STACK, _is_user, _short_path

_ERROR = re.compile(r"Function '(\w+)' returned (nan|inf) values in its (\w+) output")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_SAVED_SPECTRUM = {"svd": ("_saved_S", "singular"), "eigh": ("_saved_eigenvalues", "eigenvalues")}


def _nodes(root, limit: int = 100_000) -> Iterator:
    seen, todo = set(), [root]
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        todo.extend(fn for fn, _ in getattr(node, "next_functions", ()))


def _user_frames(traceback: str) -> list[tuple[str, int]]:
    """(file, line) of the frames of a formatted forward stack outside torch and the toolkit, innermost first."""
    frames = [(f, int(n)) for f, n, _ in _FRAME.findall(traceback) if _is_user(f)]
    return list(reversed(frames))


def _module_at(roots: Mapping[str, nn.Module], frames: list[tuple[str, int]]) -> str:
    """The dotted path of the innermost module whose forward's source holds one of ``frames``."""
    spans: list[tuple[str, str, int, int]] = []
    for root_name, root in roots.items():
        for name, module in root.named_modules():
            try:
                lines, first = inspect.getsourcelines(type(module).forward)
                spans.append((".".join(x for x in (root_name, name) if x), inspect.getsourcefile(type(module).forward)
                              or "", first, first + len(lines)))
            except (OSError, TypeError):
                continue
    for file, line in frames:
        for path, src, first, last in spans:
            if src and _same_file(src, file) and first <= line < last:
                return path
    return ""


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def anomaly_finding(exc: BaseException, loss: Tensor | None, roots: Mapping[str, nn.Module]) -> Finding | None:
    """The finding of an anomaly-mode error raised by ``loss``'s backward, or None for any other error."""
    match = _ERROR.search(str(exc))
    if match is None or loss is None or loss.grad_fn is None:
        return None
    node_name = match.group(1)
    node = next((n for n in _nodes(loss.grad_fn) if type(n).__name__ == node_name), None)
    traceback = (getattr(node, "metadata", None) or {}).get("traceback_", "") if node is not None else ""
    frames = _user_frames(traceback if isinstance(traceback, str) else "".join(traceback))
    stack = tuple(f"{_short_path(f)}:{n}" for f, n in frames[:MAX_STACK])
    inputs: tuple[TensorSummary, ...] = ()
    kind = next((k for k in _SAVED_SPECTRUM if k in node_name.lower()), None)
    if node is not None and kind is not None:
        attr, words = _SAVED_SPECTRUM[kind]
        try:
            values = getattr(node, attr, None)
        except RuntimeError:  # backward freed the saved tensors before it stopped
            values = None
        if isinstance(values, Tensor):
            inputs = (TensorSummary.of(f"{words} values of the forward {kind}", values, _spectral_stats(kind, values)),)
    obs = Observation("backward", node=node_name, inputs=inputs, message=str(exc),
                      location=stack[0] if stack else "", function=f"torch.linalg.{kind}" if kind else "")
    cause = explain(obs)
    note = ("the script's own anomaly mode (torch.autograd.set_detect_anomaly) stopped backward here: "
            f"{str(exc).strip().splitlines()[0]}")
    return Finding(phase="backward", cause=cause.text, node=node_name, module=_module_at(roots, frames),
                   location=stack[0] if stack else "", stack=stack, function=obs.function, inputs=inputs,
                   remedies=cause.remedies, message=note)


__all__ = ["anomaly_finding"]
