"""The on-policy distillation loop: the algorithm, top to bottom.

    for each step:
        prompts   <- the task's train prompts
        rollouts  <- the student samples G completions per prompt (vLLM rollout workers)
        scores    <- the teacher's log-probs of those exact tokens
        plan      <- the length monitor's statistics, events and penalties
        batch     <- rollouts + scores + penalties (+ SMPO pairs)
        metrics   <- one learner step (distillation + SMPO + SFT)
        sync      <- the learner's new weights into every rollout worker
        log; eval every N steps; checkpoint every M steps

With `loss.on_policy_fraction < 1` (GKD's lambda), the other steps train on off-policy
completions (the teacher's samples, or the dataset's answers) with the SFT term: at 0 this
is sequence-level KD. Nothing here knows whether the workers are Ray actors or plain objects.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from opd import length as L
from opd.batch import (answer_rollouts, build_pairs, build_train_batch, rollout_scores,
                       teacher_kl_metrics)
from opd.rollout import greedy_settings
from opd.console import Console
from opd.run_io import RunDir
from opd.tasks import Example, encode_answer, encode_prompt, exact_match, prompt_batch, sample_batch
from opd.types import PromptBatch, SamplingSettings, StepMetrics


def sampling_settings(r: Any, max_new_tokens: int, step: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, repetition_penalty=r.repetition_penalty, stop=tuple(r.stop),
                            stop_token_ids=tuple(r.stop_token_ids), seed=r.seed * 100003 + step,
                            n=r.samples_per_prompt)


def make_monitor(cfg: Any, eos_id: int, reference: Optional[L.ReferenceLengths]) -> L.LengthMonitor:
    ln = cfg.length
    det = L.DetectorConfig(**{k: getattr(ln, k) for k in (
        "ema_decay", "k_on", "k_off", "trunc_on", "trunc_off", "ratio_on", "ratio_off", "short_on",
        "short_off", "rep_on", "rep_off", "eos_on", "eos_off")})
    pen = L.PenaltyConfig(
        max_new_tokens=cfg.rollout.max_new_tokens, overlong_buffer=ln.overlong_buffer,
        stop_properly_mode=ln.stop_properly_mode, stop_properly_weight=ln.stop_properly_weight,
        length_ratio_coef=ln.length_ratio_coef, length_ratio_tolerance=ln.length_ratio_tolerance,
        adaptive_max_new_tokens=ln.adaptive_max_new_tokens and reference is not None, reference=reference)
    return L.LengthMonitor({eos_id} | set(cfg.rollout.stop_token_ids), pen, det, mode=ln.mode,
                           min_length=ln.min_length, ngram=ln.ngram, tail_window=ln.tail_window,
                           repeat_threshold=ln.repeat_threshold)


class Distillation:
    """State of one run; `run()` is the loop. `checkpoint()` can be called from outside
    (Ctrl-C, actor error) to save the last completed step."""

    def __init__(self, cfg: Any, workers: Any, tokenizer: Any, train: list[Example],
                 heldout: list[Example], run_dir: RunDir):
        self.cfg, self.w, self.tok, self.run_dir = cfg, workers, tokenizer, run_dir
        self.train_set, self.heldout = train, heldout
        self.rng = random.Random(cfg.seed)
        self.step, self.summary = 0, {}
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.monitor: Optional[L.LengthMonitor] = None
        self.reference: Optional[L.ReferenceLengths] = None

    # ------------------------------------------------------------------ the loop
    def run(self, resume_extra: Optional[dict] = None) -> dict:
        t_start = time.time()
        if resume_extra:
            self.restore(resume_extra)
        else:
            self.reference = self.reference_lengths()
            self.summary["teacher"] = self.score_texts(self.w.teacher_eval_texts or [])
            self.summary["student_before"] = self.evaluate()
            self.summary["sampled_before"] = self.sampled_stats()
            self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        console = Console(self.cfg.steps, self.cfg.log_every, start_step=self.step)
        console.note(f"held-out exact match: teacher {self.summary['teacher']:.3f}  "
                     f"student {self.summary['student_before']:.3f} (before)")
        for step in range(self.step + 1, self.cfg.steps + 1):
            t0 = time.time()
            prompts = self.next_prompts()
            if self.rng.random() < self.cfg.loss.on_policy_fraction:
                batch, values, events = self.on_policy_batch(prompts, step)
            else:
                batch, values, events = self.off_policy_batch(prompts, step)
            t1 = time.time()
            values.update(self.w.train(batch))
            t2 = time.time()
            update, versions = self.w.sync()
            t3 = time.time()
            self.step = step
            values.update({"time/learn": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0,
                           "sync/version": float(min(versions)), "sync/mb": len(update.blob) / 2**20})
            values["time/other"] = values["time/step"] - sum(
                values.get(k, 0.0) for k in ("time/generate", "time/teacher", "time/learn", "time/sync"))
            self.run_dir.log(StepMetrics(step, values, [e.as_dict() for e in events]))
            for e in events:
                console.note(f"length monitor: step {e.step} {e.condition} -> {e.state} ({e.reason})")
            console.step(step, values)
            if self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.cfg.steps:
                em = self.evaluate()
                self.run_dir.log(StepMetrics(step, {"eval/exact_match": em}))
                console.note(f"step {step}: held-out exact match {em:.3f}")
            if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and step < self.cfg.steps:
                self.checkpoint()
        console.close()
        self.summary["student_after"] = self.evaluate()
        self.summary["sampled_after"] = self.sampled_stats()
        self.summary["wall_seconds"] = time.time() - t_start
        self.checkpoint()
        return self.summary

    # ------------------------------------------------------------------ a step's batch
    def on_policy_batch(self, prompts: PromptBatch, step: int):
        G = self.cfg.rollout.samples_per_prompt
        rollouts = self.w.generate(prompts, sampling_settings(self.cfg.rollout, self.monitor.max_new_tokens, step))
        scores = self.w.score(rollouts)
        stats, events, plan = self.monitor.observe(rollouts.completion_ids, rollouts.finish_reasons, step)
        lengths, reasons = rollouts.lengths, rollouts.finish_reasons
        pairs = None
        if self.cfg.loss.smpo_coef:
            s = self.cfg.loss.smpo
            bad = None
            if plan.prefer_bad_rejected:
                flags = L.repetitive_flags(rollouts.completion_ids, self.cfg.length.ngram, self.cfg.length.tail_window,
                                           self.cfg.length.repeat_threshold)
                bad = L.rejection_badness(reasons, flags)
            pairs = build_pairs(rollout_scores(rollouts, scores, prompts.answers, G, s.pair_score),
                                G, s.min_score_gap, bad)
        batch = build_train_batch(
            rollouts, scores, self.pad, self.eos, on_policy=True, temperature=self.cfg.rollout.temperature,
            seq_weight_N=L.loss_weights(plan, reasons), seq_advantage_N=L.apply_sequence_penalty(plan, lengths, reasons),
            pairs=pairs)
        n_tok = sum(lengths)
        values = {**stats.as_metrics(), **plan.as_metrics(), **self.monitor.detector.metrics(),
                  **teacher_kl_metrics(rollouts, scores),
                  "rollout/train_exact_match": float(np.mean([exact_match(t, prompts.answers[n // G])
                                                              for n, t in enumerate(rollouts.texts)])),
                  "rollout/tokens": float(n_tok), "rollout/tokens_per_s": n_tok / max(1e-9, rollouts.seconds),
                  "rollout/weight_version": float(rollouts.weight_version), "rollout/on_policy": 1.0,
                  "time/generate": rollouts.seconds, "time/teacher": scores.seconds}
        if pairs is not None:
            values.update({"smpo/pairs": float(len(pairs.chosen_rows)), "smpo/pairs_skipped": float(pairs.skipped)})
        return batch, values, events

    def off_policy_batch(self, prompts: PromptBatch, step: int):
        """Teacher samples (sequence-level KD) or dataset answers, trained with SFT."""
        G, t0 = self.cfg.rollout.samples_per_prompt, time.time()
        if self.cfg.loss.off_policy_source == "teacher":
            rollouts = self.w.teacher_generate(prompts, sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step))
        else:
            rollouts = answer_rollouts([p for p in prompts.prompt_ids for _ in range(G)],
                                       [encode_answer(self.tok, a) for a in prompts.answers for _ in range(G)])
        batch = build_train_batch(rollouts, None, self.pad, self.eos, on_policy=False, temperature=1.0)
        stats = L.rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, {self.eos},
                                self.cfg.rollout.max_new_tokens)
        return batch, {**stats.as_metrics("offpolicy/"), "rollout/on_policy": 0.0,
                       "rollout/tokens": float(sum(rollouts.lengths)), "time/generate": time.time() - t0}, []

    # ------------------------------------------------------------------ data, eval, state
    def next_prompts(self) -> PromptBatch:
        exs = sample_batch(self.train_set, self.cfg.rollout.prompts_per_step, self.rng)
        return prompt_batch(self.tok, exs)

    def heldout_prompts(self) -> list[list[int]]:
        return [encode_prompt(self.tok, e) for e in self.heldout]

    def score_texts(self, texts: list[str]) -> float:
        return float(np.mean([exact_match(t, e.answer) for t, e in zip(texts, self.heldout)])) if texts else float("nan")

    def evaluate(self) -> float:
        """Held-out exact match of the current student, greedy decoding through vLLM."""
        if not self.heldout:
            return float("nan")
        return self.score_texts(self.w.greedy(self.heldout_prompts(), self.cfg.rollout.eval_max_new_tokens))

    def sampled_stats(self) -> dict[str, float]:
        """Length / EOS / truncation statistics of one sampled completion per held-out prompt
        at the rollout settings (the EOS rate of the student, in summary.json)."""
        if not self.heldout:
            return {}
        settings = replace(sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, 0), n=1)
        out = self.w.generate(prompt_batch(self.tok, self.heldout), settings)
        stats = L.rollout_stats(out.completion_ids, out.finish_reasons, {self.eos}, self.cfg.rollout.max_new_tokens,
                                min_length=self.cfg.length.min_length)
        return stats.as_metrics("")

    def reference_lengths(self) -> Optional[L.ReferenceLengths]:
        """Teacher greedy generations on a sample of train prompts (or the dataset's answers)."""
        n = self.cfg.length.reference_prompts
        if n > 0:
            exs = random.Random(self.cfg.seed + 1).sample(self.train_set, min(n, len(self.train_set)))
            out = self.w.teacher_generate(prompt_batch(self.tok, exs), greedy_settings(self.cfg.rollout.max_new_tokens))
            return L.reference_lengths(out.completion_ids)
        answers = [encode_answer(self.tok, e.answer) for e in self.train_set[:256] if e.answer]
        return L.reference_lengths(answers) if answers else None

    def checkpoint(self) -> Optional[str]:
        if self.step == 0:
            return None
        extra = {"step": self.step, "rng": list(self.rng.getstate()[1]), "rng_gauss": self.rng.getstate()[2],
                 "monitor": self.monitor.state_dict() if self.monitor else None, "summary": self.summary,
                 "reference": None if self.reference is None else [self.reference.mean, self.reference.p95]}
        path = self.w.call(self.w.learner, "save_checkpoint", str(self.run_dir.checkpoint_dir(self.step)), extra)
        self.run_dir.prune(self.cfg.keep_checkpoints)
        return path

    def restore(self, extra: dict) -> None:
        self.step = extra["step"]
        self.rng.setstate((3, tuple(extra["rng"]), extra["rng_gauss"]))
        self.summary = dict(extra["summary"])
        self.reference = L.ReferenceLengths(*extra["reference"]) if extra["reference"] else None
        self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        if extra.get("monitor"):
            self.monitor.load_state_dict(extra["monitor"])
        self.run_dir.truncate_metrics(self.step)
