"""Turning a step's rollouts and teacher scores into the learner's TrainBatch.

Pure numpy: no torch, no Ray. Token t of a completion sits at sequence position
len(prompt) + t and is a trained token, EOS included (padding is not: pad and EOS are told
apart by position, never by id). Stop-properly penalties act through a per-row weight on the
sequence-level (policy-gradient) term, not through the token mask: a truncated rollout's
prefixes are still states the student visited, and the teacher's per-token distribution there
(which says "stop here") is exactly what the distribution-matching losses should learn.

SMPO pairs come from the G samples of each prompt: scored by the teacher (mean teacher
log-prob per token) or by the task's checker; chosen = best, rejected = worst (or, when the
length monitor asks for it, the worst among the truncated / repetitive ones); pairs whose
score gap is under a threshold are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from opd.data_parallel import by_teacher
from opd.tasks import answer_correct
from opd.types import PairBatch, PromptBatch, RolloutBatch, TeacherScores, TrainBatch

if TYPE_CHECKING:  # annotations only
    from opd.config import SmpoConfig
    from opd.length import PenaltyPlan


def _place(rows: Sequence[np.ndarray], prompt_lens: Sequence[int], S: int, tail: tuple,
           dtype, fill=0) -> np.ndarray:
    """Scatter per-completion arrays [L_n, *tail] into a [N, S, *tail] array at P_n + t."""
    out = np.full((len(rows), S, *tail), fill, dtype=dtype)
    for n, (r, P) in enumerate(zip(rows, prompt_lens)):
        out[n, P: P + len(r)] = r
    return out


def build_train_batch(rollouts: RolloutBatch, scores: Optional[TeacherScores], pad_id: int,
                      eos_id: int, on_policy: bool | np.ndarray, temperature: float,
                      seq_weight_N: Optional[np.ndarray] = None,
                      seq_advantage_N: Optional[np.ndarray] = None,
                      pairs: Optional[PairBatch] = None, sft_weight_N: Optional[np.ndarray] = None,
                      topk_kl_coef_N: Optional[np.ndarray] = None,
                      loop_tail_tokens_N: Optional[Sequence[int]] = None,
                      anchor_coef: float = 0.0) -> TrainBatch:
    """`on_policy`: per row (or one value for all) whether it is a student rollout;
    `sft_weight_N`: SFT weight per row (default 1 on off-policy rows, 0 on student rollouts);
    `topk_kl_coef_N`: per row, the weight of the top-k KL remedy;
    `loop_tail_tokens_N`: per row, how many final tokens may not get a positive advantage."""
    N, lens = len(rollouts.completion_ids), rollouts.lengths
    P = [len(p) for p in rollouts.prompt_ids]
    S = max(p + n for p, n in zip(P, lens))
    on = np.broadcast_to(np.asarray(on_policy, bool), (N,)).copy()
    ids = _place([np.asarray(p + c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)],
                 [0] * N, S, (), np.int64, pad_id)
    mask = _place([np.ones(n, np.float32) for n in lens], P, S, (), np.float32)
    sampler = _place([np.asarray(x, np.float32) for x in rollouts.sampler_logprobs], P, S, (), np.float32)
    teacher = (_teacher_arrays(scores, lens, P, S) if scores is not None
               else {"teacher_logprobs_BS": np.zeros((N, S), np.float32)})
    sft = (~on).astype(np.float32) if sft_weight_N is None else _per_row(sft_weight_N, N)
    topk_kl = None if topk_kl_coef_N is None else _per_row(topk_kl_coef_N, N)
    tails = None if loop_tail_tokens_N is None else _tail_mask(loop_tail_tokens_N, lens, P, S)
    return TrainBatch(input_ids_BS=ids, loss_mask_BS=mask, sampler_logprobs_BS=sampler,
                      seq_advantage_B=_per_row(seq_advantage_N, N, 0.0),
                      seq_weight_B=_per_row(seq_weight_N, N, 1.0), on_policy_B=on, sft_weight_B=sft,
                      temperature=temperature, pairs=pairs, rejected_eos_id=eos_id,
                      anchor_coef=float(anchor_coef), topk_kl_coef_B=topk_kl, loop_tail_BS=tails, **teacher)


def _per_row(values: Optional[np.ndarray], N: int, default: float = 0.0) -> np.ndarray:
    """[N] float32: `values`, or `default` on every row when None."""
    return np.full(N, default, np.float32) if values is None else np.asarray(values, np.float32)


def _teacher_arrays(scores: TeacherScores, lens: Sequence[int], P: Sequence[int], S: int) -> dict:
    """The teacher's per-token arrays at their sequence positions, as TrainBatch fields
    (top-k log-probs past a row's tokens are -inf, everything else 0)."""
    def place(a: np.ndarray, dtype=np.float32, fill: float = 0.0) -> np.ndarray:
        return _place([a[n, :n_tok] for n, n_tok in enumerate(lens)], P, S, a.shape[2:], dtype, fill)

    out = {"teacher_logprobs_BS": place(scores.logprobs_NT)}
    if scores.topk_ids_NTK is not None:
        out["teacher_topk_ids_BSK"] = place(scores.topk_ids_NTK, np.int64)
        out["teacher_topk_logprobs_BSK"] = place(scores.topk_logprobs_NTK, fill=-np.inf)
    if scores.full_logprobs_NTV is not None:
        out["teacher_full_logprobs_BSV"] = place(scores.full_logprobs_NTV)
    return out


def _tail_mask(tail_N: Sequence[int], lens: Sequence[int], P: Sequence[int], S: int) -> np.ndarray:
    """[N, S] float32: 1 on the last tail_N[n] completion tokens of row n."""
    rows = [(np.arange(n_tok) >= n_tok - k).astype(np.float32) for n_tok, k in zip(lens, tail_N)]
    return _place(rows, P, S, (), np.float32)


def with_extra_rows(rollouts: RolloutBatch, scores: TeacherScores,
                    extra: RolloutBatch) -> tuple[RolloutBatch, TeacherScores]:
    """A step's rollouts with off-policy rows (e.g. teacher completions) appended. The new
    rows' teacher scores are zeros (-inf top-k log-probs): they train by SFT only."""
    from dataclasses import replace

    T = max(scores.logprobs_NT.shape[1], max(extra.lengths, default=1))
    merged = replace(RolloutBatch.concat(rollouts, extra), weight_version=rollouts.weight_version,
                     seconds=rollouts.seconds)  # the step's own rollouts' weights and time
    return merged, scores.padded(len(merged.completion_ids), T)


def effective_weights(b: TrainBatch, terms: dict[str, bool]) -> dict[str, float]:
    """Share of the batch's trained tokens that carry gradient, per loss term, weighted by each
    term's per-row weight (stop-properly's 0.1 counts 0.1), and `any` for the union. `terms`
    names the terms the loss uses: pg, jsd, sft, smpo, topk_kl (the length remedy), anchor.

    Exact and pure: a batch whose every rollout is masked reads 0.0, and the loop says so."""
    mask = b.loss_mask_BS
    total = float(mask.sum())
    if total == 0:
        return {"length/effective_weight": 0.0}
    on = b.on_policy_B.astype(np.float32)
    per_row = {"pg": b.seq_weight_B * b.on_policy_B, "jsd": on, "anchor": on,
               "sft": b.sft_weight_B.clip(max=1.0),
               "topk_kl": (b.topk_kl_coef_B > 0).astype(np.float32) * b.on_policy_B
               if b.topk_kl_coef_B is not None else np.zeros(len(mask), np.float32),
               "smpo": np.isin(np.arange(len(mask)), np.concatenate(
                   [b.pairs.chosen_rows, b.pairs.rejected_rows])).astype(np.float32)
               if b.pairs is not None else np.zeros(len(mask), np.float32)}
    used = {k: np.asarray(v, np.float32) for k, v in per_row.items() if terms.get(k)}
    out = {f"length/effective_weight/{k}": float((mask * v[:, None]).sum()) / total for k, v in used.items()}
    union = np.max(np.stack(list(used.values())), 0) if used else np.zeros(len(mask), np.float32)
    out["length/effective_weight"] = float((mask * union[:, None]).sum()) / total
    return out


def rollout_scores(rollouts: RolloutBatch, scores: Optional[TeacherScores], prompts: PromptBatch,
                   G: int, mode: str) -> np.ndarray:
    """Per-rollout quality: mean teacher log-prob per token ('teacher') or 1/0 whether the
    extracted answer is right ('checker')."""
    if mode == "checker":
        return np.array([float(answer_correct(t, prompts.answers[n // G], prompts.extraction(n // G)))
                         for n, t in enumerate(rollouts.texts)], np.float32)
    lens = np.maximum(1, np.asarray(rollouts.lengths))
    return (scores.logprobs_NT.sum(1) / lens).astype(np.float32)


def build_pairs(score_N: np.ndarray, G: int, min_gap: float,
                badness_N: Optional[np.ndarray] = None) -> PairBatch:
    """Best vs worst sample of each prompt. With `badness_N` (the length monitor's
    preference), the rejected one is the lowest-scoring among the worst-badness samples."""
    chosen, rejected, gaps, skipped = [], [], [], 0
    for g in range(len(score_N) // G):
        idx = np.arange(g * G, (g + 1) * G)
        best = idx[np.argmax(score_N[idx])]
        pool = idx
        if badness_N is not None and badness_N[idx].max() > 0:
            pool = idx[badness_N[idx] == badness_N[idx].max()]
            pool = pool[pool != best] if len(pool) > 1 else pool
        worst = pool[np.argmin(score_N[pool])]
        gap = float(score_N[best] - score_N[worst])
        if worst == best or gap < min_gap:
            skipped += 1
            continue
        chosen.append(best), rejected.append(worst), gaps.append(gap)
    return PairBatch(np.asarray(chosen, np.int64), np.asarray(rejected, np.int64),
                     np.asarray(gaps, np.float32), skipped)


def answer_rollouts(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]]) -> RolloutBatch:
    """Dataset answers as a RolloutBatch (off-policy SFT on references)."""
    return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], completion_ids=[list(a) for a in answer_ids],
                        sampler_logprobs=[[0.0] * len(a) for a in answer_ids],
                        finish_reasons=["stop"] * len(answer_ids), texts=[""] * len(answer_ids),
                        weight_version=-1)


def teacher_kl_metrics(rollouts: RolloutBatch, scores: TeacherScores) -> dict[str, float]:
    """Sampled estimate of KL(student||teacher) per token: mean of log p_s - log p_t."""
    diffs = [np.asarray(lp, np.float64) - scores.logprobs_NT[n, : len(lp)]
             for n, lp in enumerate(rollouts.sampler_logprobs) if lp]
    flat = np.concatenate(diffs) if diffs else np.zeros(1)
    return {"teacher/kl": float(flat.mean()),
            "teacher/logp_mean": float(np.mean([scores.logprobs_NT[n, :l].mean() for n, l in
                                                enumerate(rollouts.lengths) if l] or [0.0]))}


def per_teacher_metrics(rollouts: RolloutBatch, scores: TeacherScores, teachers: Sequence[str]) -> dict[str, float]:
    """teacher/<name>/kl (as teacher/kl, over that teacher's rows), /rows and /tokens for each
    teacher that scored some of the rollouts (row n: `teachers[n]`; none: {})."""
    out = {}
    for name, rows in by_teacher(teachers).items():
        lps = [(n, np.asarray(rollouts.sampler_logprobs[n], np.float64)) for n in rows]
        diff = sum(float((lp - scores.logprobs_NT[n, : len(lp)]).sum()) for n, lp in lps)
        tokens = sum(len(lp) for _, lp in lps)
        out.update({f"teacher/{name}/kl": diff / tokens if tokens else 0.0,
                    f"teacher/{name}/rows": float(len(rows)), f"teacher/{name}/tokens": float(tokens)})
    return out


def select_pairs(rollouts: RolloutBatch, scores: TeacherScores, prompts: PromptBatch, G: int,
                 smpo: SmpoConfig, plan: PenaltyPlan, repetitive_N: Sequence[bool],
                 malformed_N: Optional[Sequence[bool]] = None) -> PairBatch:
    """SMPO's pairs: best vs worst sample of each prompt; a bad one (truncated, looping) as
    rejected when `smpo.prefer_bad_rejected` says so ("auto": when the length monitor's plan
    asks), and a malformed one when the format checks ask."""
    from dataclasses import replace

    prefer = {"auto": plan.prefer_bad_rejected, "always": True, "never": False}[smpo.prefer_bad_rejected]
    bad = replace(plan, prefer_bad_rejected=prefer).rejection_preference(
        rollouts.finish_reasons, repetitive_N, malformed_N)
    return build_pairs(rollout_scores(rollouts, scores, prompts, G, smpo.pair_score), G, smpo.min_score_gap, bad)


@dataclass(frozen=True)
class RowWeights:
    """Per-row weights of a step's batch (build_train_batch's keyword arguments), N rows."""

    on_policy: np.ndarray  # [N] bool: a student rollout
    seq_weight_N: np.ndarray  # [N] the policy-gradient term's weight (stop-properly)
    seq_advantage_N: np.ndarray  # [N] the sequence-level length penalty
    sft_weight_N: Optional[np.ndarray] = None  # [N] SFT weight (None: 0 on student rollouts)
    topk_kl_coef_N: Optional[np.ndarray] = None  # [N] the top-k KL remedy's weight
    loop_tail_tokens_N: Optional[list[int]] = None  # [N] looping-tail lengths (the loop-tail rule)

    def with_sft_rows(self, k: int, sft_coef: float) -> "RowWeights":
        """`k` off-policy rows appended (teacher completions), trained by SFT only."""
        n = len(self.on_policy)
        return RowWeights(np.r_[self.on_policy, np.zeros(k, bool)], np.r_[self.seq_weight_N, np.zeros(k)],
                          np.r_[self.seq_advantage_N, np.zeros(k)],
                          np.r_[np.zeros(n) if self.sft_weight_N is None else self.sft_weight_N,
                                np.full(k, sft_coef)],
                          None if self.topk_kl_coef_N is None else np.r_[self.topk_kl_coef_N, np.zeros(k)],
                          None if self.loop_tail_tokens_N is None else list(self.loop_tail_tokens_N) + [0] * k)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
