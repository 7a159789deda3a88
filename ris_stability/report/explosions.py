"""The report's explosion items: a crash traced back to the update that put the parameters out of range,
catastrophic gradient explosions, early gradient growth; most severe first, each with the next command.

Pure functions of a Trace (the monitor's explosion_origin and gradient_explosion events, see
monitor/explosions.py and docs/explosions.md).
"""
from __future__ import annotations

from ris_stability.records import Trace
from ris_stability.report.markdown import code, steps_list


def _events(trace: Trace, kind: str) -> list[dict]:
    return [e for e in trace.events if e.get("kind") == kind and e.get("step") is not None]


def rerun_command(trace: Trace, policy: str = "skip") -> str:
    """The run's own command with ``--on-explosion POLICY`` (a script or config trace), else the setting."""
    command = str(trace.meta.get("command") or "")
    if command.startswith("risdiag trace -- "):
        return code(command.replace("risdiag trace -- ", f"risdiag trace --on-explosion {policy} -- ", 1))
    if command.startswith("risdiag trace "):
        return code(f"{command} --on-explosion {policy}")
    return f"the monitor setting {code(f'on_explosion={policy!r}')}"


def explosion_items(trace: Trace) -> list[str]:
    """Crash traced back (error), catastrophic explosions (error), early growth (warning), in that order."""
    items = []
    for event in _events(trace, "explosion_origin")[:1]:
        data = event.get("data") or {}
        failed = data.get("failed_step")
        items.append(f"**Crash traced back to the update of step {event['step']}** — step {failed} went non-finite "
                     f"after it: {data.get('origin') or event.get('message', '')}. Keep the parameters with "
                     f"{rerun_command(trace)}, then lower the learning rate or clip the gradient.")
    explosions = _events(trace, "gradient_explosion")
    bad = [e for e in explosions if (e.get("data") or {}).get("catastrophic")]
    if bad:
        worst = max(bad, key=lambda e: (e.get("data") or {}).get("total") or 0.0)
        data = worst.get("data") or {}
        names = ", ".join(code(n) for n in (data.get("names") or [])[:4])
        text = (f"**Gradient explosion at step{'s' if len(bad) > 1 else ''} {steps_list([int(e['step']) for e in bad])}** "
                f"— {'the largest, ' if len(bad) > 1 else ''}at step {worst['step']}: {_after_colon(worst)}")
        text += f"; grew most: {names}" if names else ""
        policies = {(e.get("data") or {}).get("policy") for e in bad}
        if policies == {"observe"}:
            text += f". The optimizer applied {'them' if len(bad) > 1 else 'it'}: rerun with {rerun_command(trace)}"
        capsule = next((p for p in trace.capsules if p.name == f"step_{int(worst['step']):06d}.pt"), None)
        if capsule is not None:
            text += (f"; is the gradient right? {code('risdiag bisect --precision ' + capsule.as_posix())} compares "
                     "it with float64")
        items.append(text + ".")
    growth = [e for e in explosions if not (e.get("data") or {}).get("catastrophic")]
    if growth:
        items.append(f"**Gradient growth at step{'s' if len(growth) > 1 else ''} "
                     f"{steps_list([int(e['step']) for e in growth])}** — {_after_colon(growth[0])}: before the spike "
                     f"rule has a baseline; if it keeps growing, try {rerun_command(trace, 'stop')} or a lower "
                     "learning rate.")
    return items


def _after_colon(event: dict) -> str:
    """What the event measured, from its data: the norm, its growth, the rules it broke."""
    data = event.get("data") or {}
    total, previous, first = data.get("total"), data.get("previous"), data.get("first")
    parts = [f"total gradient norm {total:.3g}" if isinstance(total, (int, float)) else "gradient norm"]
    if previous and isinstance(total, (int, float)):
        parts.append(f"{total / previous:.3g}x the previous logged step")
    if first and isinstance(total, (int, float)) and int(event["step"]) > 0:
        parts.append(f"{total / first:.3g}x the first")
    rules = data.get("rules") or []
    if "range" in rules:
        parts.append(f"beyond the dtype's range for a norm ({data.get('limit', float('nan')):.3g})")
    if "update" in rules and data.get("update_ratio") is not None:
        parts.append(f"the SGD update would change the parameters by {data['update_ratio']:.3g}x their norm")
    return ", ".join(parts)


__all__ = ["explosion_items", "rerun_command"]
