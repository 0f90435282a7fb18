"""Loss experiment on the toy task: on-policy distillation vs sequence-level KD, and SMPO with
and without its stabilisers.

    .venv/bin/python benchmarks/exp_losses.py                  # all variants, 100 steps each
    .venv/bin/python benchmarks/exp_losses.py --steps 60 --only opd_gkd seq_kd

Every variant is a full `opd-train` run (Ray actors, vLLM rollouts) from the same zoo
student, with the same prompts per step and samples per prompt, so the number of trained
tokens is about the same (the table reports it: student-rollout tokens for on-policy
variants, teacher-sample tokens for sequence-level KD). Reported per variant: held-out exact
match (greedy, vLLM) before and after, and the EOS rate / truncated fraction / mean length of
one sampled completion per held-out prompt after training. JSON goes to
benchmarks/results/exp_losses-<time>.json.

(a) `opd_gkd`: GKD (generalized JSD, beta 0.5) on the student's samples;
    `opd_rkl`: the sampled reverse-KL policy gradient (Tinker / verl form);
    `seq_kd`: SFT on the teacher's samples (GKD's lambda = 0).
(b) `smpo`: SMPO preference loss alone, pairs from the student's samples ranked by the
    task's checker, stabilisers on (EOS protection, winsorization, log-prob floor) and SFT
    amortization; `smpo_nostab`: the same with the three stabilisers off;
    `smpo_bare`: stabilisers and SFT amortization off (the raw preference objective).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = {
    "opd_gkd": ["loss=gkd"],
    "opd_rkl": ["loss=opd"],
    "seq_kd": ["loss=seqkd"],
    "smpo": ["loss=smpo_only"],
    "smpo_nostab": ["loss=smpo_only", "loss.smpo.eos_protection=none", "loss.smpo.lower_percentile=null",
                    "loss.smpo.min_log_prob=null"],
    "smpo_bare": ["loss=smpo_only", "loss.smpo.eos_protection=none", "loss.smpo.lower_percentile=null",
                  "loss.smpo.min_log_prob=null", "loss.smpo.sft_coef=0"],
}


def run_variant(name: str, extra: list[str], steps: int, root: Path) -> dict:
    from opd.config import load_config
    from opd.train import run_training

    run_dir = root / name
    cfg = load_config(VARIANTS[name] + [f"steps={steps}", "eval_every=0", "checkpoint_every=0",
                                        f"run_dir={run_dir}"] + extra)
    s = run_training(cfg)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(l.get("rollout/tokens", 0.0) for l in lines)
    after = s.get("sampled_after", {})
    return {"variant": name, "overrides": VARIANTS[name] + extra, "steps": steps,
            "trained_tokens": tokens, "teacher": s["teacher"], "exact_match_before": s["student_before"],
            "exact_match_after": s["student_after"], "eos_rate_before": s.get("sampled_before", {}).get("eos_frac"),
            "eos_rate_after": after.get("eos_frac"), "truncated_after": after.get("truncated_frac"),
            "mean_length_after": after.get("mean"), "wall_seconds": s["wall_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.run_io import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(f"runs/exp_losses-{stamp}")
    rows = [run_variant(v, extra, args.steps, root) for v in args.only]
    out = Path(args.out or f"benchmarks/results/exp_losses-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": "exp_losses", "extra_overrides": extra, "rows": rows,
                               "environment": environment()}, indent=2, default=str))
    print(f"\n{'variant':12s} {'tokens':>8s} {'EM before':>9s} {'EM after':>8s} {'EOS after':>9s} "
          f"{'trunc after':>11s} {'len after':>9s}")
    for r in rows:
        print(f"{r['variant']:12s} {r['trained_tokens']:8.0f} {r['exact_match_before']:9.3f} "
              f"{r['exact_match_after']:8.3f} {r['eos_rate_after']:9.3f} {r['truncated_after']:11.3f} "
              f"{r['mean_length_after']:9.2f}")
    print(f"teacher exact match {rows[0]['teacher']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
