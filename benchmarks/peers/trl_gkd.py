"""Peer benchmark: TRL's GKDTrainer on opd's models, prompts, batch and loss; seconds per step.

    make bench-peer ARGS="--experiment smollm2_cpu zoo_dir=/tmp/zoo"
    .venv/bin/python benchmarks/peers/trl_gkd.py --experiment smollm2_cpu zoo_dir=/tmp/zoo \
        [--opd-json benchmarks/results/bench_step-smollm2_cpu-<time>.json] [--steps 5]

Two halves, two interpreters:
- the driver (opd's venv) composes opd's config, resolves the same student and teacher,
  encodes the same prompts (each repeated samples_per_prompt times, so a TRL batch holds as
  many rollouts as an opd step) and, unless `--opd-json` names one, runs
  `benchmarks/bench_step.py` with the same experiment and overrides first;
- the worker (`--worker JOB OUT`, run by `.venv-trl/bin/python`, TRL 1.16 and nothing of
  opd) trains `trl.experimental.gkd.GKDTrainer` for `--steps` steps: lmbda=1 (every step
  samples from the student with HF `generate`, max_new_tokens and temperature as opd's
  rollouts, top_k=0), beta = opd's `loss.jsd_beta` on the teacher's full distribution,
  opd's learning rate, fp32, on CPU.
Writes JSON (both configs, environments, TRL's seconds per step, opd's, and the ratio) to
benchmarks/results/trl_gkd-<experiment>-<time>.json.
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
        dataloader_num_workers=0, disable_dropout=True, seed=job["seed"])
    data = Dataset.from_list([{"prompt_ids": p} for p in job["prompt_ids"]])
    timer = _step_timer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok, data_collator=_collator(tok.pad_token_id), callbacks=[timer])
    trainer.train()
    measured = timer.seconds[1:] or timer.seconds  # the first step warms up
    result = {"seconds_per_step": timer.seconds, "median_seconds_per_step": statistics.median(measured),
              "versions": {m: __import__(m).__version__ for m in ("trl", "torch", "transformers", "accelerate")},
              "gkd_config": {k: getattr(args, k) for k in ("lmbda", "beta", "temperature", "max_new_tokens",
                                                          "learning_rate", "per_device_train_batch_size")},
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


def run_opd(experiment: str | None, overrides: list[str], stamp: str) -> Path:
    """bench_step.py on the same experiment and overrides; its JSON path."""
    out = ROOT / "benchmarks" / "results" / f"bench_step-{experiment or 'default'}-{stamp}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--out", str(out)]
    cmd += ([f"--experiment={experiment}"] if experiment else []) + overrides
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--steps", type=int, default=5, help="TRL steps (the first is not counted)")
    ap.add_argument("--opd-json", default=None, help="a bench_step JSON of the same settings (else run it)")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    if args.worker:
        return worker(*args.worker)
    from opd.config import as_dict, load_config
    from opd.run_io import environment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(([f"experiment={args.experiment}"] if args.experiment else []) + overrides)
    opd_json = Path(args.opd_json) if args.opd_json else run_opd(args.experiment, overrides, stamp)
    opd = json.loads(opd_json.read_text())
    job = trl_job(cfg, args.steps)
    trl = run_trl(job)
    opd_s, trl_s = opd["seconds_per_phase"]["step"], trl["median_seconds_per_step"]
    result = {"benchmark": "trl_gkd", "experiment": args.experiment, "overrides": overrides,
              "config": as_dict(cfg), "environment": environment(), "opd_json": str(opd_json),
              "rows_per_step": job["rows"], "max_new_tokens": job["max_new_tokens"],
              "trl": trl, "opd_seconds_per_step": opd_s, "trl_seconds_per_step": trl_s,
              "trl_over_opd": trl_s / opd_s}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"trl_gkd-{args.experiment or 'default'}-{stamp}.json")
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("rows_per_step", "opd_seconds_per_step", "trl_seconds_per_step",
                                             "trl_over_opd")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
