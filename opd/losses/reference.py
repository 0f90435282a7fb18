"""Logits-level forms of the divergences: the reference the chunked path is tested against.

These take full (B, T, V) logits, which the learner never holds (it uses
`opd.losses.chunked.logprobs_from_hidden` on hidden states instead); the tests check that
both give the same values and gradients. `generalized_jsd_topk` is the same loss as
`opd.losses.jsd.topk_jsd_from_logprobs`, from logits.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from opd.losses.common import Metrics, float_dtype
from opd.losses.jsd import check_beta, gjsd, topk_jsd_from_logprobs


def _maybe_checkpoint(fn, *args):
    """Run fn(*args); under autograd, recompute it in backward instead of saving its
    (chunk, V) temporaries, so that only one chunk's temporaries are alive at a time."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _check_jsd_inputs(student_BTV, teacher_BTV, mask_BT, beta, normalizer) -> None:
    """ValueError unless beta, normalizer, vocabularies and shapes suit `generalized_jsd`."""
    check_beta(beta)
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


def _jsd_chunk(student_NV, teacher_NV, rows, weights, beta, temperature):
    dtype = float_dtype(student_NV)
    logp_s = torch.log_softmax(student_NV.index_select(0, rows).to(dtype) / temperature, -1)
    logp_t = torch.log_softmax(teacher_NV.index_select(0, rows).to(dtype) / temperature, -1)
    return (weights.to(dtype) * gjsd(logp_s, logp_t, beta)).sum()


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
    mask_N = mask_BT.reshape(-1).to(float_dtype(student_NV))
    rows = (mask_N > 0).nonzero().squeeze(1)
    total = student_NV.reshape(-1)[:0].sum().to(mask_N.dtype)   # 0 with a grad_fn
    for chunk in rows.split(max(int(chunk_size), 1)):
        total = total + _maybe_checkpoint(_jsd_chunk, student_NV, teacher_NV, chunk,
                                          mask_N[chunk], beta, temperature)
    norm = mask_N.sum().clamp(min=1.0) if normalizer is None else normalizer
    loss = total / norm
    return loss, {"loss/jsd": loss.item()}


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
    check_beta(beta)
    logp_s = _gather_chunked(student_logits_BTV, teacher_topk_ids_BTK.long(), temperature, 1024)
    return topk_jsd_from_logprobs(logp_s, teacher_topk_logprobs_BTK, teacher_topk_ids_BTK, mask_BT,
                                  beta=beta, tail_bucket=tail_bucket, normalizer=normalizer)


def _gather_rows(logits_NV, ids_NK, start, end, temperature):
    x = logits_NV[start:end].to(float_dtype(logits_NV)) / temperature
    return x.gather(-1, ids_NK[start:end]) - torch.logsumexp(x, -1, keepdim=True)


def _gather_chunked(logits_BTV: torch.Tensor, ids_BTK: torch.Tensor, temperature: float,
                    chunk_size: int) -> torch.Tensor:
    """log_softmax(logits/temperature) gathered at ids_BTK (B, T, K), chunk_size tokens at a time."""
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    ids_NK = ids_BTK.reshape(logits_NV.shape[0], -1).long()
    n, step = logits_NV.shape[0], max(int(chunk_size), 1)
    parts = [_maybe_checkpoint(_gather_rows, logits_NV, ids_NK, i, min(i + step, n), temperature)
             for i in range(0, n, step)]
    out = torch.cat(parts) if parts else ids_NK.new_zeros(ids_NK.shape, dtype=float_dtype(logits_NV))
    return out.reshape(ids_BTK.shape)


def gather_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log p(ids) = log_softmax(logits / temperature)[ids], ``chunk_size`` tokens at a time
    (no full float32 log_softmax copy is held; under autograd each chunk is recomputed in
    backward). Returns float32 (float64 for float64 logits).

    Shapes: logits_BTV (B, T, V); ids_BT (B, T) -> logprobs_BT (B, T).
    """
    return _gather_chunked(logits_BTV, ids_BT.unsqueeze(-1), temperature, chunk_size).squeeze(-1)
