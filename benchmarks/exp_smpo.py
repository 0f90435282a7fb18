"""SMPO's claim on the real pair: can the preference loss collapse EOS, and do its stabilisers
prevent it? One run per variant, each from the same start, one after another.

    .venv/bin/python benchmarks/exp_smpo.py                        # every variant, 6 steps each
    .venv/bin/python benchmarks/exp_smpo.py --steps 10 --variants none exclude
    .venv/bin/python benchmarks/exp_smpo.py --root runs/exp_smpo-<time>   # reuse finished variants

The start is a model that stops: SmolLM2-135M-Instruct itself as the student (its teacher is
the same model, so KL to the teacher starts at 0 and only the preference loss moves it).
The loss is the SMPO preference term alone (`loss=smpo_only`, no distillation), pairs ranked
by the teacher's mean log-prob per token, under the conditions that the SMPO authors name
for EOS collapse: the unbounded sigmoid (DPO/SimPO) form, a high beta and learning rate, and
with the `none` variant no stabiliser at all. Each other variant turns one stabiliser on.

Recorded every step (train rollouts): EOS rate, truncation and repetition
(`length/eos_frac`, `length/truncated_frac`, `length/repetition_frac`) and, on the learner,
the rejected EOS log-prob, the minimum rejected token log-prob and the share of rejected
samples that end in EOS. At the end, the held-out view of `opd/evaluation.py` (KL to the
teacher, EOS / truncation / repetition of sampled and greedy completions, accuracy).
"EOS collapsed at step s": the EOS rate of the train rollouts is under --collapse-eos from
step s to the end, for two steps at least. JSON goes to benchmarks/results/exp_smpo-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from exp_length import before_after_cells, recovery_step  # benchmarks/: the script's own folder

# The collapse attempt: no stabiliser, no SFT amortization, the length monitor's choice of
# rejected samples off. Every variant below starts from these keys and changes some.
BASE = ["loss.smpo.eos_protection=none", "loss.smpo.lower_percentile=null",
        "loss.smpo.min_log_prob=null", "loss.smpo.sft_coef=0", "loss.smpo.prefer_bad_rejected=never"]
ALL = ["loss.smpo.eos_protection=exclude", "loss.smpo.lower_percentile=0.02", "loss.smpo.min_log_prob=-2.3"]
VARIANTS = {
    "none": [],                                              # the collapse attempt
    "exclude": ["loss.smpo.eos_protection=exclude"],
    "flip": ["loss.smpo.eos_protection=flip"],
    "winsor": ["loss.smpo.lower_percentile=0.02"],
    "floor": ["loss.smpo.min_log_prob=-2.3"],
    "all": ALL,

    "all+sft": ALL + ["loss.smpo.sft_coef=1.0"],             # every stabiliser and SFT
    "prefer-bad": ["loss.smpo.prefer_bad_rejected=always"],  # the length monitor's rejected choice
    "slb": ["loss.smpo.loss_type=smooth_lower_bound"],       # bounded loss: no push once z > 0
}
SERIES = ("length/eos_frac", "length/truncated_frac", "length/repetition_frac", "smpo/eos_logp_rejected",
          "smpo/min_logp_rejected", "smpo/rejected_eos_frac", "smpo/acc", "smpo/z_mean",
          "rollout/train_accuracy", "teacher/kl")


def run_variant(name: str, steps: int, root: Path, extra: list[str], tries: int = 3,
                min_gib: float = 6.0) -> Path:
    """Train one variant into root/name, unless a finished run is already there (a rerun
    with the same --root picks up where an interrupted sweep stopped); a failed attempt is
    retried once min_gib of memory is available. Returns the run's folder (checked by the caller)."""
    from opd.config import load_config
    from opd.train import run_training

    run_dir = root / name
    over = [f"steps={steps}", "eval_every=0", "checkpoint_every=0", f"run_dir={run_dir}"]
    for attempt in range(tries):
        if (run_dir / "summary.json").exists():
            break
        wait_for_memory(min_gib)
        shutil.rmtree(run_dir, ignore_errors=True)  # a failed attempt's partial metrics
        try:
            run_training(load_config(extra + BASE + over + VARIANTS[name]))  # the variant's keys win
        except Exception as e:  # on a shared machine: an actor killed for memory
            print(f"variant {name} attempt {attempt + 1} failed: {e}"[:300], flush=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1.6 GB each, not needed here
    return run_dir


def wait_for_memory(min_gib: float, poll_s: float = 15.0, max_s: float = 1800.0) -> None:
    """Start a run only when the machine has min_gib of memory available (shared machines)."""
    t0 = time.time()
    while time.time() - t0 < max_s:
        avail = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
        if avail / 2**20 >= min_gib:
            return
        time.sleep(poll_s)


def collapse_step(eos: list[float], threshold: float) -> int | None:
    """First step from which the EOS rate stays under `threshold` to the end, for two steps
    at least (a dip at the last step alone is not called a collapse); None: no collapse."""
    step = recovery_step(eos, threshold)
    return step if step is not None and step < len(eos) else None


def summarize(name: str, run_dir: Path, threshold: float) -> dict:
    """One variant's row: per-step series, when EOS collapsed, and the held-out view."""
    s = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [l for l in lines if "length/eos_frac" in l]
    series = {k: [l.get(k) for l in steps_m] for k in SERIES}
    return {"variant": name, "overrides": VARIANTS[name], "steps": len(steps_m),
            "eos_collapsed_at_step": collapse_step(series["length/eos_frac"], threshold),
            "eos_under_threshold_at_end": series["length/eos_frac"][-1] < threshold,
            "collapse_threshold": threshold, "series": series,
            "min_eos_logp_rejected": min((v for v in series["smpo/eos_logp_rejected"] if v), default=None),
            "min_logp_rejected": min((v for v in series["smpo/min_logp_rejected"] if v is not None), default=None),
            "heldout": s.get("eval", {}), "train_seconds": s["wall_seconds"], "run_dir": str(run_dir)}


def base_overrides(zoo_dir: str | None) -> list[str]:
    """The collapse attempt's setting, shared by every variant (see the module docstring)."""
    return ["experiment=smollm2_cpu", "loss=smpo_only", *([f"zoo_dir={zoo_dir}"] if zoo_dir else []),
            "teacher.logprobs=sampled", "teacher.backend=transformers", "length=off",
            "length.reference_prompts=0", "task.heldout_size=16", "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=40", "rollout.eval_max_new_tokens=40",
            "log_every=1", "loss.smpo.pair_score=teacher", "loss.smpo.loss_type=sigmoid",
            "loss.smpo.beta=5.0", "loss.smpo.margin=0.35", "loss.smpo.margin_ramp_steps=0",
            "optim.lr=3e-4", "optim.warmup_steps=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--collapse-eos", type=float, default=0.3,
                    help="EOS rate of the train rollouts under which EOS counts as collapsed")
    ap.add_argument("--zoo-dir", default=None, help="where the SmolLM2 pair is (default: zoo_dir)")
    ap.add_argument("--root", default=None, help="runs folder; finished variants in it are reused")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.config import load_config
    from opd.run_io import environment
    from opd.zoo import resolve_model_paths

    base = base_overrides(args.zoo_dir)
    _, teacher = resolve_model_paths(load_config(base + extra))
    extra = base + [f"student.path={teacher}"] + extra      # start from the model that stops
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(args.root or f"runs/exp_smpo-{stamp}")
    out = Path(args.out or f"benchmarks/results/exp_smpo-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in args.variants:  # the JSON is rewritten after each variant: an interrupted sweep keeps its rows
        run_dir = run_variant(v, args.steps, root, extra)
        if not (run_dir / "summary.json").exists():
            print(f"variant {v}: no finished run, left out", flush=True)
            continue
        rows.append(summarize(v, run_dir, args.collapse_eos))
        out.write_text(json.dumps({"experiment": "exp_smpo", "args": vars(args), "overrides": extra,
                                   "base_overrides": BASE, "rows": rows, "environment": environment()},
                                  indent=2, default=str))
    print_table(rows)
    print(f"wrote {out}")


KEYS = [("sampled/eos_frac", "EOS"), ("sampled/truncated_frac", "trunc"), ("sampled/repetition_frac", "rep"),
        ("greedy/eos_frac", "EOS(gr)"), ("greedy/repetition_frac", "rep(gr)"), ("kl", "KL"),
        ("accuracy/greedy", "acc")]


def print_table(rows: list[dict]) -> None:
    """Held-out before -> after per variant, with the collapse step and the rejected-side minima."""
    head = " ".join(f"{n:>11s}" for _, n in KEYS)
    print(f"\n{'variant':11s} {'collapse@':>9s} {'minEOSlp':>8s} {'minlp':>7s} {head}  (held-out before > after)")
    for r in rows:
        cells = before_after_cells(r["heldout"], KEYS)
        eos_lp = r["min_eos_logp_rejected"]
        print(f"{r['variant']:11s} {str(r['eos_collapsed_at_step']):>9s} "
              f"{eos_lp if eos_lp is None else round(eos_lp, 2)!s:>8s} {r['min_logp_rejected']:7.2f} {cells}")


if __name__ == "__main__":
    main()
