"""Sweeps with early-signal triage: early signals, final quality, rank correlation and the
early-stop rule.

A study of SFT on small models found that early training dynamics predict the final model:
lower gradient norm and higher loss over the first steps go with a better end. opd logs both
every step (`optim/grad_norm`, `loss/*_total` in metrics.jsonl), so a sweep can be ranked by
them (`opd-report --compare`, opd/compare.py) and a run can be stopped early when its signal
is worse than a threshold or than the best finished run of its sweep (`early_stop.*`).

    early_signals(rows, n)            mean grad norm and loss over steps 1..n
    final_quality(summary)            held-out KL and accuracy after training (summary.json)
    spearman(x, y)                    rank correlation, ties averaged
    early_stop_decision(...)          the rule, a pure function of a history and a reference
    best_finished_run(sweep_dir, ...) the sweep's best finished run and its early signal

Pure except `read_run` / `best_finished_run`, which read run directories.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

SIGNALS = ("grad_norm", "loss")
QUALITIES = ("kl", "accuracy")
# the direction in which a final quality is good
QUALITY_BETTER = {"kl": "lower", "accuracy": "higher"}


def step_rows(rows: Sequence[dict]) -> list[dict]:
    """The training-step lines of metrics.jsonl (eval lines carry no gradient norm)."""
    return [r for r in rows if isinstance(r.get("optim/grad_norm"), (int, float))]


def step_loss(row: dict) -> float:
    """A step's whole loss: the sum of its `loss/<kind>_total` (rows, and SMPO pairs)."""
    parts = [float(v) for k, v in row.items() if k.startswith("loss/") and k.endswith("_total")]
    return float(sum(parts)) if parts else math.nan


def early_signals(rows: Sequence[dict], n: int) -> dict[str, float]:
    """Mean gradient norm and mean loss over training steps 1..n (finite values only); NaN
    when the run has no such step."""
    early = [r for r in step_rows(rows) if r.get("step", 0) <= n]

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if math.isfinite(x)]
        return float(np.mean(xs)) if xs else math.nan

    return {"grad_norm": mean([float(r["optim/grad_norm"]) for r in early]),
            "loss": mean([step_loss(r) for r in early]), "steps": float(len(early))}


def final_quality(summary: dict) -> dict[str, float]:
    """Held-out KL(student||teacher) and greedy accuracy after training (NaN when missing)."""
    after = (summary.get("eval") or {}).get("after") or {}
    get = lambda k: float(after[k]) if isinstance(after.get(k), (int, float)) else math.nan  # noqa: E731
    return {"kl": get("kl"), "accuracy": get("accuracy/greedy")}


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation over the pairs where both are finite (NaN under 3 pairs
    or when one side is constant)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def worse(value: float, reference: float, better: str, tolerance: float = 0.0) -> bool:
    """Whether `value` is worse than `reference` by more than the relative `tolerance`,
    where `better` says which direction is good ("lower" | "higher")."""
    slack = abs(reference) * tolerance
    return value > reference + slack if better == "lower" else value < reference - slack


@dataclass(frozen=True)
class StopDecision:
    """The early-stop rule's verdict after `after_steps` steps (written to summary.json)."""

    stop: bool
    step: int
    signal: str
    value: float  # the run's early signal
    threshold: Optional[float]
    reference: Optional[float]  # the best finished run's early signal
    reference_run: Optional[str]
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def early_stop_decision(rows: Sequence[dict], after_steps: int, signal: str, better: str,
                        threshold: Optional[float] = None, reference: Optional[float] = None,
                        tolerance: float = 0.0, reference_run: Optional[str] = None) -> Optional[StopDecision]:
    """The rule, once the history holds `after_steps` training steps (None before that):
    stop when the mean `signal` over those steps is worse than `threshold`, or worse than
    `reference` (the sweep's best finished run) by more than `tolerance`. A non-finite signal
    (a diverged run) is always worse."""
    if signal not in SIGNALS or better not in ("lower", "higher"):
        raise ValueError(f"signal must be one of {list(SIGNALS)} and better 'lower' or 'higher', "
                         f"got {signal!r}, {better!r}")
    if len([r for r in step_rows(rows) if r.get("step", 0) <= after_steps]) < after_steps:
        return None
    value = early_signals(rows, after_steps)[signal]
    why = []
    if not math.isfinite(value):
        why.append(f"early {signal} is not finite")
    if threshold is not None and math.isfinite(value) and worse(value, threshold, better):
        why.append(f"mean {signal} over steps 1-{after_steps} = {value:.4g}, worse than the "
                   f"threshold {threshold:.4g} ({better} is better)")
    if reference is not None and math.isfinite(value) and worse(value, reference, better, tolerance):
        why.append(f"mean {signal} over steps 1-{after_steps} = {value:.4g}, worse than "
                   f"{reference:.4g} of the sweep's best run {reference_run} by more than "
                   f"{tolerance:.0%} ({better} is better)")
    ok = (f"mean {signal} over steps 1-{after_steps} = {value:.4g}: within the rule, the run goes on")
    return StopDecision(bool(why), after_steps, signal, value, threshold, reference, reference_run,
                        "; ".join(why) if why else ok)


@dataclass(frozen=True)
class RunSignals:
    """One run of a sweep: where it is, its early signals and its final quality."""

    path: str
    early: dict[str, float]
    quality: dict[str, float]
    stopped_early: bool


def read_run(run_dir: Path, n: int) -> Optional[RunSignals]:
    """A run directory's signals, or None when it has no summary.json (not finished)."""
    summary_p = run_dir / "summary.json"
    if not summary_p.is_file():
        return None
    summary = json.loads(summary_p.read_text())
    m = run_dir / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.is_file() else []
    stopped = bool((summary.get("early_stop") or {}).get("stop"))
    return RunSignals(str(run_dir), early_signals(rows, n), final_quality(summary), stopped)


def best_run(runs: Sequence[RunSignals], quality: str) -> Optional[RunSignals]:
    """The run with the best final `quality` among those that ran to the end."""
    done = [r for r in runs if not r.stopped_early and math.isfinite(r.quality[quality])]
    if not done:
        return None
    sign = 1.0 if QUALITY_BETTER[quality] == "lower" else -1.0
    return min(done, key=lambda r: sign * r.quality[quality])


def best_finished_run(sweep_dir: str | Path, quality: str, n: int,
                      exclude: Optional[str | Path] = None) -> Optional[RunSignals]:
    """The best finished run under `sweep_dir` (any depth), by final `quality`, not `exclude`."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude else None
    runs = [read_run(p.parent, n) for p in sorted(root.rglob("summary.json"))
            if skip is None or p.parent.resolve() != skip]
    return best_run([r for r in runs if r is not None], quality)
