"""`opd-report --compare RUN_DIR...`: rank a sweep's runs by final quality and by early signals.

    opd-report --compare multirun/addition-20261122-060000/* --early-steps 5

For each run: its label (the config keys that differ between the runs), the mean gradient
norm and loss over steps 1..N (metrics.jsonl), the held-out KL and accuracy after training
(summary.json `eval.after`), whether it was stopped early, and its rank by each. Below the
table, Spearman rank correlations between each early signal and each final quality, with the
sign the SFT finding predicts (lower early gradient norm and higher early loss go with a
better model: lower KL, higher accuracy). Writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from opd.sweep import QUALITIES, QUALITY_BETTER, SIGNALS, RunSignals, read_run, spearman

# the sign of rho(signal, quality) that the SFT finding predicts
PREDICTED = {("grad_norm", "kl"): "+", ("grad_norm", "accuracy"): "-",
             ("loss", "kl"): "-", ("loss", "accuracy"): "+"}
IGNORED_KEYS = ("run_dir", "resume", "early_stop.sweep_dir")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def labels(configs: Sequence[dict], fallback: Sequence[str]) -> list[str]:
    """Per run, `key=value` of the config keys whose values differ between the runs."""
    flats = [_flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f if k not in IGNORED_KEYS})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    out = [" ".join(f"{k.split('.')[-1]}={f.get(k)}" for k in varying) for f in flats]
    return [o or fb for o, fb in zip(out, fallback)]


def rank(values: Sequence[float], better: str) -> list[Optional[int]]:
    """1 = best; NaN values get no rank."""
    idx = [i for i, v in enumerate(values) if math.isfinite(v)]
    idx.sort(key=lambda i: values[i] if better == "lower" else -values[i])
    out: list[Optional[int]] = [None] * len(values)
    for r, i in enumerate(idx, start=1):
        out[i] = r
    return out


def compare(runs: Sequence[RunSignals], names: Sequence[str]) -> dict:
    """The comparison as plain data: rows (one per run) and correlations."""
    rows = [{"run": n, "path": r.path, "stopped_early": r.stopped_early,
             **{f"early_{s}": r.early[s] for s in SIGNALS}, "early_steps": r.early["steps"],
             **{f"final_{q}": r.quality[q] for q in QUALITIES}} for r, n in zip(runs, names)]
    ranks = {f"rank_{q}": rank([x[f"final_{q}"] for x in rows], QUALITY_BETTER[q]) for q in QUALITIES}
    # the SFT finding: lower early gradient norm, higher early loss = better
    ranks["rank_early_grad_norm"] = rank([x["early_grad_norm"] for x in rows], "lower")
    ranks["rank_early_loss"] = rank([x["early_loss"] for x in rows], "higher")
    for i, x in enumerate(rows):
        x.update({k: v[i] for k, v in ranks.items()})
    # correlations over runs that ran to the end (a stopped run's final quality is not final)
    done = [x for x in rows if not x["stopped_early"]]
    corr = [{"signal": s, "quality": q, "spearman": spearman([x[f"early_{s}"] for x in done],
                                                             [x[f"final_{q}"] for x in done]),
             "predicted_sign": PREDICTED[(s, q)], "n": len(done)} for s in SIGNALS for q in QUALITIES]
    for c in corr:
        rho = c["spearman"]
        c["agrees"] = None if not math.isfinite(rho) else (rho > 0) == (c["predicted_sign"] == "+")
    return {"rows": sorted(rows, key=lambda x: (x["rank_kl"] is None, x["rank_kl"] or 0)),
            "correlations": corr}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def render_markdown(result: dict, early_steps: int) -> str:
    cols = ["run", "final_kl", "rank_kl", "final_accuracy", "rank_accuracy", "early_grad_norm",
            "rank_early_grad_norm", "early_loss", "rank_early_loss", "stopped_early"]
    lines = [f"# Sweep comparison ({len(result['rows'])} runs, early window: steps 1-{early_steps})", "",
             "Ranks: 1 = best. Final quality: held-out KL (lower) and greedy accuracy (higher) after "
             "training. Early signals ranked as the SFT finding would: lower gradient norm, higher loss.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in result["rows"]]
    lines += ["", "## Spearman rank correlation, early signal vs final quality (finished runs)", "",
              "| signal | quality | rho | predicted sign | agrees | n |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['signal']} | {c['quality']} | {_fmt(c['spearman'])} | {c['predicted_sign']} | "
              f"{_fmt(c['agrees'])} | {c['n']} |" for c in result["correlations"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> Optional[Path]:
    """Final KL against each early signal, one point per run, labelled."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rho = {(c["signal"], c["quality"]): c["spearman"] for c in result["correlations"]}
    for ax, s in zip(axes, SIGNALS):
        xs, ys = [r[f"early_{s}"] for r in rows], [r["final_kl"] for r in rows]
        ax.scatter(xs, ys, c=["tab:red" if r["stopped_early"] else "tab:blue" for r in rows])
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["run"], (x, y), fontsize=6, alpha=0.8)
        ax.set_xlabel(f"mean {s} over the early steps")
        ax.set_ylabel("held-out KL after training (lower is better)")
        ax.set_title(f"{s}: Spearman rho = {_fmt(rho[(s, 'kl')])}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _finite(obj: Any) -> Any:
    """NaN and infinities as null, so compare.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_compare(run_dirs: Sequence[str | Path], out_dir: str | Path, early_steps: int) -> dict:
    """Read the runs, write compare.md / compare.json / compare.png into `out_dir`; returns the
    result. Directories without summary.json (unfinished) are listed under `skipped`."""
    paths = [Path(p) for p in run_dirs]
    read = [(p, read_run(p, early_steps)) for p in paths]
    runs = [(p, r) for p, r in read if r is not None]
    if not runs:
        raise FileNotFoundError(f"no finished run (summary.json) among {[str(p) for p in paths]}")
    configs = [json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
               for p, _ in runs]
    result = compare([r for _, r in runs], labels(configs, [p.name for p, _ in runs]))
    result.update(early_steps=early_steps, skipped=[str(p) for p, r in read if r is None])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(render_markdown(result, early_steps))
    (out / "compare.json").write_text(json.dumps(_finite(result), indent=1, default=str))
    plot(result, out / "compare.png")
    return result
