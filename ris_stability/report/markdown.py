"""Pure Markdown string builders (GitHub-flavoured). No I/O, no pandas."""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any, Iterable, Sequence

MISSING = "–"  # shown for absent / not-a-number values


def shortlist(items: Iterable[Any], limit: int = 10, where: str = "") -> str:
    """The first ``limit`` items, comma-separated, then "(+N more; all in WHERE)": a list is never cut silently."""
    items = [str(i) for i in items]
    text = ", ".join(items[:limit]) if items else "none"
    if len(items) > limit:
        text += f" (+{len(items) - limit} more" + (f"; all in {where})" if where else ")")
    return text


def fmt(value: Any, digits: int = 3) -> str:
    """A number as a short string: ints as is, floats with `digits` significant digits, NaN as '–'."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) or hasattr(value, "__float__"):
        x = float(value)
        if math.isnan(x):
            return MISSING
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0:
            return "0"
        if x.is_integer() and abs(x) < 1e6:
            return str(int(x))
        if 1e-3 <= abs(x) < 1e4:
            return f"{x:.{digits}g}"
        return f"{x:.{max(digits - 1, 0)}e}"
    return str(value)


def code(text: Any) -> str:
    """Inline code span that survives backticks inside the text."""
    text = str(text)
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: Any) -> str:
    """Text safe inside a table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def heading(text: str, level: int = 2) -> str:
    return f"{'#' * level} {text}\n"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A pipe table. `align` holds one of 'l', 'r', 'c' per column (default: left)."""
    headers = list(headers)
    align = align or "l" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} has {len(align)} entries for {len(headers)} columns")
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def key_value_table(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(["", ""], [(f"**{k}**", v) for k, v in pairs])


def bullets(items: Iterable[str]) -> str:
    return "".join(f"- {item}\n" for item in items)


def numbered(items: Iterable[str]) -> str:
    return "".join(f"{i}. {item}\n" for i, item in enumerate(items, start=1))


def image(alt: str, rel_path: str | PurePosixPath) -> str:
    """An image link; the path is written with forward slashes so it resolves on GitHub."""
    path = str(rel_path).replace("\\", "/")
    if path.startswith("/"):
        raise ValueError(f"image path {path!r} is absolute; reports must link figures relatively")
    return f"![{alt}]({path})\n"


def details(summary: str, body: str) -> str:
    """A collapsed block (GitHub renders <details>); blank lines keep the Markdown inside working."""
    return f"<details><summary>{summary}</summary>\n\n{body}\n</details>\n"


def span(first: int, last: int) -> str:
    """'step 5' or 'steps 0–9'."""
    return f"step {first}" if first == last else f"steps {first}–{last}"


def steps_list(steps: Sequence[int], limit: int = 12) -> str:
    """'3, 7, 9' or '3, 7, ... (+40 more)'; ranges of consecutive steps collapse to 'a–b'."""
    if not steps:
        return "none"
    runs: list[str] = []
    start = prev = steps[0]
    for s in list(steps[1:]) + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        runs.append(str(start) if start == prev else f"{start}–{prev}")
        if s is not None:
            start = prev = s
    shown = ", ".join(runs[:limit])
    return shown if len(runs) <= limit else f"{shown}, ... (+{len(runs) - limit} more ranges)"


def document(blocks: Iterable[str]) -> str:
    """Join blocks with one blank line between them and a final newline."""
    return "\n".join(b.rstrip("\n") + "\n" for b in blocks if b)
