"""The teacher's sampled truncation and mean length on the same train prompts under
several sampling seeds: with one seed shared by every prompt of a call (what one vLLM
SamplingParams does) against a seed per prompt (`TeacherScorer.generate`, as the rollouts).
A shared seed makes the k-th sample of every prompt draw the same random numbers, so the
whole sample moves together and its rates depend on the seed far beyond the sampling error
of independent completions; this measures by how much.

    .venv/bin/python benchmarks/exp_reference_seeds.py zoo_dir=/tmp/zoo --prompts 256

Any other argument is a config override (on `experiment=smollm2_cpu`). The prompts are a
fixed sample of the task's train prompts, generated `rollout.prompts_per_step` at a time as
the loop's reference is. JSON goes to benchmarks/results/exp_reference_seeds-<time>.json:
the arguments, the environment, per mode and seed the rates, and per mode their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def rates(finish: list[str], lengths: list[int]) -> dict:
    trunc = float(np.mean([f == "length" for f in finish]))
    return {"truncated_frac": trunc, "mean": float(np.mean(lengths)), "n": len(finish)}


def sample(scorer, prompts, settings, k: int, shared: bool) -> dict:
    """The teacher's completions of `prompts`, k at a time: one SamplingParams (seed shared by
    a call's prompts) or opd's generate (every prompt its own seed)."""
    from opd.rollout import to_sampling_params

    finish, lengths = [], []
    for i in range(0, len(prompts.prompt_ids), k):
        part = prompts.rows(slice(i, i + k))
        if shared:
            outs = scorer.llm.generate([{"prompt_token_ids": p} for p in part.prompt_ids],
                                       to_sampling_params(settings, logprobs=None), use_tqdm=False)
            got = [(o.finish_reason, len(o.token_ids)) for out in outs for o in out.outputs]
        else:
            b = scorer.generate(part, settings.for_rows(i))
            got = [(r.value, len(c)) for r, c in zip(b.finish_reasons, b.completion_ids)]
        finish += [f for f, _ in got]
        lengths += [n for _, n in got]
    return rates(finish, lengths)


def spread(runs: list[dict]) -> dict:
    t = [r["truncated_frac"] for r in runs]
    n = runs[0]["n"]
    p = float(np.mean(t))
    return {"truncated_frac_mean": p, "truncated_frac_std": float(np.std(t, ddof=1)),
            "truncated_frac_range": [min(t), max(t)],
            "independent_samples_std": float(np.sqrt(p * (1 - p) / n))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from opd.config import load_config
    from opd.run_io import environment
    from opd.steps import sampling_settings
    from opd.tasks import builtin_task, prompt_batch
    from opd.teacher import TeacherScorer
    from opd.zoo import resolve_model_paths

    extra = ["experiment=smollm2_cpu"] + extra
    cfg = load_config(extra)
    _, teacher_path = resolve_model_paths(cfg)
    scorer = TeacherScorer(teacher_path, cfg.teacher, cfg.rollout)
    train = builtin_task(cfg.task).train()
    prompts = prompt_batch(scorer.tokenizer, random.Random(0).sample(train, min(args.prompts, len(train))))
    r = cfg.rollout
    runs: dict[str, list[dict]] = {"shared": [], "per_prompt": []}
    for mode in runs:
        for seed in args.seeds:
            t0 = time.time()
            settings = replace(sampling_settings(r, r.max_new_tokens, 0), seed=seed)
            got = sample(scorer, prompts, settings, r.prompts_per_step, shared=mode == "shared")
            runs[mode].append({"seed": seed, **got, "seconds": time.time() - t0})
            print(f"{mode:>10} seed {seed:>6}: truncated {got['truncated_frac']:.3f}, mean length {got['mean']:.1f}",
                  flush=True)
    summary = {mode: spread(rs) for mode, rs in runs.items()}
    for mode, s in summary.items():
        print(f"{mode:>10}: truncated {s['truncated_frac_mean']:.3f} +- {s['truncated_frac_std']:.3f} over seeds "
              f"(independent samples: +- {s['independent_samples_std']:.3f})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"benchmarks/results/exp_reference_seeds-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": "exp_reference_seeds", "args": vars(args), "overrides": extra,
                               "teacher": teacher_path, "rollout": {"temperature": r.temperature, "top_p": r.top_p,
                                                                    "top_k": r.top_k, "max_new_tokens": r.max_new_tokens,
                                                                    "samples_per_prompt": r.samples_per_prompt},
                               "runs": runs, "summary": summary, "environment": environment()}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
