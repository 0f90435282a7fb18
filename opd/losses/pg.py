"""On-policy distillation as policy gradient on the sampled-token reverse KL.

Sources: Thinking Machines, "On-Policy Distillation" (2025, Tinker cookbook) and verl's
distillation recipe (the per-token advantage); PPO clipping: Schulman et al. 2017; truncated
importance sampling (TIS): Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training".

Deliberate departure: with ``tis_cap`` the TIS weight replaces PPO clipping (see
`_pg_surrogate`).
"""
from __future__ import annotations

import torch

from opd.losses.common import (LOGP_FLOOR, Metrics, float_dtype, floor_neginf, masked_token_mean, metric_mean,
                               on_mask)


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
        "kl/k3": metric_mean(torch.expm1(log_ratio_ts.double()) - log_ratio_ts.double(), mask_BT),
        "pg/clip_frac": metric_mean(clipped_BT.to(mask_BT.dtype), mask_BT),
        "pg/ratio_mean": metric_mean(torch.exp(lp_BT.detach() - ls_BT), mask_BT),
        "pg/adv_mean": metric_mean(adv_BT, mask_BT),
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
    mask = mask_BT.to(float_dtype(student_logprobs_BT))
    lp = on_mask(floor_neginf(student_logprobs_BT.to(mask.dtype)), mask)
    ls, lt = on_mask(sampler_logprobs_BT.detach(), mask), on_mask(teacher_logprobs_BT.detach(), mask)
    adv = _pg_advantages(lt, ls, mask > 0, kl_coef, discount, seq_advantage_B, no_reward_BT)
    per_token, clipped = _pg_surrogate(lp, ls, adv, clip_eps_low, clip_eps_high, tis_cap)
    loss = masked_token_mean(per_token, mask, normalizer)
    return loss, {"loss/pg": loss.item(), **_pg_metrics(lp, ls, lt, adv, clipped, mask)}
