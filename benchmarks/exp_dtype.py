"""bf16 against fp32 on the real pair: `experiment=smollm2_cpu`'s full run at each dtype and
seed, with held-out quality before and after, seconds per phase and the sampler/learner
mismatch.

    .venv/bin/python benchmarks/exp_dtype.py --seeds 0 1 zoo_dir=/tmp/zoo
    .venv/bin/python benchmarks/exp_dtype.py --table benchmarks/results/exp_dtype-smollm2.json

A dtype sets the learner's autocast, the teacher's and the engines' weights together
(`student.dtype`, `teacher.dtype`, `rollout.dtype`). A seed sets the prompt order and the
sampling seed (`seed`, `rollout.seed`). No evaluation runs between start and end. Any other
argument is a config override for every run; `--root` keeps the run directories, and a run
whose summary.json exists there is read instead of run again.

JSON (`--out`, default benchmarks/results/exp_dtype-<time>.json): the arguments, the
environment, per run its config, held-out figures, the medians and spreads of step, phase
and `is/*` metrics; per dtype the range of each held-out figure over seeds; and whether every
bf16 figure lies within fp32's seed range.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_lora import spread  # noqa: E402  (median and percentiles of a per-step series)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MISMATCH = ("is/ratio_mean", "is/clip_frac")
HELDOUT = ("kl", "nll_teacher_greedy", "accuracy/greedy", "sampled/truncated_frac", "greedy/truncated_frac",
           "sampled/eos_frac", "greedy/repetition_frac")


def run(root: Path, dtype: str, seed: int, extra: list[str]) -> Path:
    """Train one (dtype, seed) run unless its summary exists; its run directory."""
    from opd.config import load_config
    from opd.train import run_training

    run_dir = root / f"{dtype}-seed{seed}"
    if not (run_dir / "summary.json").is_file():
        d = DTYPES[dtype]
        run_training(load_config(["experiment=smollm2_cpu", *extra, "eval_every=0", f"run_dir={run_dir}",
                                  f"seed={seed}", f"rollout.seed={seed}", f"student.dtype={d}",
                                  f"teacher.dtype={d}", f"rollout.dtype={d}"]))
    return run_dir


def fp32_eval(model: Path, cached: Path, extra: list[str]) -> dict:
    """`opd-eval` of `model` in fp32 engines at the default evaluation seed, so that the runs of
    both dtypes and every seed are judged alike; the held-out view, cached in `cached`."""
    if not cached.is_file():
        cmd = [str(Path(sys.executable).parent / "opd-eval"), "experiment=smollm2_cpu", *extra,
               f"student.path={model}", "student.dtype=float32", "teacher.dtype=float32", "rollout.dtype=float32"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        views = json.loads(next(l for l in reversed(out.splitlines()) if l.startswith('{"teacher"')))
        cached.write_text(json.dumps({"model": str(model), "command": " ".join(cmd), "view": views["before"]},
                                     indent=2))
    return json.loads(cached.read_text())["view"]


def describe(run_dir: Path, dtype: str, seed: int) -> dict:
    """A finished run's held-out figures, per-phase seconds and mismatch."""
    from opd.report import PHASES

    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "time/step" in s]
    per_step = {k: spread([s[k] for s in steps if k in s]) for k in PHASES + MISMATCH}
    return {"dtype": dtype, "seed": seed, "run_dir": str(run_dir),
            "config": json.loads((run_dir / "config.json").read_text()),
            "heldout": summary.get("eval", {}), "after_own_dtype": summary["eval"]["after"],
            "student_path": summary["student_path"], "steps": summary.get("steps_done"),
            "wall_seconds": summary.get("wall_seconds"), "per_step": per_step}


def seed_ranges(rows: list[dict], view: str) -> dict:
    """Per dtype, the [min, max] over seeds of each held-out figure of `view` (a row's key)."""
    out = {}
    for dtype in {r["dtype"] for r in rows if view in r}:
        after = [r[view] for r in rows if r["dtype"] == dtype]
        out[dtype] = {k: [min(a[k] for a in after), max(a[k] for a in after)] for k in HELDOUT}
    return out


def within_fp32(ranges: dict) -> dict | None:
    """For each held-out figure, whether bf16's seed range lies inside fp32's."""
    if not {"fp32", "bf16"} <= ranges.keys():
        return None
    f, b = ranges["fp32"], ranges["bf16"]
    return {k: f[k][0] <= b[k][0] and b[k][1] <= f[k][1] for k in HELDOUT}


def markdown_table(result: dict) -> str:
    """docs/results.md's table: one row per run (held-out after training, in fp32 engines at
    one evaluation seed), then the step-time ratio and the range verdicts."""
    lines = ["| dtype | seed | KL | NLL | accuracy | truncated (sampled) | repetitive (greedy) | KL, own dtype "
             "| s/step | learn s | `is/clip_frac` |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    start = result.get("start_fp32_eval")
    rows = ([("start", "-", start, None, None)] if start else []) + [
        (r["dtype"], r["seed"], r.get("after_fp32_eval"), r["after_own_dtype"], r["per_step"]) for r in result["runs"]]
    for dtype, seed, ev, own, p in rows:
        f = (lambda k, fmt: "-" if ev is None else format(ev[k], fmt))  # noqa: E731
        lines.append(f"| {dtype} | {seed} | {f('kl', '.2f')} | {f('nll_teacher_greedy', '.2f')} | "
                     f"{f('accuracy/greedy', '.3f')} | {f('sampled/truncated_frac', '.2f')} | "
                     f"{f('greedy/repetition_frac', '.2f')} | {'-' if own is None else format(own['kl'], '.2f')} | "
                     + ("- | - | - |" if p is None else f"{p['time/step']['median']:.2f} | "
                        f"{p['time/learn']['median']:.2f} | {p['is/clip_frac']['median']:.3f} |"))
    if result.get("step_speedup") is not None:
        lines += ["", f"bf16 step speed-up (median of the per-seed medians): {result['step_speedup']:.2f}x"]
    for view in ("after_fp32_eval", "after_own_dtype"):
        verdict = result.get(f"bf16_within_fp32_range_{view}")
        if verdict:
            lines.append(f"bf16 within fp32's seed range ({view}): " + ", ".join(
                f"{k} {'yes' if ok else 'no'}" for k, ok in verdict.items()))
    return "\n".join(lines)


def step_speedup(rows: list[dict]) -> float | None:
    """fp32's seconds per step over bf16's: the median over seeds of each run's median step."""
    med = {d: [r["per_step"]["time/step"]["median"] for r in rows if r["dtype"] == d] for d in DTYPES}
    if not all(med.values()):
        return None
    return statistics.median(med["fp32"]) / statistics.median(med["bf16"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--root", default=None, help="run directories (default runs/exp_dtype-<time>)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, help="print the markdown table of this JSON, run nothing")
    args, extra = ap.parse_known_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.run_io import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(args.root or f"runs/exp_dtype-{stamp}")
    out = Path(args.out or f"benchmarks/results/exp_dtype-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [describe(run(root, dtype, seed, extra), dtype, seed)
            for seed in args.seeds for dtype in args.dtypes]  # seed-major: a cut-short sweep holds both dtypes
    start = fp32_eval(Path(rows[0]["student_path"]), root / "start_fp32_eval.json", extra)
    for r in rows:  # after training, on a quiet machine: the runs' step times are not disturbed
        ckpt = sorted(Path(r["run_dir"], "checkpoints").glob("step-*"))[-1]
        r["after_fp32_eval"] = fp32_eval(ckpt, Path(r["run_dir"], "fp32_eval.json"), extra)
    result = {"experiment": "exp_dtype", "command": " ".join(sys.argv), "args": vars(args),
              "extra_overrides": extra, "environment": environment(), "start_fp32_eval": start, "runs": rows,
              "step_speedup": step_speedup(rows)}
    for view in ("after_own_dtype", "after_fp32_eval"):
        ranges = seed_ranges(rows, view)
        result[f"seed_ranges_{view}"] = ranges
        result[f"bf16_within_fp32_range_{view}"] = within_fp32(ranges)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
