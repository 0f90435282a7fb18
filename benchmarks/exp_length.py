"""Length-control proof runs: `length=off`, `monitor`, `auto`, and `auto` with each remedy
removed, on the toy's induced inflation or on the real pair's natural collapse; how fast the
truncated fraction falls back, and what happens to held-out KL, EOS, repetition and accuracy.

    .venv/bin/python benchmarks/exp_length.py                    # toy: gkd and opd losses, 60 steps
    .venv/bin/python benchmarks/exp_length.py --losses opd --steps 80
    .venv/bin/python benchmarks/exp_length.py --pair smollm2 --losses opd --steps 20 \
        --variants monitor auto auto-no-topk auto-no-mixture

The real pair (SmolLM2-135M-Instruct and its 10-of-30-layer student) needs no induction: the
student starts out looping and never stops. Its runs use `experiment=smollm2_cpu`.

Inflation is induced by pushing the zoo's student away from EOS: a short SFT (default 60
steps) on the task's answers followed by random filler characters and no EOS, so the student
keeps writing past its answer and most rollouts are cut at `max_new_tokens`. Every run then
starts from that same EOS-averse student. Reported per run: the truncated fraction at the
first steps and at the end, the first step from which it stays under `length.detector.trunc_off`
(the detector's off-threshold), the detector's events, and the held-out exact match before
and after. JSON goes to benchmarks/results/exp_length-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Optional

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


def run_variant(student: Optional[str], loss: str, variant: str, steps: int, root: Path,
                extra: list[str]) -> dict:
    from opd.config import load_config
    from opd.train import run_training

    run_dir = root / f"{loss}-{variant}"
    over = [f"loss={loss}", f"steps={steps}", "eval_every=0", "checkpoint_every=0", f"run_dir={run_dir}"]
    over += [f"student.path={student}"] if student else []
    cfg = load_config(over + extra + VARIANTS[variant])  # the variant's keys win
    s = run_training(cfg)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [l for l in lines if "length/truncated_frac" in l]
    trunc = [l["length/truncated_frac"] for l in steps_m]
    ev = s.get("eval", {})
    return {"loss": loss, "variant": variant, "steps": steps, "trunc_off": cfg.length.detector.trunc_off,
            "truncated_first5": trunc[:5], "truncated_last5": trunc[-5:],
            "recovered_at_step": recovery_step(trunc, cfg.length.detector.trunc_off),
            "mean_length_first5": [l["length/mean"] for l in steps_m[:5]],
            "mean_length_last5": [l["length/mean"] for l in steps_m[-5:]],
            "effective_weight_min": min(l.get("length/effective_weight", 1.0) for l in steps_m),
            "starved_steps": s.get("starved_steps", 0),
            "events": [e for l in lines for e in l.get("events", [])],
            "heldout": ev, "train_seconds": s["wall_seconds"], "truncated_series": trunc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--losses", nargs="*", default=["gkd", "opd"])
    ap.add_argument("--pair", choices=["toy", "smollm2"], default="toy",
                    help="toy: induced inflation; smollm2: the real pair from its natural start")
    ap.add_argument("--variants", nargs="*", default=["monitor", "auto"], choices=sorted(VARIANTS))
    ap.add_argument("--sft-steps", type=int, default=60, help="steps of EOS-averse SFT")
    ap.add_argument("--filler", type=int, default=20, help="filler characters after each answer")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.config import load_config
    from opd.run_io import environment
    from opd.zoo import resolve_model_paths

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(f"runs/exp_length-{args.pair}-{stamp}")
    student = None
    if args.pair == "smollm2":
        # the top-k teacher feeds remedy (a); the experiment turns it off for its own loss
        extra = ["experiment=smollm2_cpu", "teacher.logprobs=topk", "length.remedies.topk_kl_coef=1.0"] + extra
    else:
        cfg = load_config(extra)
        src, _ = resolve_model_paths(cfg)
        student = make_eos_averse_student(cfg, src, root / "eos_averse_student", args.sft_steps, args.filler)
    rows = [run_variant(student, loss, variant, args.steps, root, extra)
            for loss in args.losses for variant in args.variants]
    out = Path(args.out or f"benchmarks/results/exp_length-{args.pair}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": "exp_length", "args": vars(args), "extra_overrides": extra,
                               "rows": rows, "environment": environment()}, indent=2, default=str))
    print_table(rows)
    print(f"wrote {out}")


def before_after_cells(ev: dict, keys: list[tuple[str, str]]) -> str:
    """Held-out `before>after` of each key, as fixed-width cells of a table row."""
    return " ".join(f"{ev['before'].get(k, float('nan')):5.2f}>{ev['after'].get(k, float('nan')):5.2f}"
                    for k, _ in keys)


def print_table(rows: list[dict]) -> None:
    keys = [("kl", "KL"), ("nll_teacher_greedy", "NLL"), ("sampled/truncated_frac", "trunc"),
            ("sampled/eos_frac", "EOS"), ("sampled/repetition_frac", "rep"),
            ("greedy/repetition_frac", "rep(gr)"), ("accuracy/greedy", "acc")]
    head = " ".join(f"{n:>11s}" for _, n in keys)
    print(f"\n{'loss':5s} {'variant':17s} {'recovered@':>10s} {'starved':>7s} {head}  (held-out before -> after)")
    for r in rows:
        cells = before_after_cells(r["heldout"], keys)
        print(f"{r['loss']:5s} {r['variant']:17s} {str(r['recovered_at_step']):>10s} {r['starved_steps']:7d} {cells}")
    t = rows[0]["heldout"].get("teacher", {}) if rows else {}
    print("teacher: " + " ".join(f"{n} {t.get(k, float('nan')):.2f}" for k, n in keys[1:]))


if __name__ == "__main__":
    main()
