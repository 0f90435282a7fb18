"""The rows of `opd-check` and their report: a verdict per row (ok / warn / fail), what was
found, what to do; printed as one table and written as check.json.

    rows = [Row("tokenizers", Verdict.OK, ["49152 tokens, ..."]), ...]
    print(table(rows)); write_json(path, rows, config)
    raise_on_fail(rows)   # CheckFailed naming every failed row
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

from opd.errors import UserError


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


class CheckFailed(UserError):
    """A row of the check failed; the message names the row, what was found and what to do."""


@dataclass(frozen=True)
class Row:
    """One line of the report. `found`: what was measured, a line each; `todo`: what to do
    (empty when nothing); `data`: the numbers behind it, for check.json."""

    name: str
    verdict: Verdict
    found: list[str]
    todo: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def worst(verdicts: Sequence[Verdict]) -> Verdict:
    """fail > warn > ok."""
    order = (Verdict.OK, Verdict.WARN, Verdict.FAIL)
    return max(verdicts, key=order.index, default=Verdict.OK)


NAME_W, VERDICT_W = 22, 6


def table(rows: Sequence[Row]) -> str:
    """The rows as a table: name, verdict, then what was found (indented continuation
    lines) and what to do (`->`)."""
    name_w = max([NAME_W, *(len(r.name) for r in rows)])  # per-teacher rows are longer
    pad = " " * (name_w + VERDICT_W + 2)
    lines = [f"{'row':<{name_w}} {'verdict':<{VERDICT_W}} found / what to do", "-" * 96]
    for r in rows:
        body = r.found + [f"-> {t}" for t in r.todo] or [""]
        lines.append(f"{r.name:<{name_w}} {r.verdict.value:<{VERDICT_W}} {body[0]}")
        lines += [pad + b for b in body[1:]]
    counts = {v: sum(r.verdict is v for r in rows) for v in Verdict}
    lines.append("-" * 96)
    lines.append(f"{len(rows)} rows: {counts[Verdict.OK]} ok, {counts[Verdict.WARN]} warn, "
                 f"{counts[Verdict.FAIL]} fail")
    return "\n".join(lines)


def failure_message(rows: Sequence[Row]) -> str:
    """Every failed row: its name, findings and what to do."""
    parts = []
    for r in rows:
        if r.verdict is Verdict.FAIL:
            parts.append(f"check {r.name} failed:\n  " + "\n  ".join(r.found + [f"-> {t}" for t in r.todo]))
    return "\n".join(parts)


def raise_on_fail(rows: Sequence[Row]) -> None:
    if any(r.verdict is Verdict.FAIL for r in rows):
        raise CheckFailed(failure_message(rows))


def write_json(path: str | Path, rows: Sequence[Row], seconds: float, config: dict) -> Path:
    """check.json: every row (verdict, findings, advice, numbers), the wall time, the config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"verdict": worst([r.verdict for r in rows]).value, "seconds": seconds,
           "rows": [asdict(r) for r in rows], "config": config}
    p.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return p
