"""`opd-report RUN_DIR`: plots and a short report.md from what a run left on disk.

    opd-report runs/addition-20261122-013000
    opd-report --compare multirun/addition-.../*   # a sweep: table, correlations, plot

Reads metrics.jsonl, summary.json and config.json (any of them may be missing: an old or
interrupted run still gets what can be drawn) and writes into the run directory:
    training.png   teacher KL and loss per step
    length.png     length mean / p95, truncation and EOS rate, the length controller's
                   strengths and error, length-monitor events
    heldout.png    every numeric before/after pair of summary.json (exact match, sampled
                   length statistics, anything under `eval`), with the teacher for reference
    report.md      config summary, before/after table, mean seconds per phase, the plots
`opd-train` calls `write_report` at the end of every run.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# the measured parts of a step (time/other is the rest of time/step; a generation that
# overlapped the step before, time/generate_overlapped, is not part of it)
STEP_PHASES = ("time/generate", "time/teacher", "time/teacher_generate", "time/learn", "time/generate_wait",
               "time/sync", "time/probe")
PHASES = (*STEP_PHASES, "time/other", "time/step")
# summary.json leaves that are settings or counts, not outcomes: never paired
NOT_METRICS = {"n", "max_new_tokens"}
# paired in report.md, but left out of heldout.png to keep it readable
TABLE_ONLY = {"median", "min", "max"}
CONFIG_KEYS = ("task.name", "student.path", "teacher.path", "loss.distill", "loss.smpo_coef",
               "loss.sft_coef", "steps", "rollout.prompts_per_step", "rollout.samples_per_prompt",
               "rollout.max_new_tokens", "optim.lr", "length.mode", "resources.use_ray",
               "resources.rollout_workers", "seed")


@dataclass(frozen=True)
class RunRecord:
    """What a run directory holds, read once."""

    path: Path
    rows: list[dict]  # metrics.jsonl lines, in order
    summary: dict  # summary.json ({} if missing)
    config: dict  # config.json ({} if missing)


@dataclass(frozen=True)
class BeforeAfter:
    """One numeric metric of summary.json measured before and after training."""

    label: str  # e.g. "student exact match", "sampled/eos_frac", "eval/gsm8k"
    before: float
    after: float
    teacher: Optional[float] = None  # the teacher's value of the same metric, when known


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def load_run(run_dir: str | Path) -> RunRecord:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    m = path / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.is_file() else []
    return RunRecord(path, rows, _read_json(path / "summary.json"), _read_json(path / "config.json"))


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the lines that carry a finite number under `key`."""
    pts = [(r["step"], float(r[key])) for r in rows if _is_number(r.get(key)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def events(rows: list[dict]) -> list[dict]:
    """Length-monitor events (dicts with step, condition, state, reason), in order."""
    return [e for r in rows for e in r.get("events") or [] if isinstance(e, dict) and "step" in e]


# ------------------------------------------------------------------ before / after pairs
def _flatten(obj: Any, prefix: tuple = ()) -> dict[tuple, float]:
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _flatten(sub, prefix + (str(key),)).items()}
    return {prefix: float(obj)} if _is_number(obj) else {}


def _swap(path: tuple, old: str, new: str) -> Optional[tuple]:
    """`path` with its one before-token (`before`, `x_before`) turned into the after-token."""
    hits = [i for i, p in enumerate(path) if p == old or p.endswith("_" + old)]
    if len(hits) != 1:
        return None
    i = hits[0]
    return path[:i] + (path[i][: len(path[i]) - len(old)] + new,) + path[i + 1:]


def before_after_pairs(summary: dict) -> list[BeforeAfter]:
    """Every numeric leaf with a `before` in its path whose `after` twin exists."""
    flat = _flatten({k: v for k, v in summary.items() if k != "environment"})
    out = []
    for path, before in flat.items():
        twin = _swap(path, "before", "after")
        if twin is None or twin not in flat or path[-1] in NOT_METRICS:
            continue
        label = "/".join(p for p in _swap(path, "before", "") if p).replace("_/", "/").rstrip("_")
        label, teacher = _teacher_of(flat, path, label)
        out.append(BeforeAfter(label, before, flat[twin], teacher))
    return out


def _teacher_of(flat: dict[tuple, float], path: tuple, label: str) -> tuple[str, Optional[float]]:
    """(label, the teacher's value of the same metric): `eval/teacher/<k>` for `eval/before/<k>`
    (the teacher's KL to itself is 0), `teacher` for the headline `student_before`."""
    if label == "student":
        return "answer accuracy, greedy", flat.get(("teacher",))
    if path[:2] == ("eval", "before"):
        return label, 0.0 if path[2:] == ("kl",) else flat.get(("eval", "teacher", *path[2:]))
    return label, None


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_events(ax: Any, evs: list[dict]) -> None:
    colors = {"on": "tab:red", "off": "tab:green"}
    for e in evs:
        state = str(e.get("state", ""))
        ax.axvline(e["step"], color=colors.get(state, "tab:purple"), linestyle=":", linewidth=1.2,
                   label=f"monitor: {e.get('condition', '?')} -> {state}")


def _style(ax: Any) -> None:
    """Grid, integer steps on the x axis, one legend entry per label (events repeat)."""
    from matplotlib.ticker import MaxNLocator

    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    if seen:
        ax.legend(seen.values(), seen.keys(), fontsize=8, loc="best")


def _line(ax: Any, rows: list[dict], key: str, label: str, **kw) -> bool:
    x, y = series(rows, key)
    if x:
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label, **kw)
    return bool(x)


def plot_training(rec: RunRecord, out: Path) -> Optional[Path]:
    """Teacher KL and loss per step."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    drawn = _line(ax1, rec.rows, "teacher/kl", "teacher KL (student samples)", color="tab:blue")
    drawn |= _line(ax2, rec.rows, "loss/rows_total", "total loss", color="tab:orange")
    ax1.set(title="KL(student || teacher) per step (sampled estimate)", ylabel="nats per token")
    ax2.set(title="Loss per step", xlabel="step", ylabel="loss")
    for ax in (ax1, ax2):
        _style(ax)
    return _save(plt, fig, out / "training.png", drawn)


def plot_length(rec: RunRecord, out: Path) -> Optional[Path]:
    """Length mean / p95 (tokens) on top, truncation and EOS rate (with the teacher's and the
    greedy probe's truncation) below it, and under those the length controller: each
    remedy's strength and the error it acts on; events on every panel."""
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    drawn = _line(ax1, rec.rows, "length/mean", "mean length", color="tab:blue")
    _line(ax1, rec.rows, "length/p95", "p95 length", color="tab:cyan")
    _line(ax1, rec.rows, "length/penalty/max_new_tokens", "max_new_tokens (cap)", color="gray", linestyle="--")
    _line(ax2, rec.rows, "length/truncated_frac", "truncated (hit max_new_tokens)", color="tab:red")
    _line(ax2, rec.rows, "length/eos_frac", "ended with EOS", color="tab:green")
    _line(ax2, rec.rows, "length/probe/truncated", "truncated, greedy probe", color="tab:red", linestyle=":")
    _line(ax2, rec.rows, "length/probe/repetitive", "repetitive, greedy probe", color="tab:purple", linestyle=":")
    _line(ax2, rec.rows, "length/reference/truncated_frac", "truncated, teacher (reference)", color="tab:red",
          linestyle="--", alpha=0.5)
    _line(ax2, rec.rows, "length/reference/greedy_truncated_frac", "truncated, teacher greedy (probe's reference)",
          color="tab:red", linestyle="-.", alpha=0.5)
    strengths = sorted({k for r in rec.rows for k in r if k.startswith("length/strength/")})
    for key in strengths:
        _line(ax3, rec.rows, key, f"strength: {key.rsplit('/', 1)[-1]}", linewidth=1)
    _line(ax3, rec.rows, "length/ctrl/err_total", "controller error (+: too long)", color="black", linewidth=2)
    for ax in (ax1, ax2, ax3):
        _mark_events(ax, events(rec.rows))
        _style(ax)
    ax1.set(title="Completion length per step", ylabel="tokens")
    ax2.set(title="Truncation and EOS rate", ylabel="fraction of rollouts", ylim=(-0.05, 1.05))
    ax3.set(title="Length control: remedy strengths and error", xlabel="step", ylabel="strength / error")
    return _save(plt, fig, out / "length.png", drawn)


def plot_heldout(pairs: list[BeforeAfter], out: Path) -> Optional[Path]:
    """One small panel per before/after pair (their scales differ)."""
    plt = _pyplot()
    pairs = [p for p in pairs if p.label.rsplit("/", 1)[-1] not in TABLE_ONLY]
    cols = min(4, max(1, len(pairs)))
    rows = max(1, math.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, p in zip(axes.flat, pairs):
        bars = ax.bar(["before", "after"], [p.before, p.after], color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        if p.teacher is not None:
            ax.axhline(p.teacher, color="tab:red", linestyle="--", label=f"teacher {p.teacher:.3g}")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(p.label, fontsize=10)
        ax.margins(y=0.15)
        if p.before == p.after == 0:
            ax.set_ylim(0, 1)  # else matplotlib centres an empty axis on 0
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.suptitle("Held-out metrics before and after training")
    return _save(plt, fig, out / "heldout.png", bool(pairs))


def _save(plt: Any, fig: Any, path: Path, drawn: bool) -> Optional[Path]:
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


# ------------------------------------------------------------------ report.md
def _cfg(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _config_section(config: dict) -> list[str]:
    if not config:
        return ["(no config.json)"]
    return ["| key | value |", "|---|---|"] + [
        f"| `{k}` | {'zoo model' if v is None and k.endswith('.path') else v} |"
        for k in CONFIG_KEYS if (v := _cfg(config, k)) is not None or k.endswith(".path")]


def _pairs_section(summary: dict, pairs: list[BeforeAfter]) -> list[str]:
    if not pairs:
        return ["(no before/after metrics in summary.json)"]
    out = ["| metric | before | after | change | teacher |", "|---|---|---|---|---|"]
    for p in pairs:
        teacher = "" if p.teacher is None else f"{p.teacher:.4g}"
        out.append(f"| {p.label} | {p.before:.4g} | {p.after:.4g} | {p.after - p.before:+.4g} | {teacher} |")
    return out


def _phases_section(rows: list[dict]) -> list[str]:
    means = {k: sum(v) / len(v) for k in PHASES if (v := series(rows, k)[1])}
    if not means:
        return ["(no timings in metrics.jsonl)"]
    step = means.get("time/step")
    out = ["| phase | mean seconds | share of a step |", "|---|---|---|"]
    for k, v in means.items():
        share = f"{v / step:.0%}" if step and k != "time/step" else ""
        out.append(f"| {k.split('/')[1]} | {v:.3f} | {share} |")
    return out


def _training_section(rows: list[dict]) -> list[str]:
    steps = [r["step"] for r in rows if "loss/rows_total" in r or "time/step" in r]
    _, kl = series(rows, "teacher/kl")
    out = [f"- steps logged: {len(steps)}" + (f" (last step {steps[-1]})" if steps else "")]
    if kl:
        out.append(f"- teacher KL: first {kl[0]:.4g}, last {kl[-1]:.4g}")
    for e in events(rows):
        out.append(f"- length monitor, step {e['step']}: {e.get('condition')} -> {e.get('state')} "
                   f"({e.get('reason', '')})")
    return out


def render_markdown(rec: RunRecord, pairs: list[BeforeAfter], plots: list[Path]) -> str:
    s = rec.summary
    head = [f"# opd run report: {rec.path.name}", ""]
    if _is_number(s.get("wall_seconds")) or _is_number(s.get("total_seconds")):
        head += [f"Wall time {s.get('total_seconds', s.get('wall_seconds')):.0f} s.", ""]
    parts = [("Config", _config_section(rec.config)), ("Held-out, before and after", _pairs_section(s, pairs)),
             ("Mean seconds per phase", _phases_section(rec.rows)), ("Training", _training_section(rec.rows)),
             ("Plots", [f"![{p.stem}]({p.name})" for p in plots] or ["(nothing to plot)"])]
    body = [line for title, lines in parts for line in (f"## {title}", "", *lines, "")]
    return "\n".join(head + body)


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and report.md into `run_dir`; returns the report's path."""
    rec = load_run(run_dir)
    pairs = before_after_pairs(rec.summary)
    plots = [p for p in (plot_training(rec, rec.path), plot_length(rec, rec.path),
                         plot_heldout(pairs, rec.path)) if p is not None]
    out = rec.path / "report.md"
    out.write_text(render_markdown(rec, pairs, plots))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="opd-report", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory (metrics.jsonl, summary.json, config.json)")
    ap.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                    help="rank these runs by final quality and early signals (opd/compare.py)")
    ap.add_argument("--early-steps", type=int, default=5, help="N: the early window, steps 1..N")
    ap.add_argument("--out", help="where compare.md/json/png go (default: the runs' common parent)")
    args = ap.parse_args(argv)
    if args.compare:
        _compare_main(ap, args)
        return
    if not args.run_dir:
        ap.error("give a RUN_DIR, or --compare RUN_DIR...")
    try:
        out = write_report(args.run_dir)
    except FileNotFoundError as e:
        ap.exit(2, f"opd-report: {e}\n")
    print(f"wrote {out} and {', '.join(p.name for p in sorted(out.parent.glob('*.png')))}")


def _compare_main(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import os

    from opd.compare import render_markdown, write_compare

    dirs = [d for d in args.compare if Path(d).is_dir()]
    out = args.out or os.path.commonpath([str(Path(d).resolve()) for d in dirs] or ["."])
    if len(dirs) == 1 and not args.out:
        out = str(Path(dirs[0]).resolve().parent)
    try:
        result = write_compare(dirs, out, args.early_steps)
    except FileNotFoundError as e:
        ap.exit(2, f"opd-report: {e}\n")
    print(render_markdown(result, args.early_steps))
    if result["skipped"]:
        print(f"not finished (no summary.json), left out: {', '.join(result['skipped'])}")
    print(f"wrote {out}/compare.md, compare.json, compare.png")


if __name__ == "__main__":
    main()
