"""Weight-sync options, measured side by side: learner actor -> rollout-worker actor.

    .venv/bin/python benchmarks/bench_sync.py --experiment smollm2_cpu zoo_dir=/tmp/zoo

The same Ray layout as the loop (a learner actor and a vLLM rollout-worker actor on one
machine); every option moves all of the student's weights and ends with the engine holding
them (in-place reload, prefix cache reset). Options, interleaved `--repeats` times each:
- `safetensors_via_driver`: safetensors bytes from the learner, fetched by the driver and
  put again for the workers (opd before issue 10);
- `safetensors_ref`: the same bytes, their object reference passed on (one serialisation);
- `numpy_ref`: numpy arrays in Ray's object store, read in place by the worker and the
  driver (`Workers.sync`, the kept option);
- `gloo_broadcast`: the tensors broadcast over a torch.distributed gloo group that the two
  actors join (a group of their own, beside any vLLM sets up: NCCL on GPUs), then reloaded;
- `reload_only`: the engine reloading weights it already holds in its process (the floor of
  any transport: vLLM's reload and repacking);
- `memcpy`: one in-memory copy of the weights (the limit named by the issue).
Writes JSON (config, environment, median seconds per option) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from opd.learner import Learner
from opd.rollout import RolloutWorker
from opd.types import WeightUpdate


def gloo_group(port: int, rank: int):
    """A two-process gloo group of its own (a TCP store on localhost), not the default group."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=120))
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=120))


def broadcast(group, tensors: list) -> None:
    """Rank 0's tensors into everybody's, in order."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    for t in tensors:
        group.broadcast([t], opts).wait()


class SyncLearner(Learner):
    """The learner with the pre-issue-10 export (safetensors bytes) besides its own, and a
    sender on a gloo group."""

    def gloo_join(self, port: int, dtype: str) -> dict:
        self.group = gloo_group(port, 0)
        return {k: (tuple(t.shape), str(t.dtype)) for k, t in self.state_for_sync(dtype).items()}

    def gloo_send(self, dtype: str) -> None:
        broadcast(self.group, list(self.state_for_sync(dtype).values()))

    def export_blob(self, dtype: str) -> bytes:
        from safetensors.torch import save

        return save(self.state_for_sync(dtype))

    def memcpy_seconds(self) -> float:
        t0 = time.perf_counter()
        _ = {k: v.clone() for k, v in self.state_for_sync().items()}
        return time.perf_counter() - t0


class SyncWorker(RolloutWorker):
    """The rollout worker, also taking safetensors bytes or a gloo broadcast, and reloading
    its own weights."""

    def gloo_join(self, port: int) -> None:
        self.group = gloo_group(port, 1)

    def gloo_receive(self, spec: dict) -> int:
        import torch

        bufs = {k: torch.empty(shape, dtype=getattr(torch, dt.split(".")[-1])) for k, (shape, dt) in spec.items()}
        broadcast(self.group, list(bufs.values()))
        return self.load_weights(WeightUpdate.from_tensors(0, bufs))

    def load_blob(self, blob: bytes) -> int:
        from safetensors.torch import load

        return self.load_weights(WeightUpdate.from_tensors(0, load(blob)))

    def reload_own(self, update: WeightUpdate) -> float:
        """Seconds of the engine's reload alone, from arrays already in this process."""
        local = WeightUpdate(update.version, {k: a.copy() for k, a in update.arrays.items()}, update.dtype)
        t0 = time.perf_counter()
        self.load_weights(local)
        return time.perf_counter() - t0


def run_options(learner, worker, dtype: str, repeats: int) -> dict[str, list[float]]:
    import ray

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def via_driver():
        blob = ray.get(learner.handle.export_blob.remote(dtype))
        ray.get(worker.handle.load_blob.remote(ray.put(blob)))

    def blob_ref():
        ray.get(worker.handle.load_blob.remote(learner.handle.export_blob.remote(dtype)))

    def numpy_ref():
        ref = learner.handle.export_weights.remote(dtype)
        ray.get(ref)
        ray.get(worker.handle.load_weights.remote(ref))

    spec = ray.get([learner.handle.gloo_join.remote(29517, dtype), worker.handle.gloo_join.remote(29517)])[0]

    def gloo():
        ray.get([learner.handle.gloo_send.remote(dtype), worker.handle.gloo_receive.remote(spec)])

    options = {"safetensors_via_driver": via_driver, "safetensors_ref": blob_ref, "numpy_ref": numpy_ref,
               "gloo_broadcast": gloo}
    out: dict[str, list[float]] = {k: [] for k in [*options, "reload_only", "memcpy"]}
    update = ray.get(learner.handle.export_weights.remote(dtype))
    for name, fn in options.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in options.items():
            out[name].append(timed(fn))
        out["reload_only"].append(ray.get(worker.handle.reload_own.remote(update)))
        out["memcpy"].append(ray.get(learner.handle.__ray_call__.remote(lambda a: a.memcpy_seconds())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    import ray

    from opd.actors import _make, _rollout_env, start_ray
    from opd.config import as_dict, load_config
    from opd.run_io import environment
    from opd.zoo import resolve_model_paths

    overrides = ([f"experiment={args.experiment}"] if args.experiment else []) + overrides
    cfg = load_config(overrides)
    student, _ = resolve_model_paths(cfg)
    r, ncpu = cfg.resources, os.cpu_count() or 1
    start_ray(r)
    worker = _make(SyncWorker, "rollout-0", True, r.rollout_num_cpus, r.rollout_num_gpus, _rollout_env(ncpu),
                   student, cfg.rollout, 0, cfg.student.trust_remote_code)
    learner = _make(SyncLearner, "learner", True, r.learner_num_cpus, r.learner_num_gpus,
                    {"OMP_NUM_THREADS": str(ncpu)}, student, cfg)
    ray.get([worker.handle.ready.remote(), learner.handle.ready.remote()], timeout=r.startup_timeout_s)
    times = run_options(learner, worker, cfg.rollout.dtype, args.repeats)
    mb = ray.get(learner.handle.export_weights.remote(cfg.rollout.dtype)).nbytes / 2**20
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "bench_sync", "experiment": args.experiment, "overrides": overrides,
              "config": as_dict(cfg), "environment": environment(), "weights_mb": mb, "repeats": args.repeats,
              "median_seconds": med, "seconds": times, "kept": "numpy_ref",
              "speedup_vs_before": med["safetensors_via_driver"] / med["numpy_ref"]}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"benchmarks/results/bench_sync-{args.experiment or 'default'}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"weights_mb": mb, "median_seconds": med}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
