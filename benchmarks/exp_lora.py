"""LoRA against the full fine-tune on the real pair: `experiment=smollm2_cpu` trained in full
and with LoRA adapters of each rank asked for, from the same start, seed and steps, under
the same length control; held-out quality before and after, learner memory, seconds per
step and weight-sync cost.

    .venv/bin/python benchmarks/exp_lora.py --ranks 16 zoo_dir=/tmp/zoo
    .venv/bin/python benchmarks/exp_lora.py --ranks 16 --full-run runs/<a finished full run> zoo_dir=/tmp/zoo
    .venv/bin/python benchmarks/exp_lora.py --ranks 16 --syncs merged adapter zoo_dir=/tmp/zoo

Every run is `benchmarks/exp_length.py`'s (GKD, `length=auto`, the given `--control`, no
evaluation between start and end); `--full-run` reuses a finished full fine-tune run with
those settings instead of training it again. Any other argument is a config override for
every run. JSON: benchmarks/results/exp_lora-<time>.json (the arguments, the environment,
per run its config, held-out figures, trained parameters, the learner's peak resident
memory, the medians and spreads of step, learner and sync seconds, and the MB per sync),
and the LoRA runs' share of the full fine-tune's KL reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_length import before_after_cells, run_one  # noqa: E402  (the same run, the same overrides)

KEYS = [("kl", "KL"), ("nll_teacher_greedy", "NLL"), ("accuracy/greedy", "acc"),
        ("sampled/truncated_frac", "trunc"), ("sampled/repetition_frac", "rep"),
        ("greedy/repetition_frac", "rep(gr)")]


def spread(values: list[float]) -> dict:
    """Median, 10th and 90th percentiles of a per-step series."""
    a = np.asarray(values, np.float64)
    if not len(a):
        return {"median": None, "p10": None, "p90": None, "n": 0}
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": int(len(a))}


def describe(run_dir: Path) -> dict:
    """What a finished run measured: held-out views, parameters, memory, times, sync size."""
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "time/step" in s]

    def series(key: str) -> list[float]:
        return [s[key] for s in steps if key in s]

    return {"run_dir": str(run_dir), "config": json.loads((run_dir / "config.json").read_text()),
            "heldout": summary.get("eval", {}), "trainable_params": summary.get("trainable_params"),
            "total_params": summary.get("total_params"), "wall_seconds": summary.get("wall_seconds"),
            "learner_peak_rss_mb": max(series("learner/peak_rss_mb"), default=None),
            "step_seconds": spread(series("time/step")), "learn_seconds": spread(series("time/learn")),
            "sync_seconds": spread(series("time/sync")), "sync_mb": spread(series("sync/mb"))}


def kl_reduction(row: dict) -> float:
    ev = row["heldout"]
    return (ev["before"]["kl"] - ev["after"]["kl"]) / ev["before"]["kl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="*", type=int, default=[16])
    ap.add_argument("--alpha-ratio", type=float, default=2.0, help="student.lora.alpha = ratio * r")
    ap.add_argument("--lr", type=float, default=None, help="the LoRA runs' optim.lr (default: the experiment's)")
    ap.add_argument("--syncs", nargs="*", choices=["merged", "adapter"], default=["merged"])
    ap.add_argument("--control", choices=["switch", "pi"], default="pi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-run", default=None, help="a finished full fine-tune run dir to reuse")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.run_io import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(f"runs/exp_lora-{stamp}")
    extra = ["experiment=smollm2_cpu"] + extra

    def train(name: str, overrides: list[str]) -> dict:
        run_one(None, "gkd", "auto", args.control, args.seed, None, root / name, extra + overrides)
        return describe(root / name / f"gkd-auto-{args.control}-seed{args.seed}")

    rows = {"full": describe(Path(args.full_run)) if args.full_run else train("full", [])}
    for r in args.ranks:
        for sync in args.syncs:
            lora = ["student.lora.enabled=true", f"student.lora.r={r}", f"student.lora.alpha={args.alpha_ratio * r:g}",
                    f"student.lora.sync={sync}"] + ([f"optim.lr={args.lr}"] if args.lr else [])
            rows[f"lora-r{r}-{sync}"] = train(f"lora-r{r}-{sync}", lora)
    full = kl_reduction(rows["full"])
    shares = {name: kl_reduction(row) / full for name, row in rows.items() if name != "full"}
    out = Path(args.out or f"benchmarks/results/exp_lora-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": "exp_lora", "args": vars(args), "extra_overrides": extra, "runs": rows,
                               "kl_reduction_share_of_full": shares, "environment": environment()},
                              indent=2, default=str))
    print_table(rows, shares)
    print(f"wrote {out}")


def print_table(rows: dict, shares: dict) -> None:
    head = " ".join(f"{n:>11s}" for _, n in KEYS)
    print(f"\n{'run':17s} {'trained':>9s} {'peak MB':>8s} {'s/step':>7s} {'sync s':>7s} {'sync MB':>8s} "
          f"{head} {'KL share':>8s}")
    for name, r in rows.items():
        cells = before_after_cells(r["heldout"], KEYS)
        share = f"{shares[name]:8.2f}" if name in shares else f"{'1':>8s}"
        print(f"{name:17s} {(r['trainable_params'] or 0) / 1e6:8.2f}M {r['learner_peak_rss_mb'] or 0:8.0f} "
              f"{r['step_seconds']['median'] or 0:7.2f} {r['sync_seconds']['median'] or 0:7.3f} "
              f"{r['sync_mb']['median'] or 0:8.1f} {cells} {share}")


if __name__ == "__main__":
    main()
