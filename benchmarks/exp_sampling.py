"""Sampling settings that prevent loops: a grid over the rollouts' temperature, top-p, top-k and
repetition penalty on the real pair, each run from the same start for the same budget.

    .venv/bin/python benchmarks/exp_sampling.py zoo_dir=/tmp/zoo               # 24 runs, 8 steps each
    .venv/bin/python benchmarks/exp_sampling.py --steps 4 --temperature 1.0 --top-p 1.0 zoo_dir=/tmp/zoo

Every run is `experiment=smollm2_cpu` (its loss, length control and batch) with one cell of
the grid as `rollout.*`. Reported per run, from its held-out evaluation before and after:
repetition, truncation and EOS of plain T=1 samples (`sampled/`, what training did to the
model), of greedy answers, and of samples drawn with the cell's own settings (`configured/`,
what a user sampling with them sees); the KL to the teacher; and over the training steps, the
sampler/learner mismatch (`is/ratio_mean`, `is/clip_frac`, `is/kl_k3`: how far the
processed sampling distribution is from the student's own, which the importance correction
has to carry) and the training rollouts' repetition and truncation. JSON goes to
benchmarks/results/exp_sampling-<time>.json, rewritten after every run; `--resume FILE`
skips the cells already in FILE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

HELDOUT_KEYS = ("kl", "nll_teacher_greedy", "sampled/repetition_frac", "sampled/truncated_frac",
                "sampled/eos_frac", "greedy/repetition_frac", "greedy/truncated_frac",
                "configured/repetition_frac", "configured/truncated_frac", "configured/eos_frac")
TRAIN_KEYS = ("is/ratio_mean", "is/clip_frac", "is/kl_k3", "length/repetition_frac",
              "length/truncated_frac", "length/eos_frac", "format/bad_frac", "time/step")


def cell_name(c: dict) -> str:
    return (f"T={c['temperature']} top_p={c['top_p']} top_k={c['top_k']} "
            f"rep={c['repetition_penalty']}")


def means(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Mean of each key over the rows that have it (None where none has)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def run_cell(c: dict, steps: int, root: Path, extra: list[str]) -> dict:
    """Train one cell of the grid; its held-out views and its training-step means."""
    from opd.config import load_config
    from opd.train import run_training

    run_dir = root / "-".join(f"{k}{v}" for k, v in c.items())
    over = ["experiment=smollm2_cpu", f"steps={steps}", "eval_every=0", "checkpoint_every=0",
            f"run_dir={run_dir}"] + [f"rollout.{k}={v}" for k, v in c.items()]
    summary = run_training(load_config(over + extra))
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [l for l in lines if "length/truncated_frac" in l]
    ev = summary.get("eval", {})
    # the plain views do not depend on the cell before training: `configured/` falls back to them
    views = {k: {m: v.get(m, v.get(m.replace("configured/", "sampled/"))) for m in HELDOUT_KEYS}
             for k, v in ev.items() if k in ("before", "after")}
    return {"cell": c, "name": cell_name(c), "steps": steps, "heldout": views,
            "teacher": {m: ev.get("teacher", {}).get(m) for m in HELDOUT_KEYS if "configured" not in m},
            "train_mean": means(steps_m, TRAIN_KEYS), "train_last3": means(steps_m[-3:], TRAIN_KEYS),
            "starved_steps": summary.get("starved_steps", 0), "wall_seconds": summary["wall_seconds"]}


def print_table(rows: list[dict]) -> None:
    cols = [("configured/repetition_frac", "rep(cfg)"), ("configured/truncated_frac", "trunc(cfg)"),
            ("configured/eos_frac", "eos(cfg)"), ("sampled/repetition_frac", "rep(T=1)"),
            ("greedy/repetition_frac", "rep(gr)"), ("kl", "KL")]
    print(f"\n{'cell':40s} " + " ".join(f"{n:>11s}" for _, n in cols)
          + f" {'is/ratio':>8s} {'is/clip':>8s}   (held-out before>after; training means)")
    for r in rows:
        b, a = r["heldout"].get("before", {}), r["heldout"].get("after", {})
        cells = " ".join(f"{_f(b.get(k))}>{_f(a.get(k))}" for k, _ in cols)
        t = r["train_mean"]
        print(f"{r['name']:40s} {cells} {_f(t['is/ratio_mean']):>8s} {_f(t['is/clip_frac']):>8s}")


def _f(v) -> str:
    return "  -  " if v is None else f"{v:5.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--temperature", type=float, nargs="*", default=[0.7, 1.0])
    ap.add_argument("--top-p", type=float, nargs="*", default=[0.9, 1.0])
    ap.add_argument("--top-k", type=int, nargs="*", default=[40, -1])
    ap.add_argument("--repetition-penalty", type=float, nargs="*", default=[1.0, 1.1, 1.2])
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None, help="a JSON of this script: skip its cells")
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.run_io import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.resume or args.out or f"benchmarks/results/exp_sampling-{stamp}.json")
    rows = json.loads(out.read_text())["rows"] if args.resume else []
    done = {r["name"] for r in rows}
    grid = [dict(temperature=t, top_p=p, top_k=k, repetition_penalty=r) for t, p, k, r in
            itertools.product(args.temperature, args.top_p, args.top_k, args.repetition_penalty)]
    root = Path(f"runs/exp_sampling-{stamp}")
    for c in grid:
        if cell_name(c) in done:
            continue
        rows.append(run_cell(c, args.steps, root, extra))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"experiment": "exp_sampling", "args": vars(args), "extra_overrides": extra,
                                   "rows": rows, "environment": environment()}, indent=2, default=str))
        print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
