"""Length-control proof runs: the length controller (`length.control=pi`) against the
switching rule (`switch`), and `length=off` / `monitor` / `auto` with each remedy removed, in
three scenarios; how fast the truncated fraction falls back, whether it settles (its mean and
standard deviation over the last 20 steps), and what happens to held-out KL, NLL, EOS,
truncation, repetition (sampled and greedy) and accuracy.

    .venv/bin/python benchmarks/exp_length.py --scenario smollm2 --seeds 0 1     # (i)
    .venv/bin/python benchmarks/exp_length.py --scenario smollm2-opd             # (ii)
    .venv/bin/python benchmarks/exp_length.py --scenario toy                     # (iii)
    .venv/bin/python benchmarks/exp_length.py --scenario smollm2 --seeds 2 \
        --keep-layers 1,4,7,10,13,16,19,22,25,28 task.seed=99                    # another pair and prompts

Scenarios:
- `smollm2`: `experiment=smollm2_cpu` as it is (SmolLM2-135M-Instruct and its layer-dropped
  student, GKD with the teacher's top-20). The student starts out looping and never stops.
- `smollm2-opd`: the same pair with the sampled-token reverse KL (`loss=opd`), its natural
  collapse, with the teacher's top-20 for the top-k KL remedy; 60 steps unless --steps.
- `toy`: the toy zoo's induced inflation. A short SFT (default 60 steps) on the task's
  answers followed by random filler characters and no EOS makes the student EOS-averse, so
  most rollouts are cut at `max_new_tokens`; every run starts from that same student; losses
  gkd and opd, 60 steps unless --steps.

Every (loss, variant, control, seed) is one run. `--controls` applies to the `auto*`
variants (the others have no control: one run each). Any other argument is a config
override for every run (e.g. `task.seed=99`). JSON goes to
benchmarks/results/exp_length-<scenario>-<time>.json: the arguments, the environment, and per
run its resolved config and numbers (the training batch's truncation series and its mean and
standard deviation over the last 20 steps, the step it recovers at, the held-out views of
the teacher and of the student before and after, the detector's events, the final strengths).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def make_eos_averse_student(cfg, src: str, dst: Path, steps: int, filler: int, seed: int = 0) -> str:
    """SFT `src` on answer + random filler without EOS; save a Hugging Face model at `dst`."""
    from transformers import AutoModelForCausalLM

    from opd.tasks import TASK_ALPHABET, build_task, encode_prompt
    from opd.zoo import load_tokenizer, sft_batch

    tok = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    task = build_task(cfg.task.name, cfg.task.seed, 2000, cfg.task.heldout_size, cfg.task.max_digits,
                      cfg.task.min_chars, cfg.task.max_chars)
    rng, chars = random.Random(seed), TASK_ALPHABET.strip()
    pairs = []
    for ex in task.train():
        tail = "".join(rng.choice(chars) for _ in range(filler))
        pairs.append((encode_prompt(tok, ex), list(tok(ex.answer + tail, add_special_tokens=False)["input_ids"])))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        ids, attn, labels = sft_batch([pairs[rng.randrange(len(pairs))] for _ in range(64)], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return str(dst)


def recovery_step(trunc: list[float], threshold: float) -> int | None:
    """First step from which the truncated fraction stays under `threshold` to the end."""
    for i in range(len(trunc)):
        if all(t < threshold for t in trunc[i:]):
            return i + 1
    return None


VARIANTS = {  # name -> overrides: the modes, and auto with one remedy removed
    "off": ["length=off"], "monitor": ["length=monitor"], "auto": ["length=auto"],
    "auto-no-topk": ["length=auto", "length.remedies.topk_kl_coef=0"],
    "auto-no-mixture": ["length=auto", "length.remedies.mixture_fraction=0"],
    "auto-no-looptail": ["length=auto", "length.remedies.loop_tail_rule=false"],
    "auto-no-anchor": ["length=auto", "length.remedies.anchor_coef=0"],
    "auto-no-guard": ["length=auto", "length.penalties.min_effective_weight=0"],  # the old masking
}
SCENARIOS = {  # name -> (overrides, losses, steps; None: the experiment's own)
    "smollm2": (["experiment=smollm2_cpu"], ["gkd"], None),
    # the top-k teacher feeds remedy (a); the experiment turns it off for its own loss
    "smollm2-opd": (["experiment=smollm2_cpu", "teacher.logprobs=topk", "length.remedies.topk_kl_coef=1.0"],
                    ["opd"], 60),
    "toy": ([], ["gkd", "opd"], 60),
}
LAST = 20  # steps over which the training batch's truncation must have settled


def settled(trunc: list[float], last: int = LAST) -> dict:
    """Mean and standard deviation of the training batch's truncation over the last steps."""
    tail = np.asarray(trunc[-last:], np.float64)
    return {"steps": len(tail), "mean": float(tail.mean()) if len(tail) else None,
            "std": float(tail.std()) if len(tail) else None}


def run_one(student: Optional[str], loss: str, variant: str, control: Optional[str], seed: int,
            steps: Optional[int], root: Path, extra: list[str]) -> dict:
    from opd.config import load_config
    from opd.train import run_training

    name = "-".join([loss, variant] + ([control] if control else []) + [f"seed{seed}"])
    run_dir = root / name
    over = [f"loss={loss}", "eval_every=0", "checkpoint_every=0", f"run_dir={run_dir}", f"seed={seed}",
            f"rollout.seed={seed}"] + ([f"steps={steps}"] if steps else [])
    over += [f"student.path={student}"] if student else []
    over += VARIANTS[variant] + ([f"length.control={control}"] if control else [])
    cfg = load_config(extra + over)  # the run's own keys win
    s = run_training(cfg)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [l for l in lines if "length/truncated_frac" in l]
    trunc = [l["length/truncated_frac"] for l in steps_m]
    last = steps_m[-1] if steps_m else {}
    return {"loss": loss, "variant": variant, "control": control, "seed": seed, "steps": cfg.steps,
            "config": json.loads((run_dir / "config.json").read_text()), "trunc_off": cfg.length.detector.trunc_off,
            "train_truncated_last20": settled(trunc), "recovered_at_step": recovery_step(trunc, cfg.length.detector.trunc_off),
            "truncated_first5": trunc[:5], "truncated_last5": trunc[-5:],
            "mean_length_first5": [l["length/mean"] for l in steps_m[:5]],
            "mean_length_last5": [l["length/mean"] for l in steps_m[-5:]],
            "strengths_last": {k: v for k, v in last.items() if k.startswith("length/strength/")},
            "effective_weight_min": min((l.get("length/effective_weight", 1.0) for l in steps_m), default=None),
            "starved_steps": s.get("starved_steps", 0),
            "events": [e for l in lines for e in l.get("events", [])],
            "heldout": s.get("eval", {}), "train_seconds": s["wall_seconds"], "truncated_series": trunc}


def plan_runs(args) -> list[tuple[str, str, Optional[str], int]]:
    """(loss, variant, control, seed) of every run: controls only for the auto* variants."""
    losses = args.losses or SCENARIOS[args.scenario][1]
    return [(loss, variant, control, seed) for loss in losses for variant in args.variants
            for control in (args.controls if variant.startswith("auto") else [None]) for seed in args.seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="toy")
    ap.add_argument("--steps", type=int, default=None, help="default: the scenario's")
    ap.add_argument("--losses", nargs="*", default=None, help="default: the scenario's")
    ap.add_argument("--variants", nargs="*", default=["auto"], choices=sorted(VARIANTS))
    ap.add_argument("--controls", nargs="*", default=["switch", "pi"], choices=["switch", "pi"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--keep-layers", default=None, help="the smollm2 student's layers, e.g. 1,4,7,...,28")
    ap.add_argument("--sft-steps", type=int, default=60, help="toy: steps of EOS-averse SFT")
    ap.add_argument("--filler", type=int, default=20, help="toy: filler characters after each answer")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.config import load_config
    from opd.run_io import environment
    from opd.zoo import resolve_model_paths

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(f"runs/exp_length-{args.scenario}-{stamp}")
    extra = SCENARIOS[args.scenario][0] + extra
    if args.keep_layers:
        extra.append(f"zoo.keep_layers=[{args.keep_layers}]")
    student = None
    if args.scenario == "toy":
        cfg = load_config(extra)
        src, _ = resolve_model_paths(cfg)
        student = make_eos_averse_student(cfg, src, root / "eos_averse_student", args.sft_steps, args.filler)
    steps = args.steps or SCENARIOS[args.scenario][2]
    rows = [run_one(student, loss, variant, control, seed, steps, root, extra)
            for loss, variant, control, seed in plan_runs(args)]
    out = Path(args.out or f"benchmarks/results/exp_length-{args.scenario}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": "exp_length", "args": vars(args), "extra_overrides": extra,
                               "rows": rows, "environment": environment()}, indent=2, default=str))
    print_table(rows)
    print(f"wrote {out}")


def before_after_cells(ev: dict, keys: list[tuple[str, str]]) -> str:
    """Held-out `before>after` of each key, as fixed-width cells of a table row."""
    return " ".join(f"{ev['before'].get(k, float('nan')):5.2f}>{ev['after'].get(k, float('nan')):5.2f}"
                    for k, _ in keys)


KEYS = [("kl", "KL"), ("nll_teacher_greedy", "NLL"), ("accuracy/greedy", "acc"),
        ("sampled/truncated_frac", "trunc"), ("sampled/eos_frac", "EOS"), ("sampled/repetition_frac", "rep"),
        ("greedy/truncated_frac", "trunc(gr)"), ("greedy/eos_frac", "EOS(gr)"), ("greedy/repetition_frac", "rep(gr)")]


def print_table(rows: list[dict]) -> None:
    head = " ".join(f"{n:>11s}" for _, n in KEYS)
    print(f"\n{'loss':5s} {'variant':17s} {'control':7s} {'seed':>4s} {'recovered@':>10s} {'trunc20 mean/std':>16s} "
          f"{head}  (held-out before -> after)")
    for r in rows:
        t = r["train_truncated_last20"]
        cells = before_after_cells(r["heldout"], KEYS)
        tail = "-" if t["mean"] is None else f"{t['mean']:.2f}/{t['std']:.2f}"
        print(f"{r['loss']:5s} {r['variant']:17s} {str(r['control'] or '-'):7s} {r['seed']:4d} "
              f"{str(r['recovered_at_step']):>10s} {tail:>16s} {cells}")
    t = rows[0]["heldout"].get("teacher", {}) if rows else {}
    print("teacher: " + " ".join(f"{n} {t.get(k, float('nan')):.2f}" for k, n in KEYS[1:]))


if __name__ == "__main__":
    main()
