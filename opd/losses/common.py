"""Shared pieces of the losses: the -inf floor, masked token means, and the sampler-vs-learner
quantities every loss reads (mismatch metrics, stale-rollout importance weights), plus SFT.

``LOGP_FLOOR`` stands in for log(0): log-probs of exactly -inf are replaced by it and teacher
log-probs are clamped to it, so a teacher that gives a token zero probability yields a large
finite reverse KL / advantage instead of an infinite one (a deliberate departure from the
plain formulas).
"""
from __future__ import annotations

import math

import torch

# Stand-in for log(0). exp(-80) is still a normal float32 (no denormal slow paths), and a
# probability below it is zero for every purpose here.
LOGP_FLOOR = -80.0

Metrics = dict[str, float]


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


def metric_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mask-weighted mean as a Python float (0.0 for an empty mask); for metrics only."""
    x, mask = x.detach().double(), mask.detach().double()
    den = mask.sum().item()
    return torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum().item() / den if den > 0 else 0.0


def floor_neginf(logp: torch.Tensor) -> torch.Tensor:
    """Replace exact -inf log-probs by LOGP_FLOOR (gradient 0 there), keep the rest."""
    return torch.where(torch.isneginf(logp), torch.full_like(logp, LOGP_FLOOR), logp)


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (bf16/fp16 are upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def on_mask(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """x (in the mask's dtype) where mask > 0, else 0: garbage in padding cannot leak."""
    return torch.where(mask_BT > 0, x_BT.to(mask_BT.dtype), torch.zeros_like(mask_BT))


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
    return {"is/ratio_mean": metric_mean(r, mask),
            "is/clip_frac": metric_mean(((r - 1).abs() > eps).double(), mask),
            "is/kl_k3": metric_mean(r - 1 - log_r, mask)}


def prefix_importance_weights(student_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                              mask_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(prod_{s<t, mask_s>0} r_s, cap) with r_s = exp(l_student - l_sampler), detached.

    For rollouts from older weights (rollout.overlap): a KL term at position t is an
    expectation over the prefix y_<t, which the sampler drew; w_t is that prefix's importance
    weight from the sampler's distribution to the student's, truncated at `cap` (truncated
    importance sampling, Ionides 2008). The first target of a row has weight 1. Student
    log-probs of -inf count as LOGP_FLOOR. Shapes: all (B, T) -> (B, T) float."""
    log_r = _masked_log_ratio(student_logprobs_BT, sampler_logprobs_BT, mask_BT,
                              float_dtype(student_logprobs_BT))
    before_t = torch.cumsum(log_r, dim=1) - log_r
    return torch.exp(before_t.clamp(max=math.log(cap)))


def sft_loss(student_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
             normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood, token mean: sum(-log p_student(y_t) * mask) / normalizer.

    (Cross-entropy against the data = KL(data‖student) up to a constant.) -inf log-probs
    inside the mask count as LOGP_FLOOR. Shapes: student_logprobs_BT, mask_BT (B, T) -> ().
    """
    loss = masked_token_mean(-floor_neginf(student_logprobs_BT), mask_BT, normalizer)
    return loss, {"loss/sft": loss.item()}
