"""Peer benchmark: TRL's GKDTrainer at its best fair settings against opd on the same work,
and against opd at its recommended settings; seconds per step.

    make bench-peer ARGS="--experiment smollm2_cpu zoo_dir=/tmp/zoo"
    .venv/bin/python benchmarks/peers/trl_gkd.py --experiment smollm2_cpu zoo_dir=/tmp/zoo \
        [--opd-json MATCHED.json RECOMMENDED.json] [--steps 7]

Two halves, two interpreters:
- the driver (opd's venv) composes opd's config, resolves the same student and teacher,
  encodes the same prompts (each repeated samples_per_prompt times, so a TRL batch holds as
  many rollouts as an opd step) and, unless `--opd-json` names them, runs
  `benchmarks/bench_step.py` twice:
  - **matched**: the same work as TRL: `length=off` (no length remedies, no teacher-mixture
    generation), the loss over the teacher's full distribution from a transformers forward
    as TRL's (`teacher.backend=transformers teacher.logprobs=full`,
    no tail bucket) at the experiment's `loss.jsd_beta`, every model in fp32;
  - **recommended**: the experiment as it is (e.g. top-20 + tail from a vLLM teacher,
    `length=auto`), labelled as doing other work than TRL;
- the worker (`--worker JOB OUT`, run by `.venv-trl/bin/python`, TRL 1.16 and nothing of
  opd) trains `trl.experimental.gkd.GKDTrainer` for `--steps` steps: lmbda=1 (every step
  samples from the student with HF `generate`, max_new_tokens and temperature as opd's
  rollouts, top_k=0), beta = opd's `loss.jsd_beta` on the teacher's full distribution,
  opd's learning rate, fp32, on CPU. Its fair settings: `gradient_checkpointing=False`
  (TRL's default True makes GKDTrainer generate with `use_cache=False`, without a KV cache,
  and recompute activations in backward). Generation and the rest of each step are timed
  apart (the student's `generate` is wrapped), and TRL's whole effective config and its
  generation config are recorded.
Writes JSON (both opd runs' JSON paths and configs, TRL's config, the environments, seconds
per step with their spread, and both ratios) to benchmarks/results/trl_gkd-<experiment>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRL_PY = ROOT / ".venv-trl" / "bin" / "python"


def spread(xs: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ---------------------------------------------------------------------- the worker (TRL venv)
def _collator(pad_id: int):
    """Left-padded prompts as GKDTrainer reads them (lmbda=1 replaces input_ids and labels
    with the student's samples before the loss)."""
    import torch

    def collate(rows: list[dict]) -> dict:
        W = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.tensor([[pad_id] * (W - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
        attn = torch.tensor([[0] * (W - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows])
        # labels: placeholders (replaced by the samples' before the loss), but not all -100:
        # the Trainer counts them as the batch's items and an empty count made NaN gradients
        return {"prompts": ids, "prompt_attention_mask": attn, "input_ids": ids, "attention_mask": attn,
                "labels": ids.masked_fill(attn == 0, -100)}

    return collate


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall seconds of every optimizer step (generate + both forwards + backward + AdamW)."""

        def __init__(self):
            self.t0, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    return StepTimer()


def _timed_generate(model) -> list[float]:
    """Wrap `model.generate` (on the instance) so that each call's wall seconds are recorded."""
    real, seconds = model.generate, []

    def generate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    model.generate = generate
    return seconds


def worker(job_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(job["student"])
    student = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(job["teacher"], dtype=torch.float32)
    rows = job["rows"]
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-gkd-"), per_device_train_batch_size=rows,
        max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0,
        lmbda=1.0, beta=job["beta"], temperature=job["temperature"], max_new_tokens=job["max_new_tokens"],
        use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, disable_dropout=True, seed=job["seed"], gradient_checkpointing=False)
    data = Dataset.from_list([{"prompt_ids": p} for p in job["prompt_ids"]])
    timer = _step_timer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok, data_collator=_collator(tok.pad_token_id), callbacks=[timer])
    gen = _timed_generate(student)
    trainer.train()
    if len(gen) != len(timer.seconds):
        raise SystemExit(f"TRL generated {len(gen)} times in {len(timer.seconds)} steps: cannot split its steps")
    rest = [s - g for s, g in zip(timer.seconds, gen)]
    result = {"seconds_per_step": timer.seconds, "generate_seconds": gen, "train_seconds": rest,
              **{f"{k}_spread": spread(v[1:] or v) for k, v in  # the first step warms up
                 (("seconds_per_step", timer.seconds), ("generate", gen), ("train", rest))},
              "median_seconds_per_step": statistics.median(timer.seconds[1:] or timer.seconds),
              "versions": {m: __import__(m).__version__ for m in ("trl", "torch", "transformers", "accelerate")},
              "gkd_config": args.to_dict(), "generation_config": trainer.generation_config.to_dict(),
              "torch_threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------- the driver (opd venv)
def trl_job(cfg, steps: int) -> dict:
    """The TRL worker's inputs: opd's models, prompts (as many rows as an opd step) and loss."""
    import random

    from opd.prompt_files import load_splits
    from opd.tasks import encode_prompt, sample_batch
    from opd.zoo import load_tokenizer, resolve_model_paths

    student, teacher = resolve_model_paths(cfg)
    tok = load_tokenizer(student)
    train, _ = load_splits(cfg.task, tok)
    P, G, rng = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, random.Random(cfg.seed)
    prompts = [encode_prompt(tok, e) for _ in range(steps) for e in sample_batch(train, P, rng)]
    return {"student": student, "teacher": teacher, "rows": P * G, "steps": steps, "seed": cfg.seed,
            "prompt_ids": [p for p in prompts for _ in range(G)], "lr": cfg.optim.lr,
            "beta": cfg.loss.jsd_beta, "temperature": cfg.rollout.temperature,
            "max_new_tokens": cfg.rollout.max_new_tokens}


def run_trl(job: dict) -> dict:
    if not TRL_PY.exists():
        raise SystemExit(f"{TRL_PY} is missing: run `make bench-peer` (it builds .venv-trl)")
    with tempfile.TemporaryDirectory() as d:
        jp, op = Path(d) / "job.json", Path(d) / "out.json"
        jp.write_text(json.dumps(job))
        subprocess.run([str(TRL_PY), __file__, "--worker", str(jp), str(op)], check=True, cwd=ROOT)
        return json.loads(op.read_text())


MATCHED = ["length=off", "teacher.backend=transformers", "teacher.logprobs=full", "loss.tail_bucket=false",
           "student.dtype=float32", "teacher.dtype=float32", "rollout.dtype=float32"]  # opd doing TRL's work


def run_opd(experiment: str | None, overrides: list[str], out: Path) -> Path:
    """bench_step.py on the experiment and overrides; its JSON path."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--out", str(out)]
    cmd += ([f"--experiment={experiment}"] if experiment else []) + overrides
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def opd_figures(path: Path) -> dict:
    """An opd bench_step JSON's seconds per phase, their spread, and its settings."""
    d = json.loads(path.read_text())
    return {"json": str(path), "overrides": d["overrides"], "seconds_per_phase": d["seconds_per_phase"],
            "spread": d.get("spread_per_phase"), "step": d["seconds_per_phase"]["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--steps", type=int, default=7, help="TRL steps (the first is not counted)")
    ap.add_argument("--opd-json", nargs=2, default=None, metavar=("MATCHED", "RECOMMENDED"),
                    help="bench_step JSONs of the matched and the recommended settings (else run both)")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    if args.worker:
        return worker(*args.worker)
    from opd.config import as_dict, load_config
    from opd.run_io import environment

    stamp, name = time.strftime("%Y%m%d-%H%M%S"), args.experiment or "default"
    cfg = load_config(([f"experiment={args.experiment}"] if args.experiment else []) + overrides)
    results = ROOT / "benchmarks" / "results"
    paths = [Path(p) for p in args.opd_json] if args.opd_json else [
        run_opd(args.experiment, [*overrides, *MATCHED], results / f"bench_step-{name}-matched-{stamp}.json"),
        run_opd(args.experiment, overrides, results / f"bench_step-{name}-{stamp}.json")]
    matched, recommended = (opd_figures(p) for p in paths)
    job = trl_job(cfg, args.steps)
    trl = run_trl(job)
    trl_s = trl["median_seconds_per_step"]
    result = {"benchmark": "trl_gkd", "experiment": args.experiment, "overrides": overrides,
              "matched_overrides": MATCHED, "config": as_dict(cfg), "environment": environment(),
              "rows_per_step": job["rows"], "max_new_tokens": job["max_new_tokens"], "trl": trl,
              "opd_matched": matched, "opd_recommended": {**recommended, "note": "other work than TRL's: "
                                                          "the experiment's own loss, teacher and length settings"},
              "trl_seconds_per_step": trl_s, "trl_over_opd_matched": trl_s / matched["step"],
              "trl_over_opd_recommended": trl_s / recommended["step"]}
    out = Path(args.out or results / f"trl_gkd-{name}-{stamp}.json")
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("rows_per_step", "trl_seconds_per_step", "trl_over_opd_matched",
                                             "trl_over_opd_recommended")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
