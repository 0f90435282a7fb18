"""A step's TrainBatch, from its parts: what the driver loop (opd/loop.py) hands the learner.

On-policy: the student's rollouts and the teacher's scores of them, shaped by the length
monitor's plan (per-row weights and penalties, the top-k KL remedy, the loop-tail rule, the
teacher mixture rows), with SMPO's pairs and the format checks. Off-policy (GKD's lambda < 1):
the teacher's samples or the dataset's answers, trained by SFT. Each comes with the step's
metrics so far; the loop adds training, sync and timing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from opd import length
from opd.batch import (RowWeights, answer_rollouts, build_train_batch, per_teacher_metrics, select_pairs,
                       teacher_kl_metrics, with_extra_rows)
from opd.formatting import RolloutFormat, check_rollouts
from opd.tasks import answer_correct, encode_answer
from opd.types import LoopWorkers, PromptBatch, RolloutBatch, SamplingSettings, TeacherScores, TrainBatch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import FormatConfig, RolloutConfig, TrainConfig


STEP_SEED_STRIDE = 100003  # rollout.seed's spacing: seeds of different runs never meet
# The step whose seed the teacher's reference sample takes: one no run reaches, and never
# negative (vLLM reads a seed of -1 as unseeded).
REFERENCE_STEP = STEP_SEED_STRIDE - 1


def sampling_settings(r: RolloutConfig, max_new_tokens: int, step: int) -> SamplingSettings:
    """rollout.*'s sampling at `max_new_tokens`, seeded for step `step`."""
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, repetition_penalty=r.repetition_penalty, stop=tuple(r.stop),
                            stop_token_ids=tuple(r.stop_token_ids), seed=r.seed * STEP_SEED_STRIDE + step,
                            n=r.samples_per_prompt)


@dataclass(frozen=True)
class StepResult:
    """A step's batch, its metrics so far (the loop adds training, sync and timing) and the
    length monitor's events."""

    batch: TrainBatch
    metrics: dict[str, float]
    events: list[length.LengthEvent] = field(default_factory=list)


def rollout_format(f: FormatConfig, rollouts: RolloutBatch, special_ids: set) -> Optional[RolloutFormat]:
    """Format checks of a step's rollouts (None when format.rollouts is off or no check is on)."""
    if not (f.rollouts and f.checks):
        return None
    return check_rollouts(rollouts.texts, rollouts.completion_ids, f.checks, f.extra_tokens, special_ids)


def row_weights(plan: length.PenaltyPlan, stats: length.LengthStats, rollouts: RolloutBatch,
                malformed: Optional[list[bool]]) -> RowWeights:
    """The plan's per-row weights for a step's student rollouts."""
    reasons = rollouts.finish_reasons
    return RowWeights(on_policy=np.ones(len(reasons), bool), seq_weight_N=length.loss_weights(plan, reasons, malformed),
                      seq_advantage_N=length.apply_sequence_penalty(plan, rollouts.lengths, reasons),
                      topk_kl_coef_N=plan.topk_kl_coef_N(stats, reasons),
                      loop_tail_tokens_N=plan.loop_tail_tokens_N(stats))


class StepBatches:
    """Builds a step's TrainBatch and its metrics; asks the workers only for teacher samples
    (the mixture rows, sequence-level KD)."""

    def __init__(self, cfg: TrainConfig, workers: LoopWorkers, tokenizer: Any):
        self.cfg, self.workers, self.tok = cfg, workers, tokenizer
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])

    def on_policy(self, prompts: PromptBatch, rollouts: RolloutBatch, scores: TeacherScores,
                  stats: length.LengthStats, plan: length.PenaltyPlan, step: int) -> tuple[TrainBatch, dict]:
        """The student's scored rollouts shaped by the length monitor's plan (penalties, the
        top-k KL remedy, the loop-tail rule, teacher mixture rows), and the step's metrics."""
        fmt = rollout_format(self.cfg.format, rollouts, self.special_ids)
        malformed = fmt.malformed if fmt is not None else None
        pairs = (select_pairs(rollouts, scores, prompts, self.cfg.rollout.samples_per_prompt, self.cfg.loss.smpo,
                              plan, stats.repetitive, malformed) if self.cfg.loss.smpo_coef else None)
        metrics = {**self.rollout_metrics(prompts, rollouts, scores, step), **(fmt.metrics() if fmt else {})}
        if pairs is not None:
            metrics.update({"smpo/pairs": float(len(pairs.chosen_rows)), "smpo/pairs_skipped": float(pairs.skipped)})
        rows = row_weights(plan, stats, rollouts, malformed)
        t_mix = time.time()
        mix = self.teacher_mixture(prompts, plan, step)
        metrics["time/teacher_generate"] = time.time() - t_mix  # the mixture rows' teacher samples
        if mix is not None:  # StableOPD's rollout mixture: teacher rows, trained by SFT
            rollouts, scores = with_extra_rows(rollouts, scores, mix)
            rows = rows.with_sft_rows(len(mix.completion_ids), plan.mixture_sft_coef)
            metrics["length/mixture_rows"] = float(len(mix.completion_ids))
        batch = build_train_batch(rollouts, scores, self.pad, self.eos, temperature=self.cfg.rollout.temperature,
                                  pairs=pairs, anchor_coef=plan.anchor_coef, **rows.as_kwargs())
        r = self.cfg.rollout
        if metrics["rollout/staleness"] > 0 and r.overlap_correction == "tis":
            batch = replace(batch, is_cap=r.overlap_tis_cap)
        return batch, metrics

    def rollout_metrics(self, prompts: PromptBatch, rollouts: RolloutBatch, scores: TeacherScores,
                        step: int) -> dict[str, float]:
        """The rollouts against the teacher (and each teacher, with several) and the prompts'
        answers, their tokens and age."""
        G, n_tok = self.cfg.rollout.samples_per_prompt, sum(rollouts.lengths)
        hits = [answer_correct(t, prompts.answers[n // G], prompts.extraction(n // G))
                for n, t in enumerate(rollouts.texts)]
        return {**teacher_kl_metrics(rollouts, scores), "rollout/train_accuracy": float(np.mean(hits)),
                **per_teacher_metrics(rollouts, scores, prompts.rollout_teachers(G)),
                "rollout/tokens": float(n_tok), "rollout/tokens_per_s": n_tok / max(1e-9, rollouts.seconds),
                "rollout/weight_version": float(rollouts.weight_version), "rollout/on_policy": 1.0,
                # step - 1: the newest weights a rollout of this step can come from
                "rollout/staleness": float(step - 1 - rollouts.weight_version),
                # a generation that overlapped the previous step is not part of this one's time
                "time/generate" if not self.cfg.rollout.overlap else "time/generate_overlapped":
                    rollouts.seconds, "time/teacher": scores.seconds}

    def teacher_mixture(self, prompts: PromptBatch, plan: length.PenaltyPlan, step: int) -> Optional[RolloutBatch]:
        """Teacher completions for a share of this step's prompts, the ones that end in EOS
        (None when the remedy is off or none stopped)."""
        k = math.ceil(plan.mixture_fraction * len(prompts.prompt_ids))
        if k == 0:
            return None
        settings = replace(sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step), n=1)
        out = self.workers.teacher_generate(prompts.rows(slice(0, k)), settings)
        keep = [i for i, r in enumerate(out.finish_reasons) if r == "stop"]
        return out.select(keep) if keep else None

    def off_policy(self, prompts: PromptBatch, step: int) -> StepResult:
        """Teacher samples (sequence-level KD) or dataset answers, trained with SFT."""
        r, G, t0 = self.cfg.rollout, self.cfg.rollout.samples_per_prompt, time.time()
        if self.cfg.loss.off_policy_source == "teacher":
            rollouts = self.workers.teacher_generate(prompts, sampling_settings(r, r.max_new_tokens, step))
        else:
            rollouts = answer_rollouts([p for p in prompts.prompt_ids for _ in range(G)],
                                       [encode_answer(self.tok, a) for a in prompts.answers for _ in range(G)])
        batch = build_train_batch(rollouts, None, self.pad, self.eos, on_policy=False, temperature=1.0,
                                  sft_weight_N=np.full(len(rollouts.completion_ids), self.cfg.loss.sft_coef))
        stats = length.rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, {self.eos}, r.max_new_tokens,
                                     self.cfg.length.stats)
        return StepResult(batch, {**stats.as_metrics("offpolicy/"), "rollout/on_policy": 0.0,
                                  "rollout/tokens": float(sum(rollouts.lengths)), "time/generate": time.time() - t0})
