"""The default experiment over zoo builds and seeds: does `make run`'s recipe hold?

    .venv/bin/python benchmarks/exp_default.py                       # 2 tasks x 3 zoo seeds x 2 seeds
    .venv/bin/python benchmarks/exp_default.py --tasks addition --zoo-seeds 0 --seeds 0 optim.lr=3e-3
    .venv/bin/python benchmarks/exp_default.py --name grid --table     # the markdown table of a JSON

Each cell is one `opd-train` of conf/train.yaml (plus any overrides given here) with
`task=<task> zoo.seed=<z> seed=<s> rollout.seed=<s>`: another zoo build (the teacher's and
the student's initialisation and data order) and another training seed (prompt order, the
learner's RNG and the sampling seed). Its held-out figures come from the run's summary.json:

- the share of the greedy-accuracy gap that training closed,
  (after - before) / (teacher - before);
- held-out KL(student||teacher) before and after, and the share of it removed;
- the training loop's seconds (`wall_seconds`: steps, evaluations and checkpoints) and the
  whole run's (`total_seconds`: with the engines' start and the evaluation before training).

The JSON (benchmarks/results/exp_default-<name>.json) is rewritten after every cell, with
the config overrides, the environment, the zoo markers (SFT accuracy, weights checksum), every
cell, and the worst and median cell; `--root` keeps the run directories, and a cell whose
summary.json exists there is read instead of run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def run_cell(root: Path, task: str, zoo_seed: int, seed: int, zoo_dir: str,
             overrides: list[str]) -> Path:
    """Run one cell (unless its summary exists) and return its run directory."""
    run_dir = root / f"{task}-zoo{zoo_seed}-seed{seed}"
    if not (run_dir / "summary.json").is_file():
        cmd = [str(VENV_BIN / "opd-train"), f"task={task}", f"zoo.seed={zoo_seed}", f"seed={seed}",
               f"rollout.seed={seed}", f"zoo_dir={zoo_dir}", f"run_dir={run_dir}", *overrides]
        print("+", " ".join(cmd), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "console.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def gap_closed(before: float, after: float, teacher: float) -> float | None:
    return None if teacher <= before else (after - before) / (teacher - before)


def _share(x: float | None) -> str:
    return "- (no gap: the student starts at the teacher)" if x is None else f"{x:.2f}"


def read_cell(run_dir: Path, task: str, zoo_seed: int, seed: int) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    kl = {k: s["eval"][k]["kl"] for k in ("before", "after")}
    return {
        "task": task, "zoo_seed": zoo_seed, "seed": seed, "run_dir": str(run_dir),
        "teacher_accuracy": s["teacher"], "accuracy_before": s["student_before"],
        "accuracy_after": s["student_after"],
        "gap_closed": gap_closed(s["student_before"], s["student_after"], s["teacher"]),
        "kl_before": kl["before"], "kl_after": kl["after"],
        "kl_removed": 1 - kl["after"] / kl["before"] if kl["before"] > 0 else None,
        "train_seconds": s["wall_seconds"], "total_seconds": s["total_seconds"],
        "steps": s["steps_done"], "student_path": s["student_path"], "teacher_path": s["teacher_path"],
    }


def zoo_markers(cells: list[dict]) -> dict:
    from opd.zoo import zoo_info

    out = {}
    for c in cells:
        for role in ("teacher", "student"):
            path = c[f"{role}_path"]
            info = zoo_info(path) or {}
            out[path] = {k: info.get(k) for k in ("heldout_exact_match", "sft_steps", "weights_sha256")}
    return out


def aggregate(cells: list[dict]) -> dict:
    """Worst and median cell by gap closed, and the spread of the other figures."""
    done = [c for c in cells if c["gap_closed"] is not None]
    if not done:
        return {}
    worst = min(done, key=lambda c: c["gap_closed"])
    gaps = [c["gap_closed"] for c in done]
    return {
        "cells": len(done), "worst": worst, "median_gap_closed": statistics.median(gaps),
        "min_gap_closed": min(gaps), "max_gap_closed": max(gaps),
        "all_at_least_0.9": all(g >= 0.9 for g in gaps),
        "max_train_seconds": max(c["train_seconds"] for c in done),
        "median_train_seconds": statistics.median(c["train_seconds"] for c in done),
        "median_kl_removed": statistics.median(c["kl_removed"] for c in done),
        "min_kl_removed": min(c["kl_removed"] for c in done),
    }


def markdown_table(result: dict) -> str:
    """docs/results.md's table of the grid, and its worst and median cell, from the JSON."""
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    lines = ["| task | `zoo.seed` | seed | teacher | student before | after | gap closed | KL before → after "
             "| training (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        lines.append(f"| {c['task']} | {c['zoo_seed']} | {c['seed']} | {c['teacher_accuracy']:.3f} | "
                     f"{c['accuracy_before']:.3f} | {c['accuracy_after']:.3f} | {pct(c['gap_closed'])} | "
                     f"{c['kl_before']:.2f} → {c['kl_after']:.2f} | {c['train_seconds']:.0f} |")
    s = result["summary"]
    w = s["worst"]
    lines += ["", f"Worst cell: {w['task']}, `zoo.seed={w['zoo_seed']}`, `seed={w['seed']}`: "
              f"{pct(s['min_gap_closed'])} of the gap; median cell {pct(s['median_gap_closed'])}; every cell "
              f">= 90%: {'yes' if s['all_at_least_0.9'] else 'no'}; training {s['median_train_seconds']:.0f} s "
              f"median, {s['max_train_seconds']:.0f} s at most."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["addition", "reversal"])
    ap.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--zoo-dir", default=os.environ.get("OPD_ZOO_DIR", str(Path.home() / ".cache/opd")))
    ap.add_argument("--root", default="runs/exp_default")
    ap.add_argument("--name", default="grid")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the JSON, run nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides for every cell (key=value)")
    args = ap.parse_args()
    from opd.run_io import environment

    root, cells = Path(args.root), []
    out = Path(f"benchmarks/results/exp_default-{args.name}.json")
    if args.table:
        print(markdown_table(json.loads(out.read_text())))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for zoo_seed in args.zoo_seeds:
            for seed in args.seeds:
                run_dir = run_cell(root, task, zoo_seed, seed, args.zoo_dir, args.overrides)
                cells.append(read_cell(run_dir, task, zoo_seed, seed))
                c = cells[-1]
                print(f"{task:9s} zoo {zoo_seed} seed {seed}: accuracy {c['accuracy_before']:.3f} -> "
                      f"{c['accuracy_after']:.3f} (teacher {c['teacher_accuracy']:.3f}), gap closed "
                      f"{_share(c['gap_closed'])}, KL {c['kl_before']:.2f} -> {c['kl_after']:.2f}, "
                      f"train {c['train_seconds']:.0f}s", flush=True)
                result = {"command": " ".join(sys.argv), "overrides": args.overrides,
                          "grid": {"tasks": args.tasks, "zoo_seeds": args.zoo_seeds, "seeds": args.seeds},
                          "environment": environment(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "cells": cells, "summary": aggregate(cells), "zoo": zoo_markers(cells)}
                out.write_text(json.dumps(result, indent=2))
    s = result["summary"]
    print(f"worst cell: {s['worst']['task']} zoo {s['worst']['zoo_seed']} seed {s['worst']['seed']}, "
          f"gap closed {s['min_gap_closed']:.2f}; median {s['median_gap_closed']:.2f}; "
          f"longest training {s['max_train_seconds']:.0f}s -> {out}")


if __name__ == "__main__":
    main()
