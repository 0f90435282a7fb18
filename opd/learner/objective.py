"""The objective of a TrainBatch: which loss terms train it, their weights and their metrics,
and the forward/backward over its micro-batches.

    loss = distill_coef * distillation (reverse-KL PG, or GKD's JSD to the teacher)
         + the length remedies the batch carries (top-k forward KL, weighted per row by
           topk_kl_coef_B; anchor_coef * KL(student || starting student))
         + SFT on the rows with an sft_weight_B
         + smpo_coef * SMPO over the batch's pairs

Each term is a pure function of `opd.losses`. Every remedy weight is read from the batch;
the loss config gives only the losses' own settings. Token-mean terms are normalised by the
whole batch's token count, pair terms by its pair count, so the gradient does not depend on
how the batch is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from opd import losses
from opd.learner.forward import Forward, StudentForward, row_ends
from opd.types import TrainBatch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import LossConfig

Term = tuple[float, torch.Tensor, losses.Metrics]  # (weight, loss, metrics)


@dataclass(frozen=True)
class Normalizers:
    """Whole-batch token counts that each term divides by (0: the term has nothing to train),
    so that the gradient does not depend on how the batch is split into micro-batches or
    across learner ranks."""

    on: float  # tokens of student rollouts (distillation, length remedy)
    pg: float  # the same, weighted by stop-properly (policy-gradient term)
    sft: float  # tokens of rows with an SFT weight
    smpo: Optional[losses.PairCounts] = None  # what SMPO's means divide by (None: no pairs)

    @classmethod
    def of(cls, b: TrainBatch) -> "Normalizers":
        tok_B, p = b.loss_mask_BS.sum(1), b.pairs
        return cls(on=float((tok_B * b.on_policy_B).sum()),
                   pg=float((tok_B * b.on_policy_B * b.seq_weight_B).sum()),
                   sft=float((tok_B * (b.sft_weight_B > 0)).sum()),
                   smpo=losses.PairCounts.of(b.loss_mask_BS[p.chosen_rows], b.loss_mask_BS[p.rejected_rows])
                   if p is not None and len(p.chosen_rows) else None)


@dataclass(frozen=True)
class RankPlan:
    """A learner rank's part in a step of a sharded learner: the whole batch's normalisers,
    and how many micro-batches every rank runs (the most any rank's share needs), so that
    each rank joins every collective of the others; micro-batches beyond its own are padding
    (a zero loss through the same forwards). `padding`: the share has no rows of its own."""

    norm: Normalizers
    row_chunks: int
    pair_chunks: int
    padding: bool = False


def backward(fw: StudentForward, lc: LossConfig, b: TrainBatch, micro_batch_size: int,
             step: int, plan: Optional[RankPlan] = None) -> dict[str, list[tuple[float, int]]]:
    """Forward and backward over every micro-batch (gradients accumulate on the student's
    parameters); returns each metric's (value, rows) per micro-batch, for `combine`. Rows go
    into micro-batches in order of length, so that each one's padding is short; `step` sets
    the SMPO margin's ramp. `plan`: this rank's part of a sharded step (None: the whole batch)."""
    obj = BatchObjective(fw, lc, b, plan.norm if plan else Normalizers.of(b), step, plan is not None)
    rows_on = obj.rows_train()
    acc: dict[str, list] = {} if rows_on else {"loss/rows_total": [(0.0, len(b.input_ids_BS))]}  # logged anyway
    for kind, idx in micro_batches(obj, micro_batch_size, plan):
        if idx is None:  # padding
            obj.padding(kind).backward()
            fw.release()
            continue
        loss, m = obj.row_terms(idx) if kind == "rows" else obj.pair_terms(idx)
        if loss.requires_grad:
            loss.backward()
        fw.release()
        for k, v in {**m, f"loss/{kind}_total": float(loss.detach())}.items():
            acc.setdefault(k, []).append((v, len(idx)))
    return acc


def micro_batches(obj: "BatchObjective", mb: int, plan: Optional[RankPlan]) -> list[tuple[str, Optional[np.ndarray]]]:
    """(kind, rows or pairs) per micro-batch, in order: rows by length, then SMPO pairs; with a
    `plan`, padded with (kind, None) up to its counts."""
    b, lc = obj.b, obj.lc
    order = np.argsort(row_ends(b.loss_mask_BS), kind="stable") if obj.rows_train() else np.arange(0)
    M = 0 if b.pairs is None else len(b.pairs.chosen_rows)
    if plan is not None and plan.padding:
        order, M = order[:0], 0
    smpo_on = bool(obj.norm.smpo is not None and lc.smpo_coef)
    rows = [("rows", order[i: i + mb]) for i in range(0, len(order), mb)]
    pairs = [("pairs", np.arange(i, min(M, i + mb))) for i in range(0, M, mb)] if smpo_on else []
    if plan is not None:
        rows += [("rows", None)] * (plan.row_chunks - len(rows)) if obj.rows_train() else []
        pairs += [("pairs", None)] * (plan.pair_chunks - len(pairs)) if smpo_on else []
    return rows + pairs


def merge(accs: list[dict[str, list]]) -> dict[str, list]:
    """The (value, rows) lists of several ranks' `backward`, joined per metric."""
    out: dict[str, list] = {}
    for acc in accs:
        for k, vs in acc.items():
            out.setdefault(k, []).extend(vs)
    return out


def combine(key: str, values: list[tuple[float, int]]) -> float:
    """One step's metric from its micro-batches' (value, rows): loss/* is each micro-batch's
    share of the whole-batch loss (global normaliser), so they sum; */min_* is a minimum; any
    other metric is a mean within its micro-batch, averaged weighted by rows."""
    if key.startswith("loss/"):
        return sum(v for v, _ in values)
    if "/min_" in key:
        return min(v for v, _ in values)
    return sum(v * n for v, n in values) / max(1, sum(n for _, n in values))


@dataclass(frozen=True)
class BatchObjective:
    """The loss terms of one TrainBatch, over a micro-batch of its rows or of its SMPO pairs."""

    fw: StudentForward
    lc: LossConfig
    b: TrainBatch
    norm: Normalizers
    step: int
    grouped: bool = False  # one rank of a sharded learner: every micro-batch runs a backward

    def rows_train(self) -> bool:
        """Whether any row term (distillation, length remedies, SFT) can train this batch: an
        SMPO-only batch skips the forward over every row (its pairs have their own)."""
        lc, b, norm = self.lc, self.b, self.norm
        distill = lc.distill != "none" and lc.distill_coef > 0 and norm.on > 0
        remedies = (b.topk_kl_coef_B is not None or b.anchor_coef > 0) and norm.on
        return bool(distill or remedies or norm.sft)

    def row_terms(self, rows: np.ndarray) -> tuple[torch.Tensor, losses.Metrics]:
        """Distillation, length-remedy and SFT terms over a micro-batch of rows, each
        normalised by the whole batch's count of the tokens it trains (`Normalizers`)."""
        lc, b, norm = self.lc, self.b, self.norm
        jsd_on = bool(lc.distill == "jsd" and lc.distill_coef and norm.on)
        remedy_on = bool(b.topk_kl_coef_B is not None and norm.on)
        anchor_on = bool(b.anchor_coef > 0 and norm.on)
        betas = tuple(dict.fromkeys([lc.jsd_beta] * jsd_on + [0.0] * remedy_on))  # of the teacher terms
        f = self.fw(b, rows, betas, anchor_on, lc.jsd_temperature)
        on_BT = f.mask_BT * self.fw.tensor(b.on_policy_B.astype(np.float32), rows)[:, None]  # student rollouts
        sampler = self.fw.tensor(b.sampler_logprobs_BS, rows, f.win)
        terms = self._distill_terms(f, on_BT, sampler, jsd_on)
        if remedy_on:  # the length remedy: forward KL, top-k
            w = self.fw.tensor(b.topk_kl_coef_B, rows)[:, None]
            loss, _ = self._jsd(f, on_BT * w, 0.0)
            terms.append((1.0, loss, {"loss/topk_kl": loss.item()}))
        if anchor_on:  # the divergence anchor: KL(student || starting student), StableOPD's constraint
            terms.append((b.anchor_coef, *losses.divergence_loss(f.anchor_N, f.tokens(on_BT), norm.on,
                                                                 name="anchor_kl")))
        if norm.sft:
            sft_mask = f.mask_BT * self.fw.tensor(b.sft_weight_B, rows)[:, None]
            terms.append((1.0, *losses.sft_loss(f.lp_BT, sft_mask, normalizer=norm.sft)))
        start = (f.lp_BT * 0).sum() if self.grouped else torch.zeros((), device=self.fw.device)
        total = sum((c * loss for c, loss, _ in terms), start)
        return total, {k: v for _, _, m in terms for k, v in m.items()}

    def padding(self, kind: str) -> torch.Tensor:
        """A zero loss through the forwards of a micro-batch of `kind` (rows: the student and
        the anchor if on; pairs: the student twice), over this share's first row."""
        row, anchor = np.arange(1), kind == "rows" and bool(self.b.anchor_coef > 0 and self.norm.on)
        fs = [self.fw(self.b, row, anchor=anchor) for _ in range(2 if kind == "pairs" else 1)]
        return sum((f.lp_BT * 0).sum() for f in fs)

    def _distill_terms(self, f: Forward, on_BT: torch.Tensor, sampler_BT: torch.Tensor,
                       jsd_on: bool) -> list[Term]:
        """The sampler-mismatch metrics (weight 0) and the distillation term on student rollouts."""
        lc, b, norm, rows = self.lc, self.b, self.norm, f.rows
        terms: list[Term] = [(0.0, torch.zeros((), device=self.fw.device), losses.sampler_mismatch_metrics(
            f.lp_BT, sampler_BT, on_BT))] if on_BT.any() else []
        if lc.distill == "reverse_kl_pg" and lc.distill_coef and norm.pg:
            pg_mask = on_BT * self.fw.tensor(b.seq_weight_B, rows)[:, None]  # stop-properly
            terms.append((lc.distill_coef, *losses.reverse_kl_pg_loss(
                f.lp_BT, sampler_BT, self.fw.tensor(b.teacher_logprobs_BS, rows, f.win), pg_mask,
                clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high, tis_cap=lc.tis_cap,
                discount=lc.discount, seq_advantage_B=self.fw.tensor(b.seq_advantage_B, rows),
                normalizer=norm.pg, no_reward_BT=self.fw.tensor(b.loop_tail_BS, rows, f.win))))
        if jsd_on:  # stale rollouts (b.is_cap): weighted by their prefix's importance weight; the PG
            # term needs none, its PPO ratio already has the sampler as behaviour policy
            stale = 1.0 if b.is_cap is None else losses.prefix_importance_weights(f.lp_BT, sampler_BT, on_BT,
                                                                                  b.is_cap)
            terms.append((lc.distill_coef, *self._jsd(f, on_BT * stale, lc.jsd_beta)))
        return terms

    def _jsd(self, f: Forward, mask_BT: torch.Tensor, beta: float) -> tuple[torch.Tensor, losses.Metrics]:
        """The generalized JSD to the teacher at `beta` (full distribution or top-k), token mean
        over the student rollouts' tokens."""
        mask_N = f.tokens(mask_BT)
        if f.teacher_NJ is not None:
            return losses.divergence_loss(f.teacher_NJ[:, f.betas.index(beta)], mask_N, self.norm.on)
        return losses.topk_jsd_from_logprobs(
            f.topk_NK, f.tokens(self.fw.tensor(self.b.teacher_topk_logprobs_BSK, f.rows, f.win)),
            f.tokens(self.fw.tensor(self.b.teacher_topk_ids_BSK, f.rows, f.win)), mask_N, beta=beta,
            tail_bucket=self.lc.tail_bucket, normalizer=self.norm.on)

    def pair_terms(self, idx: np.ndarray) -> tuple[torch.Tensor, losses.Metrics]:
        """SMPO over a micro-batch of pairs: its share of the whole batch's SMPO loss (means
        over the whole batch's pairs and tokens)."""
        s, b = self.lc.smpo, self.b
        c, r = self.fw(b, b.pairs.chosen_rows[idx]), self.fw(b, b.pairs.rejected_rows[idx])
        margin = losses.margin_schedule(self.step, s.margin, s.margin_start, s.margin_ramp_steps)
        loss, m = losses.smpo_loss(
            c.lp_BT, c.mask_BT, r.lp_BT, r.mask_BT, r.tgt_BT, b.rejected_eos_id,
            beta=s.beta, margin=margin, rho=s.rho, loss_type=s.loss_type, sft_coef=s.sft_coef,
            eos_protection=s.eos_protection, lower_percentile=s.lower_percentile,
            min_log_prob=s.min_log_prob, chosen_upper_percentile=s.chosen_upper_percentile, counts=self.norm.smpo)
        return self.lc.smpo_coef * loss, m
