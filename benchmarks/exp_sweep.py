"""Test the SFT early-signal finding on on-policy distillation: a learning rate x batch sweep.

    .venv/bin/opd-train -m steps=30 eval_every=0 checkpoint_every=0 \\
        'optim.lr=3e-4,1e-3,3e-3' 'rollout.prompts_per_step=16,32,64' hydra.sweep.dir=SWEEP
    .venv/bin/python benchmarks/exp_sweep.py SWEEP --early-steps 5

Reads every finished run under SWEEP (`opd-report --compare`, opd/compare.py), and writes
JSON to benchmarks/results/exp_sweep-<name>-<time>.json: the ranked table, the Spearman
correlations between early gradient norm / loss (steps 1..N) and final held-out quality, the
best run, whether the largest batch with the lowest learning rate won, the early-stop rule
replayed on the recorded histories (tolerance 0.1), and the environment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cell(rows: list[dict], lr: float, batch: int) -> dict | None:
    """The row of the run with this learning rate and batch (labels read `lr=... prompts_per_step=...`)."""
    for r in rows:
        parts = dict(p.split("=", 1) for p in r["run"].split() if "=" in p)
        if float(parts.get("lr", "nan")) == lr and int(parts.get("prompts_per_step", -1)) == batch:
            return r
    return None


def large_batch_low_lr(rows: list[dict]) -> dict:
    """Where the (largest batch, lowest LR) run ranks by final KL, and which run is best."""
    grid = [dict(p.split("=", 1) for p in r["run"].split() if "=" in p) for r in rows]
    lrs = sorted({float(g["lr"]) for g in grid if "lr" in g})
    batches = sorted({int(g["prompts_per_step"]) for g in grid if "prompts_per_step" in g})
    corner = cell(rows, lrs[0], batches[-1]) if lrs and batches else None
    best = min((r for r in rows if r["rank_kl"] is not None), key=lambda r: r["rank_kl"])
    return {"lowest_lr": lrs[0] if lrs else None, "largest_batch": batches[-1] if batches else None,
            "corner_rank_kl": corner["rank_kl"] if corner else None,
            "corner_rank_accuracy": corner["rank_accuracy"] if corner else None,
            "best_by_kl": best["run"], "runs": len(rows)}


def replay_triage(dirs: list[Path], n: int, signal: str, better: str, tolerance: float) -> list[dict]:
    """The early-stop rule replayed on the recorded histories, jobs in launch order, each
    against the best finished run before it (what `early_stop.sweep_dir=auto` would have
    done); a replayed stop marks the run as stopped for the later ones."""
    from opd import sweep as S
    from opd.run_io import read_metrics

    done, out = [], []
    for d in sorted(dirs, key=lambda p: int(p.name.split("-")[0])):
        run = S.read_run(d, n)
        if run is None:
            continue
        best = S.best_run(done, "kl")
        dec = S.early_stop_decision(read_metrics(d), n, signal, better,
                                    reference=best.early[signal] if best else None, tolerance=tolerance)
        stop = bool(dec and dec.stop)
        out.append({"run": d.name, "stop": stop, "final_kl": run.quality["kl"]})
        done.append(S.RunSignals(run.path, run.early, run.quality, stop))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--early-steps", type=int, default=5)
    ap.add_argument("--name", default="toy")
    ap.add_argument("--out")
    args = ap.parse_args()
    from opd.compare import _finite, render_markdown, write_compare
    from opd.run_io import environment

    dirs = sorted(p for p in Path(args.sweep_dir).iterdir() if p.is_dir())
    result = write_compare(dirs, args.sweep_dir, args.early_steps)
    config = json.loads((dirs[0] / "config.json").read_text()) if dirs else {}
    out = Path(args.out or f"benchmarks/results/exp_sweep-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"sweep_dir": args.sweep_dir, "early_steps": args.early_steps, "steps": config.get("steps"),
               "task": (config.get("task") or {}).get("name"), "loss": config.get("loss"),
               "optim": config.get("optim"), "large_batch_low_lr": large_batch_low_lr(result["rows"]),
               "replayed_triage": {f"{sig}-{better}": replay_triage(dirs, args.early_steps, sig, better, 0.1)
                                   for sig, better in (("grad_norm", "lower"), ("loss", "lower"),
                                                       ("loss", "higher"))},
               **result, "environment": environment()}
    out.write_text(json.dumps(_finite(summary), indent=1, default=str))
    print(render_markdown(result, args.early_steps))
    print(json.dumps(summary["large_batch_low_lr"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
