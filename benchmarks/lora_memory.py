"""The learner's memory on the real pair's student: full fine-tune against LoRA, with and
without activation checkpointing; the bytes of parameters, gradients and AdamW moments after
one step, and the learner process's peak resident memory before and after that step.

    .venv/bin/python benchmarks/lora_memory.py zoo_dir=/tmp/zoo --ranks 16 64
    .venv/bin/python benchmarks/lora_memory.py zoo_dir=/tmp/zoo --ranks --checkpointing \
        --rows 4 --prompt 64 --completion 1984

Each learner runs in a process of its own (so each peak is its own), on
`experiment=smollm2_cpu`'s student and config, one AdamW step on the same synthetic batch
(by default 32 rows of 40 prompt + 48 completion tokens, the experiment's shape, teacher
top-20). `--checkpointing` measures each learner again with `optim.gradient_checkpointing=true`;
the step's growth of the peak (after minus before) is where activations show. JSON:
benchmarks/results/lora_memory-<time>.json (config, environment, per learner the trained and
total parameters, the bytes by kind, the peaks, the step's seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path


def batch(vocab: int, rows: int = 32, prompt: int = 40, completion: int = 48):
    """A TrainBatch shaped like one step of the experiment, with top-20 teacher scores."""
    import numpy as np

    from opd.batch import build_train_batch
    from opd.types import RolloutBatch, TeacherScores

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(rows, prompt + completion))
    rollouts = RolloutBatch([list(r[:prompt]) for r in ids], [list(r[prompt:]) for r in ids],
                            [list(rng.normal(-2, 0.5, completion)) for _ in range(rows)], ["length"] * rows,
                            [""] * rows, 0)
    topk = rng.integers(0, vocab, size=(rows, completion, 20))
    lps = np.log(np.full((rows, completion, 20), 1 / 21, np.float32))
    scores = TeacherScores(rng.normal(-2, 0.5, (rows, completion)).astype(np.float32), 1.0,
                           topk_ids_NTK=topk, topk_logprobs_NTK=lps)
    return build_train_batch(rollouts, scores, 0, 1, True, 1.0)


def measure(overrides: list[str], rank: int, checkpointing: bool, shape: tuple[int, int, int],
            out: mp.Queue) -> None:
    from opd.config import load_config
    from opd.learner import Learner, lora, peak_rss_mb, shard
    from opd.zoo import resolve_model_paths

    cfg = load_config(["experiment=smollm2_cpu", *overrides])
    if rank:
        cfg = replace(cfg, student=replace(cfg.student, lora=replace(cfg.student.lora, enabled=True, r=rank,
                                                                      alpha=2.0 * rank)))
    cfg = replace(cfg, optim=replace(cfg.optim, gradient_checkpointing=checkpointing))
    learner = Learner(resolve_model_paths(cfg)[0], cfg)
    b, before = batch(learner.vocab_size, *shape), peak_rss_mb()
    t0 = time.time()
    learner.train_step(b)
    out.put({"lora_rank": rank, "checkpointing": checkpointing, "shape": shape, "step_seconds": time.time() - t0,
             **lora.counts(learner.model), **shard.local_bytes(learner.model, learner.opt),
             "peak_rss_before_step_mb": before, "peak_rss_mb": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="*", type=int, default=[16])
    ap.add_argument("--checkpointing", action="store_true", help="each learner also with activation checkpointing")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=40, help="prompt tokens a row")
    ap.add_argument("--completion", type=int, default=48, help="trained tokens a row")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    from opd.config import as_dict, load_config
    from opd.run_io import environment

    ctx, rows = mp.get_context("spawn"), []
    shape = (args.rows, args.prompt, args.completion)
    for rank in [0, *args.ranks]:  # 0: the full fine-tune
        for ckpt in (False, True) if args.checkpointing else (False,):
            q = ctx.Queue()
            p = ctx.Process(target=measure, args=(overrides, rank, ckpt, shape, q))
            p.start()
            rows.append(q.get())
            p.join()
    for r in rows:
        r["state_mb"] = (r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]) / 2**20
        r["step_growth_mb"] = r["peak_rss_mb"] - r["peak_rss_before_step_mb"]
        name = ("full" if not r["lora_rank"] else f"LoRA r={r['lora_rank']}") + (" ckpt" if r["checkpointing"] else "")
        print(f"{name:15s} "
              f"{r['trainable_params'] / 1e6:6.2f}M of {r['total_params'] / 1e6:.2f}M trained: state "
              f"{r['state_mb']:7.1f} MB (params {r['param_bytes'] / 2**20:.1f}, grads {r['grad_bytes'] / 2**20:.1f}, "
              f"AdamW {r['optimizer_bytes'] / 2**20:.1f}), peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['step_growth_mb']:.0f} in the step), step {r['step_seconds']:.1f} s")
    cfg = load_config(["experiment=smollm2_cpu", *overrides])
    out = Path(args.out or f"benchmarks/results/lora_memory-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "lora_memory", "args": vars(args), "config": as_dict(cfg),
                               "rows": rows, "environment": environment()}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
