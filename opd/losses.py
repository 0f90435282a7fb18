"""Losses for on-policy distillation: pure functions over torch tensors.

Every loss takes tensors and plain values (no config objects, no Ray, no I/O) and returns
``(loss, metrics)``: ``loss`` is a 0-dim tensor with autograd, ``metrics`` a
``dict[str, float]`` of detached values under namespaced keys (``loss/jsd``, ``kl/k3``, ...).
Shapes are in the names: B batch rows, T tokens, V vocabulary, K teacher top-k entries.

Sources
- Generalized JSD: Agarwal et al. 2023, "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes" (GKD), arXiv:2306.13649.
- Sampled-token reverse KL as a per-token advantage: Thinking Machines, "On-Policy
  Distillation" (2025, Tinker cookbook) and verl's distillation recipe; PPO clipping:
  Schulman et al. 2017; truncated importance sampling (TIS): Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training".
- SMPO-style preference loss: the SimPO family (Meng et al. 2024: length-normalised
  implicit reward, no reference model, target margin) with SMPO's stabilisers against EOS
  collapse (EOS protection, winsorization and a floor on rejected log-probs, SFT terms).

Conventions (all functions)
- ``mask_BT`` holds per-token weights in [0, 1] (bool or float): 1 = trained token,
  0 = prompt/padding; fractional values down-weight tokens (e.g. truncated rollouts).
- Token mean: ``sum(per_token * mask) / normalizer``; ``normalizer`` defaults to
  ``mask.sum()`` clamped to >= 1. Passing the full batch's token count makes the sum of the
  micro-batch losses equal the full-batch loss (gradient-accumulation invariance).
- Values at mask == 0 are never read into the loss (``torch.where`` before any product),
  so padding may hold -inf or garbage. -inf log-probs inside the mask are replaced by
  ``LOGP_FLOOR``; losses and gradients stay finite.
- Temperatures divide logits before the softmax. Teacher log-probs handed in as log-probs
  (top-k, sampled token) are used as given: vLLM ``prompt_logprobs`` are at temperature 1.
- Stabilisers are out-of-place ops with row-wise bounds (``torch.where``/``torch.clamp``),
  never assignment through a boolean-mask copy.
- Logits or hidden states: ``gather_logprobs``, ``generalized_jsd(_topk)`` take (B, T, V)
  logits. The learner never holds those: ``logprobs_from_hidden`` runs the LM head on final
  hidden states chunk by chunk and returns what the losses need per token (log-probs at given
  ids, full-vocabulary divergences); ``topk_jsd_from_logprobs`` and ``divergence_loss`` turn
  them into the same losses (tests compare values and gradients).

Deliberate departures from the papers / public code
1. ``generalized_jsd``: beta=0 and beta=1 are the plain forward / reverse KLs (as in TRL's
   GKD trainer); for 0 < beta < 1 the GKD JSD(beta) is used unscaled, so it tends to 0,
   not to the KLs, as beta approaches 0 or 1.
2. Log-probs of exactly -inf are replaced by ``LOGP_FLOOR`` (-80), and teacher log-probs
   are clamped to it: a teacher that gives a token zero probability yields a large finite
   reverse KL / advantage instead of an infinite one.
3. ``reverse_kl_pg_loss`` with ``tis_cap``: the TIS weight replaces PPO clipping (see there).
4. ``smpo_loss``: the stabilisers act (the public SMPO code writes them through a
   boolean-mask copy, so they are no-ops there); SFT terms are token means.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd.types import EOS_PROTECTIONS, SMPO_LOSS_TYPES

# Stand-in for log(0). exp(-80) is still a normal float32 (no denormal slow paths), and a
# probability below it is zero for every purpose here.
LOGP_FLOOR = -80.0

Metrics = dict[str, float]


# ----------------------------------------------------------------------------- helpers
def masked_token_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor,
                      normalizer: float | None = None) -> torch.Tensor:
    """Token mean ``sum(x * mask) / normalizer`` (default normalizer: mask.sum(), >= 1).

    Entries where mask == 0 are dropped with ``torch.where`` (inf/NaN there cannot leak
    into the value or the gradient). Shapes: x_BT and mask_BT broadcastable -> 0-dim.
    """
    mask = mask_BT.to(x_BT.dtype)
    total = torch.where(mask > 0, x_BT * mask, torch.zeros_like(x_BT)).sum()
    if normalizer is None:
        return total / mask.sum().clamp(min=1.0)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


def _metric_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mask-weighted mean as a Python float (0.0 for an empty mask); for metrics only."""
    x, mask = x.detach().double(), mask.detach().double()
    den = mask.sum().item()
    return torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum().item() / den if den > 0 else 0.0


def _floor_neginf(logp: torch.Tensor) -> torch.Tensor:
    """Replace exact -inf log-probs by LOGP_FLOOR (gradient 0 there), keep the rest."""
    return torch.where(torch.isneginf(logp), torch.full_like(logp, LOGP_FLOOR), logp)


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (bf16/fp16 are upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def _maybe_checkpoint(fn, *args):
    """Run fn(*args); under autograd, recompute it in backward instead of saving its
    (chunk, V) temporaries, so that only one chunk's temporaries are alive at a time."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = sum_v p_v (log p_v - log q_v) over the last dim (finite log-probs)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _gjsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD over the last dim between student s and teacher t (see generalized_jsd)."""
    logp_s = _floor_neginf(logp_s)
    logp_t = logp_t.detach().clamp(min=LOGP_FLOOR)
    if beta == 0.0:
        return _kl(logp_t, logp_s)                       # KL(teacher‖student)
    if beta == 1.0:
        return _kl(logp_s, logp_t)                       # KL(student‖teacher)
    logm = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log(1.0 - beta))
    return beta * _kl(logp_t, logm) + (1.0 - beta) * _kl(logp_s, logm)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


# ------------------------------------------------------------------ full-vocabulary JSD
def _jsd_chunk(student_NV, teacher_NV, rows, weights, beta, temperature):
    dtype = _float_dtype(student_NV)
    logp_s = torch.log_softmax(student_NV.index_select(0, rows).to(dtype) / temperature, -1)
    logp_t = torch.log_softmax(teacher_NV.index_select(0, rows).to(dtype) / temperature, -1)
    return (weights.to(dtype) * _gjsd(logp_s, logp_t, beta)).sum()


def _check_jsd_inputs(student_BTV, teacher_BTV, mask_BT, beta, normalizer) -> None:
    """ValueError unless beta, normalizer, vocabularies and shapes suit `generalized_jsd`."""
    _check_beta(beta)
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    v_s, v_t = student_BTV.shape[-1], teacher_BTV.shape[-1]
    if v_s != v_t:
        hint = (f"slice student_logits_BTV[..., :{v_t}] if the extra rows are padding"
                if v_s > v_t else "the teacher's vocabulary is larger than the student's")
        raise ValueError(f"vocab mismatch: student V={v_s}, teacher V={v_t}: {hint}")
    if student_BTV.shape[:-1] != teacher_BTV.shape[:-1] or mask_BT.shape != student_BTV.shape[:-1]:
        raise ValueError(f"shape mismatch: student {tuple(student_BTV.shape)}, "
                         f"teacher {tuple(teacher_BTV.shape)}, mask {tuple(mask_BT.shape)}")


def generalized_jsd(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor,
                    mask_BT: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
                    chunk_size: int = 512, normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023), token mean.

    With p_s = softmax(student/temperature), p_t = softmax(teacher/temperature):
      beta = 0:      KL(teacher‖student) = sum_v p_t (log p_t - log p_s)   (forward KL)
      beta = 1:      KL(student‖teacher) = sum_v p_s (log p_s - log p_t)   (reverse KL)
      0 < beta < 1:  beta KL(teacher‖m) + (1-beta) KL(student‖m),
                     m = beta p_t + (1-beta) p_s, log m = logaddexp(log beta + log p_t,
                     log(1-beta) + log p_s).
    loss = sum_{b,t} mask * D_{b,t} / normalizer. Teacher logits are constants (detached).
    Only positions with mask > 0 are computed, ``chunk_size`` tokens at a time; under
    autograd each chunk is recomputed in backward, so one chunk's (chunk, V) float32
    temporaries are alive at a time.

    Shapes: student_logits_BTV, teacher_logits_BTV (B, T, V); mask_BT (B, T) -> loss ().
    Vocabularies must match: if the student's is larger (padding rows), slice
    ``student_logits_BTV[..., :V_teacher]`` first; anything else raises ValueError.
    """
    _check_jsd_inputs(student_logits_BTV, teacher_logits_BTV, mask_BT, beta, normalizer)
    student_NV = student_logits_BTV.reshape(-1, student_logits_BTV.shape[-1])
    teacher_NV = teacher_logits_BTV.detach().reshape(-1, teacher_logits_BTV.shape[-1])
    mask_N = mask_BT.reshape(-1).to(_float_dtype(student_NV))
    rows = (mask_N > 0).nonzero().squeeze(1)
    total = student_NV.reshape(-1)[:0].sum().to(mask_N.dtype)   # 0 with a grad_fn
    for chunk in rows.split(max(int(chunk_size), 1)):
        total = total + _maybe_checkpoint(_jsd_chunk, student_NV, teacher_NV, chunk,
                                          mask_N[chunk], beta, temperature)
    norm = mask_N.sum().clamp(min=1.0) if normalizer is None else normalizer
    loss = total / norm
    return loss, {"loss/jsd": loss.item()}


# ------------------------------------------------------------------------- top-k JSD
def _first_occurrence(ids_BTK: torch.Tensor) -> torch.Tensor:
    """True where an id does not repeat an earlier id at the same position."""
    k = ids_BTK.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids_BTK.device).tril(-1)
    return ~((ids_BTK.unsqueeze(-1) == ids_BTK.unsqueeze(-2)) & earlier).any(-1)


def _with_tail(logp_BTK: torch.Tensor) -> torch.Tensor:
    """Append a bucket with log(1 - sum_k p_k); K entries summing above 1 are rescaled."""
    lse = torch.logsumexp(logp_BTK, -1, keepdim=True)
    logp_BTK = logp_BTK - lse.clamp(min=0.0)
    tail = torch.log(torch.clamp(-torch.expm1(lse.clamp(max=0.0)), min=torch.finfo(logp_BTK.dtype).tiny))
    return torch.cat([logp_BTK, tail.clamp(min=LOGP_FLOOR)], -1)


def generalized_jsd_topk(student_logits_BTV: torch.Tensor, teacher_topk_logprobs_BTK: torch.Tensor,
                         teacher_topk_ids_BTK: torch.Tensor, mask_BT: torch.Tensor, beta: float = 0.0,
                         temperature: float = 1.0, tail_bucket: bool = True,
                         normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Generalized JSD of GKD over a teacher's top-k support (same beta convention as
    ``generalized_jsd``: beta=0 KL(teacher‖student), beta=1 KL(student‖teacher)).

    ``teacher_topk_logprobs_BTK`` are log-probs of the teacher's FULL distribution at
    ``teacher_topk_ids_BTK`` (used as given; ``temperature`` divides the student logits only).
    The student's log-probs log p_s(k) = log_softmax(student/temperature)[ids_k] come from
    its full vocabulary. Support:
      tail_bucket=False: both sides renormalised over the K entries (log_softmax over K);
      tail_bucket=True:  the K entries as they are plus a bucket K+1 holding 1 - sum_k p(k)
                         for each side, log(1 - sum p) = log(-expm1(logsumexp(log p))).
    Then D = the generalized JSD over that support; loss = token mean over mask.
    Entries whose id repeats an earlier id at that position, or whose teacher log-prob is
    -inf (padding), are left out of the support (student mass there falls in the tail).
    Stability: forward KL (beta=0) with a tail bucket is the stable choice; top-k reverse
    KL (beta=1) was reported unstable in practice (the student is only constrained on the
    teacher's support).

    Shapes: student_logits_BTV (B, T, V); teacher_topk_*_BTK (B, T, K); mask_BT (B, T) -> ().
    """
    _check_beta(beta)
    logp_s = _gather_chunked(student_logits_BTV, teacher_topk_ids_BTK.long(), temperature, 1024)
    return topk_jsd_from_logprobs(logp_s, teacher_topk_logprobs_BTK, teacher_topk_ids_BTK, mask_BT,
                                  beta=beta, tail_bucket=tail_bucket, normalizer=normalizer)


def topk_jsd_from_logprobs(student_topk_logprobs_BTK: torch.Tensor, teacher_topk_logprobs_BTK: torch.Tensor,
                           teacher_topk_ids_BTK: torch.Tensor, mask_BT: torch.Tensor, beta: float = 0.0,
                           tail_bucket: bool = True,
                           normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """`generalized_jsd_topk` from the student's log-probs at the teacher's top-k ids,
    log_softmax(student / temperature)[ids] (e.g. from `logprobs_from_hidden`), instead of
    its logits. Any leading shape: (B, T, K) or (N, K) with mask (B, T) or (N,) -> ()."""
    _check_beta(beta)
    ids, logp_s = teacher_topk_ids_BTK.long(), student_topk_logprobs_BTK
    logp_t = teacher_topk_logprobs_BTK.detach().to(logp_s.dtype)
    valid = _first_occurrence(ids) & ~torch.isneginf(logp_t)
    floor = torch.full_like(logp_s, LOGP_FLOOR)
    logp_s = torch.where(valid, _floor_neginf(logp_s), floor)
    logp_t = torch.where(valid, logp_t.clamp(min=LOGP_FLOOR), floor)
    if tail_bucket:
        logp_s, logp_t = _with_tail(logp_s), _with_tail(logp_t)
    else:
        logp_s, logp_t = torch.log_softmax(logp_s, -1), torch.log_softmax(logp_t, -1)
    loss = masked_token_mean(_gjsd(logp_s, logp_t, beta), mask_BT, normalizer)
    return loss, {"loss/jsd_topk": loss.item()}


# ------------------------------------------------------------- sampled-token reverse KL
def _pg_advantages(teacher_BT, sampler_BT, valid_BT, kl_coef, discount, seq_adv_B, no_reward_BT=None):
    """A_t = sum_{s>=t, valid} discount^(s-t) a_s (+ seq_adv_B), a_s = kl_coef (l_teacher - l_sampler);
    A_t = min(A_t, 0) where no_reward_BT > 0."""
    a = kl_coef * (teacher_BT.clamp(min=LOGP_FLOOR) - sampler_BT)
    a = torch.where(valid_BT, a, torch.zeros_like(a))
    if discount > 0.0:
        running, out = torch.zeros_like(a[:, 0]), []
        for t in reversed(range(a.shape[1])):
            running = a[:, t] + discount * running
            out.append(running)
        a = torch.stack(out[::-1], 1)
    if seq_adv_B is not None:
        a = a + seq_adv_B.to(a.dtype).reshape(-1, 1)
    if no_reward_BT is not None:
        a = torch.where(no_reward_BT > 0, a.clamp(max=0.0), a)
    return torch.where(valid_BT, a, torch.zeros_like(a)).detach()


def _on_mask(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """x (in the mask's dtype) where mask > 0, else 0: garbage in padding cannot leak."""
    return torch.where(mask_BT > 0, x_BT.to(mask_BT.dtype), torch.zeros_like(mask_BT))


def _pg_surrogate(lp_BT, ls_BT, adv_BT, clip_eps_low, clip_eps_high, tis_cap):
    """(L_t, where the clip acts) of `reverse_kl_pg_loss`, r_t = exp(l_student - l_sampler).
    tis_cap None: PPO clipped surrogate with the sampler as behaviour policy,
      L_t = -min(r_t A_t, clip(r_t, 1-eps_low, 1+eps_high) A_t)   (None eps: no bound);
    tis_cap C:    truncated importance sampling for sampler/learner mismatch,
      L_t = -min(r_t, C).detach() * A_t * exp(l_student - l_student.detach()),
      value -min(r,C) A, gradient -min(r,C) A grad(l_student). This is verl's decoupled
      PPO+TIS with one update per rollout batch (learner = its own pi_old, so the PPO ratio
      is 1 and never clips): clip_eps_* have no effect in this mode; "clipped" is where the
      weight is truncated."""
    ratio = torch.exp(lp_BT - ls_BT)
    if tis_cap is not None:
        weight = torch.clamp(ratio.detach(), max=tis_cap)
        return -weight * adv_BT * torch.exp(lp_BT - lp_BT.detach()), ratio.detach() > tis_cap
    low = None if clip_eps_low is None else 1.0 - clip_eps_low
    high = None if clip_eps_high is None else 1.0 + clip_eps_high
    bounded = ratio if low is None and high is None else torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * adv_BT, bounded * adv_BT), (bounded * adv_BT < ratio * adv_BT).detach()


def _pg_metrics(lp_BT, ls_BT, lt_BT, adv_BT, clipped_BT, mask_BT) -> Metrics:
    """Mask-weighted token means: kl/k3 = exp(l_t - l_s) - 1 - (l_t - l_s), the k3 estimate of
    KL(student‖teacher) from the sampled tokens (the k1 estimate is the driver's `teacher/kl`,
    for every loss); pg/clip_frac, the share of tokens where the clip acts; pg/ratio_mean (r_t)
    and pg/adv_mean (A_t)."""
    log_ratio_ts = lt_BT.clamp(min=LOGP_FLOOR) - ls_BT
    return {
        "kl/k3": _metric_mean(torch.expm1(log_ratio_ts.double()) - log_ratio_ts.double(), mask_BT),
        "pg/clip_frac": _metric_mean(clipped_BT.to(mask_BT.dtype), mask_BT),
        "pg/ratio_mean": _metric_mean(torch.exp(lp_BT.detach() - ls_BT), mask_BT),
        "pg/adv_mean": _metric_mean(adv_BT, mask_BT),
    }


def reverse_kl_pg_loss(student_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                       teacher_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                       clip_eps_low: float | None = 0.2, clip_eps_high: float | None = 0.2,
                       tis_cap: float | None = None, discount: float = 0.0, kl_coef: float = 1.0,
                       seq_advantage_B: torch.Tensor | None = None,
                       normalizer: float | None = None,
                       no_reward_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """On-policy distillation as policy gradient on the sampled-token reverse KL (Tinker, verl).

    Per token of a student rollout y (l_x = log p_x(y_t)):
      a_t = kl_coef (l_teacher - l_sampler): minus the one-sample estimate of
            KL(student‖teacher) at t (the sampler stands in for the student); l_teacher is
            clamped to LOGP_FLOOR so a zero-probability teacher token gives a finite value;
      A_t = sum_{s>=t, mask_s>0} discount^(s-t) a_s + seq_advantage_B[b]  (detached;
            discount=0: A_t = a_t; distances count positions within the row);
            where no_reward_BT > 0 (a looping tail), A_t = min(A_t, 0): a loop is never
            rewarded for continuing, even where the teacher would continue it too;
      L_t = the PPO clipped surrogate (tis_cap None) or the truncated importance-sampling
            loss (tis_cap C), with r_t = exp(l_student - l_sampler): see `_pg_surrogate`.
    loss = token mean of L_t over mask. Metrics: loss/pg and `_pg_metrics` (kl/k3,
    pg/clip_frac, pg/ratio_mean, pg/adv_mean).

    Shapes: all *_BT (B, T); seq_advantage_B (B,) -> loss ().
    """
    mask = mask_BT.to(_float_dtype(student_logprobs_BT))
    lp = _on_mask(_floor_neginf(student_logprobs_BT.to(mask.dtype)), mask)
    ls, lt = _on_mask(sampler_logprobs_BT.detach(), mask), _on_mask(teacher_logprobs_BT.detach(), mask)
    adv = _pg_advantages(lt, ls, mask > 0, kl_coef, discount, seq_advantage_B, no_reward_BT)
    per_token, clipped = _pg_surrogate(lp, ls, adv, clip_eps_low, clip_eps_high, tis_cap)
    loss = masked_token_mean(per_token, mask, normalizer)
    return loss, {"loss/pg": loss.item(), **_pg_metrics(lp, ls, lt, adv, clipped, mask)}


def _masked_log_ratio(student_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                      mask_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log r_t = l_student - l_sampler on the mask (student -inf as LOGP_FLOOR), 0 off it; detached."""
    return torch.where(mask_BT > 0, student_logprobs_BT.detach().to(dtype).clamp(min=LOGP_FLOOR)
                       - sampler_logprobs_BT.detach().to(dtype),
                       torch.zeros((), dtype=dtype, device=mask_BT.device))


def sampler_mismatch_metrics(student_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                             mask_BT: torch.Tensor, eps: float = 0.2) -> Metrics:
    """How far the sampler's distribution is from the learner's, on the sampled tokens, for
    every loss (the PG loss corrects for it; the KL losses train on its samples as they are).
    With r_t = exp(l_student - l_sampler): is/ratio_mean = mean r_t; is/clip_frac = share of
    tokens with |r_t - 1| > eps (where a PPO clip at eps would act); is/kl_k3 = mean of
    r_t - 1 - log r_t, the k3 estimate of KL(sampler‖student). Top-k, top-p, a temperature
    other than the learner's and a repetition penalty all move these away from 1, 0, 0.
    Shapes: all (B, T) -> metrics."""
    mask = mask_BT.detach().double()
    log_r = _masked_log_ratio(student_logprobs_BT, sampler_logprobs_BT, mask, torch.float64)
    r = torch.exp(log_r)
    return {"is/ratio_mean": _metric_mean(r, mask),
            "is/clip_frac": _metric_mean(((r - 1).abs() > eps).double(), mask),
            "is/kl_k3": _metric_mean(r - 1 - log_r, mask)}


def prefix_importance_weights(student_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                              mask_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(prod_{s<t, mask_s>0} r_s, cap) with r_s = exp(l_student - l_sampler), detached.

    For rollouts from older weights (rollout.overlap): a KL term at position t is an
    expectation over the prefix y_<t, which the sampler drew; w_t is that prefix's importance
    weight from the sampler's distribution to the student's, truncated at `cap` (truncated
    importance sampling, Ionides 2008). The first target of a row has weight 1. Student
    log-probs of -inf count as LOGP_FLOOR. Shapes: all (B, T) -> (B, T) float."""
    log_r = _masked_log_ratio(student_logprobs_BT, sampler_logprobs_BT, mask_BT,
                              _float_dtype(student_logprobs_BT))
    before_t = torch.cumsum(log_r, dim=1) - log_r
    return torch.exp(before_t.clamp(max=math.log(cap)))


# ----------------------------------------------------------------------------------- SFT
def sft_loss(student_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
             normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood, token mean: sum(-log p_student(y_t) * mask) / normalizer.

    (Cross-entropy against the data = KL(data‖student) up to a constant.) -inf log-probs
    inside the mask count as LOGP_FLOOR. Shapes: student_logprobs_BT, mask_BT (B, T) -> ().
    """
    loss = masked_token_mean(-_floor_neginf(student_logprobs_BT), mask_BT, normalizer)
    return loss, {"loss/sft": loss.item()}


# ---------------------------------------------------------------------------------- SMPO


def _row_quantile(x_BT: torch.Tensor, keep_BT: torch.Tensor, q: float, empty: float) -> torch.Tensor:
    """Detached per-row q-quantile (linear interpolation) of x over keep; ``empty`` for
    rows with nothing kept. Shape (B, 1)."""
    rows = []
    for x_T, keep_T in zip(x_BT.detach(), keep_BT):
        vals = x_T[keep_T]                     # a read: boolean indexing copies, fine here
        rows.append(torch.quantile(vals.double(), q) if vals.numel() else torch.tensor(empty, dtype=torch.float64))
    return torch.stack(rows).to(device=x_BT.device, dtype=x_BT.dtype).unsqueeze(-1)


def _row_mean(x_BT: torch.Tensor, w_BT: torch.Tensor) -> torch.Tensor:
    """Weighted per-row mean sum(x w) / max(sum(w), 1e-8) (0 for an empty row). Shape (B,)."""
    return torch.where(w_BT > 0, x_BT * w_BT, torch.zeros_like(x_BT)).sum(-1) / w_BT.sum(-1).clamp(min=1e-8)


def _stabilise_rejected(logp_BT, mask_BT, eos_BT, protection, lower_percentile, min_log_prob):
    """Out-of-place SMPO stabilisers on rejected per-token log-probs.

    Returns (values, weights, changed): values used for r(rejected), their weights, and
    where winsorization/floor changed a value. Bounds are detached constants, so
    ``torch.clamp`` gives zero gradient to every clipped token.
    """
    protect = eos_BT & (protection != "none")
    keep = (mask_BT > 0) & ~protect
    values = logp_BT
    if lower_percentile is not None:
        values = torch.clamp(values, min=_row_quantile(logp_BT, keep, lower_percentile, -math.inf))
    if min_log_prob is not None:
        values = torch.clamp(values, min=min_log_prob)
    changed = (values != logp_BT) & keep
    weights = mask_BT
    if protection == "exclude":                 # EOS leaves r(rejected): no push on it at all
        weights = torch.where(protect, torch.zeros_like(mask_BT), mask_BT)
    elif protection == "flip":                  # -log p: lowering EOS now raises the loss
        values = torch.where(protect, -logp_BT, values)
    return values, weights, changed


def _preference_loss(z_B: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    bz = beta * z_B
    if loss_type == "smooth_lower_bound":
        return F.relu(-bz) ** 2
    if loss_type == "sigmoid":
        return -F.logsigmoid(bz)
    if loss_type == "hinge":
        return F.relu(-bz)
    return bz ** 2                               # ipo


def _check_smpo_options(loss_type: str, eos_protection: str) -> None:
    if loss_type not in SMPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {SMPO_LOSS_TYPES}, got {loss_type!r}")
    if eos_protection not in EOS_PROTECTIONS:
        raise ValueError(f"eos_protection must be one of {EOS_PROTECTIONS}, got {eos_protection!r}")


def _smpo_rewards(lc_BT, mc_BT, lr_BT, mr_BT, eos_BT, eos_protection, lower_percentile, min_log_prob,
                  chosen_upper_percentile):
    """(r(chosen), r(rejected~), where a stabiliser changed a rejected value) of `smpo_loss`.
    Stabilisers (rejected only unless said, per row, out of place, detached bounds => zero
    gradient on every clipped token):
      eos_protection at rejected tokens == eos_id: "exclude" drops them from r(rejected)
        (default: no incentive to push EOS down, and none to push it up on bad answers);
        "flip" uses -l there (lowering EOS raises the loss); "none" treats EOS as any token;
      lower_percentile q: l < row q-quantile (over non-protected tokens) -> the quantile;
      min_log_prob f: l < f -> f (pushing a rejected token below f cannot lower the loss);
      chosen_upper_percentile q: chosen l > row q-quantile -> the quantile (None: off).
    Any of them is disabled by None ("none" for EOS). Shapes: (B, Tc), (B, Tr) -> (B,), (B,)."""
    if chosen_upper_percentile is not None:
        lc_BT = torch.clamp(lc_BT, max=_row_quantile(lc_BT, mc_BT > 0, chosen_upper_percentile, math.inf))
    lr_used, wr, changed = _stabilise_rejected(lr_BT, mr_BT, eos_BT, eos_protection, lower_percentile,
                                               min_log_prob)
    return _row_mean(lc_BT, mc_BT), _row_mean(lr_used, wr), changed


def _smpo_metrics(z_B, pairs_B, r_chosen_B, r_rejected_B, lr_BT, mr_BT, eos_BT, changed_BT) -> Metrics:
    """smpo/z_mean, smpo/acc (z > 0) and both rewards over the pairs; EOS metrics of the
    rejected side; smpo/clipped_frac: the share of rejected tokens a stabiliser changed."""
    return {
        "smpo/z_mean": _metric_mean(z_B, pairs_B),
        "smpo/acc": _metric_mean((z_B > 0).to(pairs_B.dtype), pairs_B),
        "smpo/chosen_reward": _metric_mean(r_chosen_B, pairs_B),
        "smpo/rejected_reward": _metric_mean(r_rejected_B, pairs_B),
        **rejected_eos_metrics(lr_BT, mr_BT, eos_BT),
        "smpo/clipped_frac": _metric_mean(changed_BT.to(mr_BT.dtype), (mr_BT > 0).to(mr_BT.dtype)),
    }


def smpo_loss(chosen_logprobs_BT: torch.Tensor, chosen_mask_BT: torch.Tensor,
              rejected_logprobs_BT: torch.Tensor, rejected_mask_BT: torch.Tensor,
              rejected_ids_BT: torch.Tensor, eos_id: int, beta: float = 1.2, margin: float = 0.35,
              rho: float = 0.8, loss_type: str = "smooth_lower_bound", sft_coef: float = 1.0,
              eos_protection: str = "exclude", lower_percentile: float | None = 0.02,
              min_log_prob: float | None = -2.3,
              chosen_upper_percentile: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """SMPO-style clipped preference loss (SimPO family: length-normalised implicit reward,
    no reference model). No KL term: both rewards are the policy's own log-likelihoods.

      r(y) = sum_t w_t l_t / sum_t w_t  (masked mean of per-token log-probs l_t of y),
      z = r(chosen) - r(rejected~) - margin,   rejected~ = stabilised rejected log-probs
          (eos_protection, lower_percentile, min_log_prob; chosen_upper_percentile on the
          chosen side: see `_smpo_rewards`);
      pref(z): smooth_lower_bound relu(-beta z)^2 | sigmoid -logsigmoid(beta z) |
               hinge relu(-beta z) | ipo (beta z)^2;  mean over pairs with both masks non-empty;
      loss = pref + sft_coef (rho CE(chosen) + (1-rho) CE(rejected)),
      CE = token-mean NLL over that side's mask on RAW log-probs (as ``sft_loss``).

    Shapes: chosen_*_BT (B, Tc); rejected_*_BT (B, Tr); Tc and Tr may differ -> loss ().
    """
    _check_smpo_options(loss_type, eos_protection)
    dtype = _float_dtype(chosen_logprobs_BT)
    mc, mr = chosen_mask_BT.to(dtype), rejected_mask_BT.to(dtype)
    lc = _on_mask(_floor_neginf(chosen_logprobs_BT.to(dtype)), mc)
    lr = _on_mask(_floor_neginf(rejected_logprobs_BT.to(dtype)), mr)
    eos = (rejected_ids_BT == eos_id) & (mr > 0)
    r_chosen, r_rejected, changed = _smpo_rewards(lc, mc, lr, mr, eos, eos_protection, lower_percentile,
                                                  min_log_prob, chosen_upper_percentile)
    z = r_chosen - r_rejected - margin
    pairs = ((mc.sum(-1) > 0) & (mr.sum(-1) > 0)).to(dtype)
    pref = masked_token_mean(_preference_loss(z, beta, loss_type), pairs)
    sft = rho * masked_token_mean(-lc, mc) + (1.0 - rho) * masked_token_mean(-lr, mr)
    loss = pref + sft_coef * sft
    return loss, {"loss/smpo": loss.item(), "smpo/loss_pref": pref.item(), "smpo/loss_sft": sft.item(),
                  "smpo/margin": float(margin),
                  **_smpo_metrics(z, pairs, r_chosen, r_rejected, lr, mr, eos, changed)}


def rejected_eos_metrics(logp_BT: torch.Tensor, mask_BT: torch.Tensor, eos_BT: torch.Tensor) -> Metrics:
    """What EOS collapse looks like on the rejected side, from raw (unstabilised) log-probs:
    smpo/eos_logp_rejected: mean log-prob of the rejected EOS tokens (0.0 when none);
    smpo/rejected_eos_frac: share of non-empty rejected rows whose last token is EOS;
    smpo/min_logp_rejected: the smallest trained rejected token log-prob (0.0 when none).
    Shapes: logp_BT, mask_BT, eos_BT (B, T); eos_BT marks EOS tokens inside the mask."""
    live = mask_BT > 0
    rows = live.any(-1)
    last = (live.cumsum(-1) == live.sum(-1, keepdim=True)) & live        # each row's last token
    ends_eos = (last & eos_BT).any(-1)
    low = torch.where(live, logp_BT.detach(), torch.full_like(logp_BT, math.inf)).min()
    return {"smpo/eos_logp_rejected": _metric_mean(logp_BT, eos_BT.to(logp_BT.dtype)),
            "smpo/rejected_eos_frac": _metric_mean(ends_eos.to(logp_BT.dtype), rows.to(logp_BT.dtype)),
            "smpo/min_logp_rejected": low.item() if bool(live.any()) else 0.0}


def margin_schedule(step: int, target: float, start: float = 0.0, ramp_steps: int = 0) -> float:
    """Margin at ``step``: linear from ``start`` (step 0) to ``target`` (step ramp_steps), then
    ``target``; ramp_steps <= 0 gives ``target`` from the first step."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(target)
    frac = max(step, 0) / ramp_steps
    return float(start + (target - start) * frac)


# --------------------------------------------------------------------------- log-probs
def _gather_rows(logits_NV, ids_NK, start, end, temperature):
    x = logits_NV[start:end].to(_float_dtype(logits_NV)) / temperature
    return x.gather(-1, ids_NK[start:end]) - torch.logsumexp(x, -1, keepdim=True)


def _gather_chunked(logits_BTV: torch.Tensor, ids_BTK: torch.Tensor, temperature: float,
                    chunk_size: int) -> torch.Tensor:
    """log_softmax(logits/temperature) gathered at ids_BTK (B, T, K), chunk_size tokens at a time."""
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    ids_NK = ids_BTK.reshape(logits_NV.shape[0], -1).long()
    n, step = logits_NV.shape[0], max(int(chunk_size), 1)
    parts = [_maybe_checkpoint(_gather_rows, logits_NV, ids_NK, i, min(i + step, n), temperature)
             for i in range(0, n, step)]
    out = torch.cat(parts) if parts else ids_NK.new_zeros(ids_NK.shape, dtype=_float_dtype(logits_NV))
    return out.reshape(ids_BTK.shape)


def gather_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log p(ids) = log_softmax(logits / temperature)[ids], ``chunk_size`` tokens at a time
    (no full float32 log_softmax copy is held; under autograd each chunk is recomputed in
    backward). Returns float32 (float64 for float64 logits).

    Shapes: logits_BTV (B, T, V); ids_BT (B, T) -> logprobs_BT (B, T).
    """
    return _gather_chunked(logits_BTV, ids_BT.unsqueeze(-1), temperature, chunk_size).squeeze(-1)


# ------------------------------------------------------------- from hidden states, chunked
@dataclass(frozen=True)
class Reference:
    """A constant per-token distribution to compare the student with in `logprobs_from_hidden`
    (a teacher's full log-probs; a frozen model's hidden states): its logits are head(x_NX),
    or x_NX itself when head is None. Both sides are divided by ``temperature`` before the
    softmax; one generalized JSD (as `generalized_jsd`) per entry of ``betas``.

    Shapes: x_NX (N, V) logits or log-probs, or (N, H) hidden states for ``head``."""

    x_NX: torch.Tensor
    betas: tuple[float, ...]
    temperature: float = 1.0
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _hidden_chunk(hidden_NH, head, gathers, references, start, end):
    """`logprobs_from_hidden` on rows start..end: their logits, one log_softmax per temperature,
    and from it every gather and every reference's divergences."""
    x = hidden_NH[start:end]
    logits = x if head is None else head(x)
    logits = logits.to(_float_dtype(logits))
    temps = dict.fromkeys([t for _, t in gathers] + [r.temperature for r in references])
    logp = {t: torch.log_softmax(logits / t, -1) for t in temps}
    out = [logp[t].gather(-1, ids_NK[start:end].long()) for ids_NK, t in gathers]
    for r in references:
        with torch.no_grad():
            ref = r.x_NX[start:end] if r.head is None else r.head(r.x_NX[start:end])
            ref = torch.log_softmax(ref.to(logits.dtype) / r.temperature, -1)
        out.append(torch.stack([_gjsd(logp[r.temperature], ref, beta) for beta in r.betas], -1))
    return tuple(out)


def logprobs_from_hidden(hidden_NH: torch.Tensor, head: Optional[Callable[[torch.Tensor], torch.Tensor]],
                         gathers: Sequence[tuple[torch.Tensor, float]], references: Sequence[Reference] = (),
                         chunk_size: int = 1024) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The student's log-probs and divergences from its final hidden states, ``chunk_size``
    tokens at a time, without the (N, V) logits. Per chunk: logits = head(hidden) (head None:
    hidden_NH are the logits), one log_softmax per temperature, and from it
      each gather (ids_NK, temperature): log_softmax(logits / temperature)[ids] -> (N, K);
      each Reference: D[n, j] = the generalized JSD at betas[j] between the student and the
          reference, both at the reference's temperature (`generalized_jsd` per token) -> (N, J).
    Under autograd each chunk is recomputed in backward (`torch.utils.checkpoint`), so one
    chunk's (chunk, V) temporaries are alive at a time, in forward and in backward; gradients
    reach hidden_NH and head's parameters, references are constants. ``head`` must be
    deterministic (it runs again in backward).

    Shapes: hidden_NH (N, H); ids_NK (N, K) -> ([(N, K) per gather], [(N, J) per reference]).
    """
    n, step = hidden_NH.shape[0], max(int(chunk_size), 1)
    args = (head, tuple(gathers), tuple(references))
    if torch.is_grad_enabled():
        parts = [checkpoint(_hidden_chunk, hidden_NH, *args, i, min(i + step, n),
                            use_reentrant=False, preserve_rng_state=False) for i in range(0, n, step)]
    else:
        parts = [_hidden_chunk(hidden_NH, *args, i, min(i + step, n)) for i in range(0, n, step)]
    if not parts:
        empty = [(0, ids.shape[-1]) for ids, _ in gathers] + [(0, len(r.betas)) for r in references]
        parts = [tuple(hidden_NH.new_zeros(s, dtype=_float_dtype(hidden_NH)) for s in empty)]
    out = [torch.cat(p) for p in zip(*parts)]
    return out[: len(gathers)], out[len(gathers):]


def divergence_loss(div_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: float | None = None,
                    name: str = "jsd") -> tuple[torch.Tensor, Metrics]:
    """Token mean of per-token divergences (a `Reference`'s from `logprobs_from_hidden`):
    sum(D * mask) / normalizer, the loss of `generalized_jsd`, logged as ``loss/<name>``.
    Shapes: div_BT, mask_BT (B, T) or (N,) -> ()."""
    loss = masked_token_mean(div_BT, mask_BT, normalizer)
    return loss, {f"loss/{name}": loss.item()}
