"""SMPO-style clipped preference loss over chosen/rejected pairs, its EOS metrics and margin ramp.

Source: the SimPO family (Meng et al. 2024: length-normalised implicit reward, no reference
model, target margin) with SMPO's stabilisers against EOS collapse (EOS protection,
winsorization and a floor on rejected log-probs, SFT terms).

Deliberate departures: the stabilisers act (the public SMPO code writes them through a
boolean-mask copy, so they are no-ops there): they are out-of-place ops with row-wise bounds
(``torch.where``/``torch.clamp``); the SFT terms are token means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from opd.losses.common import Metrics, float_dtype, floor_neginf, masked_token_mean, metric_mean, on_mask
from opd.types import EOS_PROTECTIONS, SMPO_LOSS_TYPES


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
        "smpo/z_mean": metric_mean(z_B, pairs_B),
        "smpo/acc": metric_mean((z_B > 0).to(pairs_B.dtype), pairs_B),
        "smpo/chosen_reward": metric_mean(r_chosen_B, pairs_B),
        "smpo/rejected_reward": metric_mean(r_rejected_B, pairs_B),
        **rejected_eos_metrics(lr_BT, mr_BT, eos_BT),
        "smpo/clipped_frac": metric_mean(changed_BT.to(mr_BT.dtype), (mr_BT > 0).to(mr_BT.dtype)),
    }


@dataclass(frozen=True)
class PairCounts:
    """What SMPO's means divide by: pairs whose two sides both have tokens, and the tokens of
    each side (floored at 1, as `masked_token_mean` does)."""

    pairs: float
    chosen_tokens: float
    rejected_tokens: float

    @classmethod
    def of(cls, chosen_mask: Any, rejected_mask: Any) -> "PairCounts":
        """The counts of these pairs' masks ([M, T] torch tensors or numpy arrays)."""
        live = ((chosen_mask.sum(-1) > 0) & (rejected_mask.sum(-1) > 0)).sum()
        return cls(max(1.0, float(live)), max(1.0, float(chosen_mask.sum())), max(1.0, float(rejected_mask.sum())))


def smpo_loss(chosen_logprobs_BT: torch.Tensor, chosen_mask_BT: torch.Tensor,
              rejected_logprobs_BT: torch.Tensor, rejected_mask_BT: torch.Tensor,
              rejected_ids_BT: torch.Tensor, eos_id: int, beta: float = 1.2, margin: float = 0.35,
              rho: float = 0.8, loss_type: str = "smooth_lower_bound", sft_coef: float = 1.0,
              eos_protection: str = "exclude", lower_percentile: float | None = 0.02,
              min_log_prob: float | None = -2.3,
              chosen_upper_percentile: float | None = None,
              counts: Optional["PairCounts"] = None) -> tuple[torch.Tensor, Metrics]:
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

    The means divide by `counts` when given (a whole batch's live pairs and tokens, of which
    these rows are a part: the parts' losses then sum to the whole's), else by these rows' own.

    Shapes: chosen_*_BT (B, Tc); rejected_*_BT (B, Tr); Tc and Tr may differ -> loss ().
    """
    _check_smpo_options(loss_type, eos_protection)
    dtype = float_dtype(chosen_logprobs_BT)
    mc, mr = chosen_mask_BT.to(dtype), rejected_mask_BT.to(dtype)
    lc = on_mask(floor_neginf(chosen_logprobs_BT.to(dtype)), mc)
    lr = on_mask(floor_neginf(rejected_logprobs_BT.to(dtype)), mr)
    eos = (rejected_ids_BT == eos_id) & (mr > 0)
    r_chosen, r_rejected, changed = _smpo_rewards(lc, mc, lr, mr, eos, eos_protection, lower_percentile,
                                                  min_log_prob, chosen_upper_percentile)
    z = r_chosen - r_rejected - margin
    pairs = ((mc.sum(-1) > 0) & (mr.sum(-1) > 0)).to(dtype)
    n = counts or PairCounts.of(mc, mr)
    pref = masked_token_mean(_preference_loss(z, beta, loss_type), pairs, n.pairs)
    sft = rho * masked_token_mean(-lc, mc, n.chosen_tokens) + (1.0 - rho) * masked_token_mean(-lr, mr, n.rejected_tokens)
    loss = pref + sft_coef * sft
    return loss, {"loss/smpo": loss.item(), "loss/smpo_pref": pref.item(), "loss/smpo_sft": sft.item(),
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
    return {"smpo/eos_logp_rejected": metric_mean(logp_BT, eos_BT.to(logp_BT.dtype)),
            "smpo/rejected_eos_frac": metric_mean(ends_eos.to(logp_BT.dtype), rows.to(logp_BT.dtype)),
            "smpo/min_logp_rejected": low.item() if bool(live.any()) else 0.0}


def margin_schedule(step: int, target: float, start: float = 0.0, ramp_steps: int = 0) -> float:
    """Margin at ``step``: linear from ``start`` (step 0) to ``target`` (step ramp_steps), then
    ``target``; ramp_steps <= 0 gives ``target`` from the first step."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(target)
    frac = max(step, 0) / ramp_steps
    return float(start + (target - start) * frac)
