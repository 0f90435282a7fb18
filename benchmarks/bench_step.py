"""Step-time benchmark: K steps of the default experiment, phase by phase, against plain vLLM.

    .venv/bin/python benchmarks/bench_step.py                 # default experiment, 10 steps
    .venv/bin/python benchmarks/bench_step.py steps=20 loss=gkd --out benchmarks/results/x.json

Runs the real loop (Ray actors, vLLM rollout worker, teacher, learner, weight sync) for K
steps, then, in the same process and on the same model and prompts, a plain `vllm.LLM`
generate with the same sampling settings, and writes JSON (config, environment, versions,
git commit) with seconds per phase (generate, teacher, learn, sync, other), rollout
tokens/s, plain-vLLM tokens/s, and their ratio: the framework's rollout overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def plain_vllm_tokens_per_s(cfg, student_path: str, prompt_ids: list[list[int]], step_seed: int,
                            repeats: int) -> float:
    """Plain vLLM: one in-process engine, same model, prompts and sampling; best of repeats."""
    from opd.loop import sampling_settings
    from opd.rollout import RolloutWorker, to_sampling_params

    worker = RolloutWorker(student_path, cfg.rollout)
    params = to_sampling_params(sampling_settings(cfg.rollout, cfg.rollout.max_new_tokens, step_seed))
    worker.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.time()
        outs = worker.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        n = sum(len(o.token_ids) for out in outs for o in out.outputs)
        best = max(best, n / (time.time() - t0))
    del worker
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<time>.json)")
    ap.add_argument("--repeats", type=int, default=3)
    args, overrides = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.config import as_dict, load_config
    from opd.run_io import environment
    import random

    from opd.tasks import encode_prompt, load_splits, sample_batch
    from opd.train import run_training
    from opd.zoo import load_tokenizer, resolve_model_paths

    overrides = ["steps=10", "eval_every=0", "checkpoint_every=0", "length.reference_prompts=8",
                 f"run_dir=runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"] + overrides
    cfg = load_config(overrides)
    summary = run_training(cfg)
    lines = [json.loads(l) for l in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "time/step" in l][1:]  # the first step warms up
    phases = {p: float(np.mean([s.get(f"time/{p}", 0.0) for s in steps]))
              for p in ("generate", "teacher", "learn", "sync", "other", "step")}
    rollout_tps = float(np.mean([s["rollout/tokens_per_s"] for s in steps]))
    student, _ = resolve_model_paths(cfg)
    tok = load_tokenizer(student)
    train, _ = load_splits(cfg.task, tok)
    prompts = [encode_prompt(tok, e) for e in sample_batch(train, cfg.rollout.prompts_per_step, random.Random(0))]
    plain_tps = plain_vllm_tokens_per_s(cfg, student, prompts, 1, args.repeats)
    result = {
        "benchmark": "bench_step", "overrides": overrides, "config": as_dict(cfg), "environment": environment(),
        "steps_measured": len(steps), "seconds_per_phase": phases,
        "rollout_tokens_per_s": rollout_tps, "plain_vllm_tokens_per_s": plain_tps,
        "rollout_overhead_ratio": plain_tps / rollout_tps if rollout_tps else None,
        "rollout_vs_plain_vllm": rollout_tps / plain_tps if plain_tps else None,
        "sync_mb": float(np.mean([s.get("sync/mb", 0.0) for s in steps])),
        "summary": {k: summary[k] for k in ("teacher", "student_before", "student_after", "wall_seconds")},
    }
    out = Path(args.out or f"benchmarks/results/bench_step-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("seconds_per_phase", "rollout_tokens_per_s",
                                             "plain_vllm_tokens_per_s", "rollout_overhead_ratio")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
