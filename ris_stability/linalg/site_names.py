"""THE parser of probe site names ``module:op[shape]@file:line`` (one place, so the report, the hazards
and the sweep's pruning read a name the same way the probe writes it).
"""
from __future__ import annotations

from ris_stability.linalg.registry import base_name, lookup


def split_site(name: str) -> tuple[str, str, str, str]:
    """(module, op, shape, location) of a probe site name ``module:op[shape]@file:line``; the shape and
    location parts appear only when needed to tell two records apart, and module is "" outside modules.
    Step columns ``mat/<site>/<stat>`` split at the first and the last '/' (a location may hold '/')."""
    head, _, location = name.partition("@")
    head, _, shape = head.partition("[")
    module, _, op = head.rpartition(":")
    return module, op, shape.rstrip("]"), location


def site_op(name: str) -> str:
    """The base name of a site's op as recorded ('loss:linalg.eig@f.py:3' -> 'eig', 'm:inverse' ->
    'inverse'); '' for a name no registered spelling records (a watched matrix)."""
    op = split_site(name)[1]
    return base_name(op) if lookup(op) is not None else ""
