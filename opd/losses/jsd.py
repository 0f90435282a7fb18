"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023, "On-Policy Distillation
of Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649): the divergence
per position, and its top-k form from the student's log-probs at the teacher's top-k ids.

Deliberate departure: beta=0 and beta=1 are the plain forward / reverse KLs (as in TRL's GKD
trainer); for 0 < beta < 1 the GKD JSD(beta) is used unscaled, so it tends to 0, not to the
KLs, as beta approaches 0 or 1.
"""
from __future__ import annotations

import math

import torch

from opd.losses.common import LOGP_FLOOR, Metrics, floor_neginf, masked_token_mean


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = sum_v p_v (log p_v - log q_v) over the last dim (finite log-probs)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def gjsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD of GKD over the last dim between student s and teacher t (log-probs):
    beta=0 KL(t‖s), beta=1 KL(s‖t), else beta KL(t‖m) + (1-beta) KL(s‖m) with
    m = beta p_t + (1-beta) p_s (`opd.losses.reference.generalized_jsd` has it in full).
    The teacher side is a constant; -inf entries count as LOGP_FLOOR."""
    logp_s = floor_neginf(logp_s)
    logp_t = logp_t.detach().clamp(min=LOGP_FLOOR)
    if beta == 0.0:
        return _kl(logp_t, logp_s)                       # KL(teacher‖student)
    if beta == 1.0:
        return _kl(logp_s, logp_t)                       # KL(student‖teacher)
    logm = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log(1.0 - beta))
    return beta * _kl(logp_t, logm) + (1.0 - beta) * _kl(logp_s, logm)


def check_beta(beta: float) -> None:
    """ValueError unless 0 <= beta <= 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


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


def topk_jsd_from_logprobs(student_topk_logprobs_BTK: torch.Tensor, teacher_topk_logprobs_BTK: torch.Tensor,
                           teacher_topk_ids_BTK: torch.Tensor, mask_BT: torch.Tensor, beta: float = 0.0,
                           tail_bucket: bool = True,
                           normalizer: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """`generalized_jsd_topk` from the student's log-probs at the teacher's top-k ids,
    log_softmax(student / temperature)[ids] (e.g. from `logprobs_from_hidden`), instead of
    its logits. Any leading shape: (B, T, K) or (N, K) with mask (B, T) or (N,) -> ()."""
    check_beta(beta)
    ids, logp_s = teacher_topk_ids_BTK.long(), student_topk_logprobs_BTK
    logp_t = teacher_topk_logprobs_BTK.detach().to(logp_s.dtype)
    valid = _first_occurrence(ids) & ~torch.isneginf(logp_t)
    floor = torch.full_like(logp_s, LOGP_FLOOR)
    logp_s = torch.where(valid, floor_neginf(logp_s), floor)
    logp_t = torch.where(valid, logp_t.clamp(min=LOGP_FLOOR), floor)
    if tail_bucket:
        logp_s, logp_t = _with_tail(logp_s), _with_tail(logp_t)
    else:
        logp_s, logp_t = torch.log_softmax(logp_s, -1), torch.log_softmax(logp_t, -1)
    loss = masked_token_mean(gjsd(logp_s, logp_t, beta), mask_BT, normalizer)
    return loss, {"loss/jsd_topk": loss.item()}
