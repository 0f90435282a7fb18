"""Losses for on-policy distillation: pure functions over torch tensors.

Every loss takes tensors and plain values (no config objects, no Ray, no I/O) and returns
``(loss, metrics)``: ``loss`` is a 0-dim tensor with autograd, ``metrics`` a
``dict[str, float]`` of detached values under namespaced keys (``loss/jsd``, ``kl/k3``, ...).
Shapes are in the names: B batch rows, T tokens, V vocabulary, K teacher top-k entries.
Importing this package pulls in torch only.

One family a module (each lists its sources and deliberate departures at its top):
    common      masked token means, the -inf floor, SFT, sampler-mismatch metrics and the
                stale-rollout importance weights
    jsd         the generalized JSD of GKD per position; its top-k form from log-probs
    pg          reverse-KL policy gradient on the sampled tokens (PPO clip or TIS)
    smpo        SMPO-style preference loss over chosen/rejected pairs, EOS metrics, margin ramp
    chunked     log-probs and divergences from hidden states, chunk by chunk (the learner's path)
    reference   the logits-level forms (``gather_logprobs``, ``generalized_jsd(_topk)``) that
                the chunked path is tested against; not re-exported here

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
"""
from opd.losses.chunked import Reference, divergence_loss, logprobs_from_hidden
from opd.losses.common import (LOGP_FLOOR, Metrics, masked_token_mean, prefix_importance_weights,
                               sampler_mismatch_metrics, sft_loss)
from opd.losses.jsd import topk_jsd_from_logprobs
from opd.losses.pg import reverse_kl_pg_loss
from opd.losses.smpo import PairCounts, margin_schedule, rejected_eos_metrics, smpo_loss

__all__ = ["LOGP_FLOOR", "Metrics", "Reference", "divergence_loss", "logprobs_from_hidden", "margin_schedule",
           "masked_token_mean", "prefix_importance_weights", "rejected_eos_metrics", "reverse_kl_pg_loss",
           "sampler_mismatch_metrics", "sft_loss", "smpo_loss", "PairCounts", "topk_jsd_from_logprobs"]
