"""One-step off-policy overlap, simulated with each phase on its own worker.

    .venv/bin/python benchmarks/sim_overlap.py                     # phases from the newest smollm2 bench
    .venv/bin/python benchmarks/sim_overlap.py --phases generate=3.4 teacher=4.6 learn=9.2 sync=0.3

On 2 CPU cores the rollout engine, the teacher and the learner share the cores, so a real
overlapped run cannot show what overlap gains where each has its own device. This runs the
real driver loop (`opd.loop.Distillation`, both with `rollout.overlap=false` and `true`) on
workers whose phases only sleep for the given seconds, the generation in a thread of its
own: what the loop's schedule gives when the phases do not compete. Expected: sequential
step = generate + teacher + learn + sync; overlapped = max(generate, teacher + learn) + sync.
Writes JSON to benchmarks/results/sim_overlap-<time>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


class SleepWorkers:
    """The loop's verbs (opd.types.LoopWorkers); each sleeps for its phase's seconds. Canned
    rollouts of 8 tokens; no held-out prompts, checkpoints or faults."""

    def __init__(self, phases: dict[str, float], eos: int):
        self.p, self.eos, self.version, self.restarts = phases, eos, 0, 0
        self.pool, self.teacher_eval = ThreadPoolExecutor(1), None

    def _rollouts(self, prompts, sampling, version: int):
        from opd.types import RolloutBatch

        n, comp = len(prompts.prompt_ids) * sampling.n, [5] * 7 + [self.eos]
        return RolloutBatch([list(p) for p in prompts.prompt_ids for _ in range(sampling.n)],
                            [list(comp) for _ in range(n)], [[-1.0] * 8 for _ in range(n)], ["stop"] * n,
                            ["x"] * n, version, self.p["generate"])

    def generate_async(self, prompts, sampling):
        version = self.version  # the engine holds these weights until the next sync
        fut = self.pool.submit(lambda: time.sleep(self.p["generate"]) or self._rollouts(prompts, sampling, version))
        return fut.result

    def generate(self, prompts, sampling):
        return self.generate_async(prompts, sampling)()

    def score(self, rollouts, teachers=()):
        from opd.types import TeacherScores

        time.sleep(self.p["teacher"])
        return TeacherScores(np.full((len(rollouts.lengths), 8), -1.0, np.float32), 1.0, seconds=self.p["teacher"])

    def teacher_generate(self, prompts, sampling):  # length.reference_prompts=0, no mixture: never called
        raise NotImplementedError("the simulation samples no teacher completions")

    def train(self, batch):
        time.sleep(self.p["learn"])
        return {"loss/rows_total": 0.1, "optim/grad_norm": 1.0}

    def sync(self):
        from opd.types import WeightUpdate

        time.sleep(self.p["sync"])
        self.version += 1
        return [WeightUpdate(self.version, {"w": np.zeros(1, np.float32)})], [self.version]

    def student_logprobs(self, batch):  # no held-out prompts: never called
        raise NotImplementedError("the simulation has no held-out prompts")

    def take_events(self):
        return []

    def save_checkpoint(self, path, state):  # the final checkpoint: nothing to save here
        return path

    def load_checkpoint(self, path):
        raise NotImplementedError("the simulation saves no checkpoints")

    def restart_learner(self, ckpt, reason):
        raise NotImplementedError("the simulation's learner never dies")


def newest_bench_phases() -> dict[str, float]:
    """The median phases of the newest smollm2 step benchmark in benchmarks/results."""
    files = sorted(glob.glob("benchmarks/results/bench_step-smollm2_cpu-*.json"))
    if not files:
        raise SystemExit("no benchmarks/results/bench_step-smollm2_cpu-*.json: pass --phases")
    s = json.loads(Path(files[-1]).read_text())["seconds_per_phase"]
    return {"generate": s["generate"] + s.get("generate_overlapped", 0.0), "teacher": s["teacher"],
            "learn": s["learn"], "sync": s["sync"], "source": files[-1]}


def run(phases: dict, overlap: bool, steps: int, root: Path) -> list[float]:
    """Seconds per step of the real loop on sleeping workers (the first step is dropped)."""
    from opd.config import load_config
    from opd.loop import Distillation
    from opd.run_io import RunDir, read_metrics
    from opd.tasks import Example
    from opd.zoo import ensure_tokenizer, load_tokenizer

    run_dir = root / f"overlap-{overlap}"
    cfg = load_config([f"steps={steps}", "eval_every=0", "checkpoint_every=0", "log_every=1000",
                       "length=monitor", "length.reference_prompts=0", "loss=opd",
                       "rollout.prompts_per_step=2",
                       f"rollout.overlap={overlap}", f"run_dir={run_dir}"])
    tok = load_tokenizer(ensure_tokenizer(cfg.zoo_dir))
    train = [Example(None, f"{a}+{b}=", str(a + b), f"sim:{a}{b}") for a in range(5) for b in range(5)]
    Distillation(cfg, SleepWorkers(phases, tok.eos_token_id), tok, train, [], RunDir(run_dir)).run()
    return [m["time/step"] for m in read_metrics(run_dir) if "time/step" in m][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", nargs="*", default=None, help="generate=S teacher=S learn=S sync=S")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from opd.run_io import environment

    phases = ({k: float(v) for k, v in (a.split("=") for a in args.phases)} if args.phases
              else newest_bench_phases())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(f"runs/sim_overlap-{stamp}")
    seq, ovl = run(phases, False, args.steps, root), run(phases, True, args.steps, root)
    g, t, l, s = (phases[k] for k in ("generate", "teacher", "learn", "sync"))
    result = {"benchmark": "sim_overlap", "phases": phases, "steps_measured": len(seq),
              "sequential_step_s": float(np.median(seq)), "overlapped_step_s": float(np.median(ovl)),
              "expected_sequential_s": g + t + l + s, "expected_overlapped_s": max(g, t + l) + s,
              "speedup": float(np.median(seq) / np.median(ovl)), "environment": environment()}
    out = Path(args.out or f"benchmarks/results/sim_overlap-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
