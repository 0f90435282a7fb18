"""Two learner ranks against one, on the real student: parity, bytes per rank, sync time.

    .venv/bin/python benchmarks/learner_group.py --zoo-dir /tmp/zoo --out benchmarks/results/learner_group-smollm2.json

The SmolLM2 student (`zoo=smollm2`, a layer-dropped SmolLM2-135M-Instruct) is trained for
`--steps` steps on the same fixed batches (random token ids as completions, teacher log-probs
drawn around the student's; `loss.distill=reverse_kl_pg`, the top-k KL remedy on each row and
the anchor, as `loss=opd` with `length=auto` trains) by one learner in this process and by a
group of two Ray actors (FSDP2 over gloo). Reported:
- per step, the relative difference of the loss and the gradient norm, and at the end of the
  final weights (the largest over tensors, the attention key biases aside: their gradient is
  zero in exact arithmetic, so AdamW steps on rounding noise in either run);
- each rank's bytes of parameters, gradients and AdamW state, against one learner's;
- `Workers.sync` (each rank's shards as numpy arrays through Ray's object store, joined by
  a vLLM rollout-worker actor before its in-place reload), `--repeats` times for each N,
  median and spread; and the alternative of rank 0 gathering the whole weights first
  (`sync_gathered`, checked to give the engine the same weights), and the gather alone.
All on this machine's CPUs; JSON with the config and the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from opd.actors import Workers, _make, _rollout_env, start_ray
from opd.batch import build_train_batch
from opd.config import load_config
from opd.learner import Learner, shard
from opd.learner_group import placement, rank_names
from opd.rollout import RolloutWorker, cpu_engine_env
from opd.run_io import environment
from opd.types import RolloutBatch, TeacherScores, WeightUpdate
from opd.zoo.smollm2 import ensure_smollm2


def batches(V: int, steps: int, rows: int = 8, prompt: int = 12, completion: int = 24) -> list:
    """Fixed batches: `rows` rollouts of random ids, teacher log-probs and remedy weights."""
    out = []
    for step in range(steps):
        rng = np.random.default_rng(step)
        lens = rng.integers(completion // 3, completion + 1, rows)
        ids = rng.integers(10, V, (rows, prompt + completion))
        roll = RolloutBatch([list(r[:prompt]) for r in ids], [list(r[prompt: prompt + n]) for r, n in zip(ids, lens)],
                            [list(rng.normal(-3, 0.5, n)) for n in lens], ["stop"] * rows, [""] * rows, step)
        scores = TeacherScores(rng.normal(-3, 1.0, (rows, completion)).astype(np.float32), 1.0)
        b = build_train_batch(roll, scores, 0, 2, True, 1.0)
        out.append(replace(b, topk_kl_coef_B=None, anchor_coef=0.1))
    return out


def group(cfg, path: str, n: int, rollout: bool) -> Workers:
    """The driver's handle on n learner ranks (and one rollout worker, for sync)."""
    w = Workers.__new__(Workers)
    w.cfg, w.use_ray, w.timeout, w.max_restarts = cfg, True, 1800.0, 0
    w.restarts, w.events, w.start_path, w.teachers = 0, [], path, []
    w.placement, opts = placement(cfg, 600)
    w.rollouts = [_make(RolloutWorker, "rollout-0", True, 0.5, 0, _rollout_env(2), path, cfg.rollout, 0,
                        False)] if rollout else []
    w.learners = [_make(Learner, name, True, 0.5, 0, {"OMP_NUM_THREADS": "2"}, path, cfg, path, i, n,
                        opts=opts and opts[i]) for i, name in enumerate(rank_names(n))]
    w.gather([(a, "ready") for a in w.rollouts + w.learners], 1800)
    w._join_learners()
    return w


def sync_gathered(w: Workers) -> list[int]:
    """The alternative to `Workers.sync` (each rank sends its own shards, each rollout
    worker joins them): rank 0 gathers the whole weights and sends them."""
    dtype = w.cfg.rollout.dtype
    refs = w._submit([(a, "export_weights", (dtype,)) for a in w.learners])
    return w.gather([(r, "load_weights", (refs[0],)) for r in w.rollouts])


def assert_same_engine_weights(w: Workers) -> None:
    """Both ways give the engines the same weights: the joined shards equal rank 0's gather."""
    import ray

    whole = w._on_ranks("export_weights")[0]
    parts = ray.get([a.submit("export_shards", w.cfg.rollout.dtype) for a in w.learners])
    joined = WeightUpdate.join(parts)
    assert joined.arrays.keys() == whole.arrays.keys()
    assert all(np.array_equal(joined.arrays[k], whole.arrays[k]) for k in whole.arrays)


def rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b if not k.endswith("k_proj.bias"))


def weights(update) -> dict:
    return {k: torch.as_tensor(np.array(v, np.float32)) for k, v in update.arrays.items()}


def timed(fn, repeats: int) -> dict:
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs), "all_s": secs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo-dir", default="/tmp/zoo")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/learner_group-smollm2.json")
    a = ap.parse_args()
    cpu_engine_env()
    paths = ensure_smollm2(a.zoo_dir)
    cfg = load_config(["experiment=smollm2_cpu", f"zoo_dir={a.zoo_dir}", "length.remedies.anchor_coef=0.1",
                       "optim.micro_batch_size=4", "loss.distill=reverse_kl_pg"])
    cfg1 = replace(cfg, resources=replace(cfg.resources, learner_workers=1))
    cfg2 = replace(cfg, resources=replace(cfg.resources, learner_workers=2, learner_num_cpus=0.5))
    start_ray(cfg.resources)
    student = str(paths.student)
    one = Learner(student, cfg1)
    bs = batches(len(one.tokenizer), a.steps)
    ref = [one.train_step(b) for b in bs]
    whole = shard.local_bytes(one.model, one.opt)
    ref_w = weights(one.export_weights())
    del one
    result = {"config": {"student": student, "steps": a.steps, "rows": len(bs[0].input_ids_BS),
                         "micro_batch_size": cfg.optim.micro_batch_size, "repeats": a.repeats,
                         "rollout_dtype": cfg.rollout.dtype},
              "environment": environment(), "bytes": {"one_learner": whole}}
    two = group(cfg2, student, 2, rollout=True)
    try:
        got = [two.train(b) for b in bs]
        result["parity"] = {
            "loss_rel": [abs(g["loss/rows_total"] - r["loss/rows_total"]) / abs(r["loss/rows_total"]) for g, r in zip(got, ref)],
            "grad_norm_rel": [abs(g["optim/grad_norm"] - r["optim/grad_norm"]) / r["optim/grad_norm"] for g, r in zip(got, ref)],
            "final_weights_rel": rel(weights(two._on_ranks("export_weights")[0]), ref_w)}
        result["bytes"]["per_rank_of_two"] = [{k: r[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}
                                              for r in two._on_ranks("where")]
        result["sync"] = {"two_ranks_shards": timed(two.sync, a.repeats),
                          "two_ranks_gathered": timed(lambda: sync_gathered(two), a.repeats),
                          "two_ranks_gather_only": timed(lambda: two._on_ranks("export_weights"), a.repeats)}
        assert_same_engine_weights(two)
    finally:
        two.shutdown()
    one_w = group(cfg1, student, 1, rollout=True)
    try:
        one_w.train(bs[0])
        result["sync"].update(one_rank=timed(one_w.sync, a.repeats),
                              one_rank_export_only=timed(lambda: one_w._on_ranks("export_weights"), a.repeats))
    finally:
        one_w.shutdown()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("parity", "bytes", "sync")}, indent=1))


if __name__ == "__main__":
    main()
