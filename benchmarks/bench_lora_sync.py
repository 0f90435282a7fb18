"""A LoRA student's two weight syncs on the real pair, side by side: the merged weights
(`student.lora.sync=merged`) against the adapter alone (`adapter`, vLLM's LoRA on the base).

    .venv/bin/python benchmarks/bench_lora_sync.py zoo_dir=/tmp/zoo --rank 16 --repeats 5

For each sync, in this process (no Ray: the loop's object-store transport adds the same
put for both, see bench_sync.py), a LoRA learner on `experiment=smollm2_cpu`'s student and
a vLLM engine built as the loop builds it, running in this process as in a rollout actor
(VLLM_ENABLE_V1_MULTIPROCESSING=0: weights reach it without serialisation). Each repeat changes every adapter weight (small
random steps), then times:
- export: the learner's `export_weights` (merging, or the adapter under peft's names);
- load: the engine's `load_weights` (in-place reload, or writing the adapter and a new
  LoRARequest);
- first generate: the held-out prompts sampled right after the load (vLLM loads an
  adapter when a request first needs it, so its cost lands here);
- generate again: the same prompts once more (the steady cost of generating through the
  adapter, against the merged engine's plain model).
JSON: benchmarks/results/bench_lora_sync-<time>.json (config, environment, per sync the MB
per update and the median, min and max of each time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def measure(cfg, student: str, heldout: list, sync: str, rank: int, repeats: int) -> dict:
    import torch

    from opd.learner import Learner
    from opd.rollout import RolloutWorker
    from opd.tasks import prompt_batch
    from opd.types import SamplingSettings

    lo = replace(cfg.student.lora, enabled=True, r=rank, alpha=2.0 * rank, sync=sync)
    cfg = replace(cfg, student=replace(cfg.student, lora=lo))
    learner = Learner(student, cfg)
    tok = learner.tokenizer
    engine = RolloutWorker(student, cfg.rollout, 0, False, rank if sync == "adapter" else 0)
    prompts = prompt_batch(tok, heldout[:16])
    r = cfg.rollout
    settings = SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1,
                                repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=0, n=1)
    engine.generate(prompts, settings)  # warm-up
    out = {k: [] for k in ("export_s", "load_s", "first_generate_s", "generate_again_s")}
    mb = 0.0
    for _ in range(repeats):
        with torch.no_grad():  # new adapters, as a step makes them
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(1e-3 * torch.randn_like(p))
        learner.step += 1
        t0 = time.perf_counter()
        update = learner.export_weights(r.dtype)
        t1 = time.perf_counter()
        engine.load_weights(update)
        t2 = time.perf_counter()
        engine.generate(prompts, settings)
        t3 = time.perf_counter()
        engine.generate(prompts, settings)
        t4 = time.perf_counter()
        for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            out[k].append(v)
        mb = update.nbytes / 2**20
    core = getattr(engine.llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    return {"sync": sync, "rank": rank, "mb_per_update": mb, "prompts": len(prompts.prompt_ids),
            "max_new_tokens": r.max_new_tokens, **{k: stats(v) for k, v in out.items()},
            "sync_s": stats([a + b for a, b in zip(out["export_s"], out["load_s"])])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as in a rollout actor
    from opd.config import as_dict, load_config
    from opd.rollout import cpu_engine_env
    from opd.run_io import environment

    cpu_engine_env()
    cfg = load_config(["experiment=smollm2_cpu", *overrides, "run_dir=runs/bench_lora_sync"])
    from opd.train import prepare_run

    _, student, *_, heldout = prepare_run(cfg)  # the run's checks, student and held-out prompts, once
    rows = [measure(cfg, student, heldout, sync, args.rank, args.repeats) for sync in ("merged", "adapter")]
    out = Path(args.out or f"benchmarks/results/bench_lora_sync-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_lora_sync", "args": vars(args), "config": as_dict(cfg),
                               "student": student, "rows": rows, "environment": environment()}, indent=2, default=str))
    for r in rows:
        print(f"{r['sync']:8s} {r['mb_per_update']:8.1f} MB  sync {r['sync_s']['median']:.3f} s "
              f"(export {r['export_s']['median']:.3f}, load {r['load_s']['median']:.3f})  first generate "
              f"{r['first_generate_s']['median']:.2f} s, again {r['generate_again_s']['median']:.2f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
