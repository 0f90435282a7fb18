"""Learner: the student in PyTorch. Recomputes log-probs, applies the losses, steps AdamW.

A plain class (`Learner`); `opd.actors` wraps it as a Ray actor. What it does per step:
1. split the TrainBatch into micro-batches of rows (and of SMPO pairs);
2. recompute the student's log-probs of the target tokens (logits / sampler temperature): the
   decoder over the rows, then the LM head on the trained tokens only, in chunks, each with
   one log_softmax that also gives what the distillation terms need (`Forward`): no
   [B, T, V] logits are ever held;
3. the objective: distill_coef * distillation + smpo_coef * SMPO + sft_coef * SFT, each a
   pure function of `opd.losses`; token-mean terms are normalised by the whole batch's token
   count, pair terms by the whole batch's pair count, so the gradient does not depend on
   how the batch is split into micro-batches;
4. clip the global gradient norm, step AdamW and the LR schedule; a non-finite loss or
   gradient norm skips the AdamW step instead (`optim/skipped`), and `optim.max_bad_steps`
   such steps in a row stop the run.

Weights leave as numpy arrays under Hugging Face names (`export_weights`, no copy of fp32
weights here), for the rollout workers' in-place reload. Checkpoints are a Hugging Face model directory (loadable
by transformers and vLLM) plus `learner_state.pt` (optimizer, scheduler, torch RNG; loaded
with `weights_only=True`) and `learner_state.json` (step, Python/numpy RNG); each is written
into a hidden sibling directory that is renamed into place once complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from opd import losses
from opd.device import pick_device
from opd.types import TrainBatch, WeightUpdate

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at a step: linear warmup, then constant or cosine."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass(frozen=True)
class Window:
    """Where a micro-batch's target tokens are. Row b's targets are at sequence positions
    P_b .. P_b + Tc - 1 (P_b: its first target, i.e. the prompt length); their logits come from
    positions P_b - 1 .. P_b + Tc - 2. Positions past the sequence end are clamped and masked.

    Shapes: pos_BT (B, Tc) int64 logit positions; valid_BT (B, Tc) bool."""

    pos_BT: torch.Tensor
    valid_BT: torch.Tensor

    @classmethod
    def of(cls, mask_BS: np.ndarray, device: str) -> "Window":
        B, S = mask_BS.shape
        has = mask_BS > 0
        first = np.where(has.any(1), has.argmax(1), S - 1).clip(min=1)
        last = np.where(has.any(1), S - 1 - has[:, ::-1].argmax(1), first)
        Tc = int(max(1, (last - first + 1).max()))
        target = first[:, None] + np.arange(Tc)[None, :]
        valid = target <= S - 1
        return cls(torch.as_tensor(np.minimum(target, S - 1) - 1, device=device),
                   torch.as_tensor(valid, device=device))

    @property
    def columns(self) -> int:
        """Sequence columns a causal forward needs for these logits (up to the last position)."""
        return int(self.pos_BT.max()) + 1

    def targets(self, a_BS: torch.Tensor) -> torch.Tensor:
        """a[b, P_b + t, ...] for the window (0 where past the end); a is [B, S, ...]."""
        idx = (self.pos_BT + 1).reshape(*self.pos_BT.shape, *([1] * (a_BS.dim() - 2)))
        out = a_BS.gather(1, idx.expand(-1, -1, *a_BS.shape[2:]))
        keep = self.valid_BT.reshape(*self.valid_BT.shape, *([1] * (a_BS.dim() - 2)))
        return torch.where(keep, out, torch.zeros_like(out))

    def scatter(self, out_BS: np.ndarray, values_BT: np.ndarray) -> None:
        """Write window values back to [B, S] positions (the inverse of `targets`)."""
        pos, valid = (self.pos_BT + 1).cpu().numpy(), self.valid_BT.cpu().numpy()
        for b in range(len(out_BS)):
            out_BS[b, pos[b][valid[b]]] = values_BT[b][valid[b]]


def take_tokens(a_BT: torch.Tensor, sel_N: torch.Tensor) -> torch.Tensor:
    """The entries (N, ...) of a (B, T, ...) tensor at flat (B * T) indices sel_N."""
    return a_BT.reshape(-1, *a_BT.shape[2:]).index_select(0, sel_N)


@dataclass(frozen=True)
class Forward:
    """A micro-batch of rows through the student, over its window of target positions. The
    LM head ran on its N trained tokens only (loss mask > 0, row-major), chunk by chunk: no
    (B, Tc, V) logits exist. Shapes: *_BT (B, Tc); *_N* (N, ...) over the trained tokens."""

    win: Window
    tgt_BT: torch.Tensor  # target token ids
    mask_BT: torch.Tensor  # loss mask
    sel_N: torch.Tensor  # the trained tokens' flat indices into (B * Tc)
    lp_BT: torch.Tensor  # log p_student(target) at the sampler's temperature; 0 off the mask
    betas: tuple[float, ...] = ()  # the teacher terms' generalized-JSD betas (columns of teacher_NJ)
    topk_NK: Optional[torch.Tensor] = None  # log p_student at the teacher's top-k ids (jsd_temperature)
    teacher_NJ: Optional[torch.Tensor] = None  # generalized JSD to the teacher's full distribution, per beta
    anchor_N: Optional[torch.Tensor] = None  # KL(student || anchor)

    def tokens(self, a_BT: torch.Tensor) -> torch.Tensor:
        return take_tokens(a_BT, self.sel_N)


@dataclass(frozen=True)
class Normalizers:
    """Whole-batch token counts that each term divides by (0: the term has nothing to train),
    so that the gradient does not depend on how the batch is split into micro-batches."""

    on: float  # tokens of student rollouts (distillation, length remedy)
    pg: float  # the same, weighted by stop-properly (policy-gradient term)
    sft: float  # tokens of rows with an SFT weight

    @classmethod
    def of(cls, b: TrainBatch) -> "Normalizers":
        tok_B = b.loss_mask_BS.sum(1)
        return cls(on=float((tok_B * b.on_policy_B).sum()),
                   pg=float((tok_B * b.on_policy_B * b.seq_weight_B).sum()),
                   sft=float((tok_B * (b.sft_weight_B > 0)).sum()))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def row_ends(mask_BS: np.ndarray) -> np.ndarray:
    """Each row's last target position + 1 (0 for a row without targets): the columns the
    learner must run over; right padding past it cannot change any target's logits."""
    has = mask_BS > 0
    return np.where(has.any(1), has.shape[1] - has[:, ::-1].argmax(1), 0)


def batch_shape_metrics(b: TrainBatch) -> dict[str, float]:
    """Tokens the learner runs over: real (prompt + completion, up to each row's last target)
    and padded (B x S); their ratio is the padding waste of one micro-batch holding them all."""
    return {"learner/seq_tokens": float(row_ends(b.loss_mask_BS).sum()),
            "learner/padded_tokens": float(b.loss_mask_BS.size)}


# Tokens per chunk of the LM head and its log_softmax: (HEAD_CHUNK, V) float32 temporaries,
# ~200 MB each at V = 49,152.
HEAD_CHUNK = 1024


class BadStepsError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm (optim.max_bad_steps)."""


class Learner:
    """Holds the student, its optimizer and schedule; trains on TrainBatches."""

    def __init__(self, model_path: str, cfg: TrainConfig, start_path: Optional[str] = None):
        """`model_path`: the weights to train (the student, or a checkpoint when resuming);
        `start_path`: the run's starting student (the divergence anchor), default model_path."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.loss_cfg, self.optim_cfg = cfg, cfg.loss, cfg.optim
        self.device = pick_device(self.optim_cfg.device)
        self.autocast = self.device == "cuda" and cfg.student.dtype == "bfloat16"
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.student.trust_remote_code)
        # fp32 master weights; bf16 only through autocast on GPU
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=cfg.student.trust_remote_code).to(self.device)
        self.model.train()
        self.vocab_size = len(self.tokenizer)
        # the LM head on target positions only, where the model's logits are a plain head
        self.head_only_on_targets = (hasattr(self.model, "model") and not any(
            getattr(self.model.config, k, None) for k in ("final_logit_softcapping", "logit_scale")))
        oc = self.optim_cfg
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2),
                                     weight_decay=oc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(oc.schedule, oc.warmup_steps, cfg.steps, oc.min_lr_ratio))
        self.anchor = (self._frozen(start_path or model_path)
                       if cfg.length.mode == "auto" and cfg.length.remedies.anchor_coef > 0 else None)
        self.step = 0
        self.skipped, self.bad_in_row = 0, 0  # skipped steps: in all, and the current run of them

    def _frozen(self, path: str) -> torch.nn.Module:
        """The run's starting student, frozen: the reference of the divergence anchor (a
        resumed or restarted learner loads it from the start path, not from its checkpoint)."""
        from transformers import AutoModelForCausalLM

        anchor = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=self.cfg.student.trust_remote_code)
        return anchor.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _window(self, mask_BS: np.ndarray) -> "Window":
        return Window.of(mask_BS, self.device)

    def _hidden(self, ids_BS: torch.Tensor, win: "Window", sel_N: torch.Tensor,
                model: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, Callable]:
        """The LM head's inputs at the trained tokens (N, H) and the head, (N, H) -> float32
        logits (N, V) over the tokenizer's vocabulary, for `losses.logprobs_from_hidden` to
        apply chunk by chunk. The decoder runs over the columns the window needs. Right padding
        only: causal attention keeps pads from touching real positions. Models that
        post-process logits (soft-capping, scaling) run whole: their logits are the inputs and
        the head only casts them. `model`: the anchor (same architecture); default the student."""
        model = self.model if model is None else model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.head_only_on_targets:
                x = model.model(input_ids=ids_BS[:, : win.columns]).last_hidden_state
                head = model.get_output_embeddings()
            else:
                x, head = model(input_ids=ids_BS[:, : win.columns]).logits, torch.nn.Identity()
        x_BTX = x.gather(1, win.pos_BT[..., None].expand(-1, -1, x.shape[-1]))
        return take_tokens(x_BTX, sel_N), self._float_logits(head)

    def _float_logits(self, head: torch.nn.Module) -> Callable:
        def logits(x_NX: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                return head(x_NX)[..., : self.vocab_size].float()

        return logits

    def _tensor(self, a: Optional[np.ndarray], rows: np.ndarray, win: Optional["Window"] = None
                ) -> Optional[torch.Tensor]:
        """Rows of a batch array on the device; [B, S, ...] arrays cut to the window's targets."""
        if a is None:
            return None
        t = torch.as_tensor(a[rows]).to(self.device)
        return t if win is None else win.targets(t)

    def _row_terms(self, b: TrainBatch, rows: np.ndarray, norm: "Normalizers") -> tuple[torch.Tensor, dict]:
        """Distillation, length-remedy and SFT terms over a micro-batch of rows, each
        normalised by the whole batch's count of the tokens it trains (`norm`)."""
        lc = self.loss_cfg
        jsd_on = bool(lc.distill == "jsd" and lc.distill_coef and norm.on)
        remedy_on = bool(b.topk_kl_coef_B is not None and norm.on)
        anchor_on = bool(b.anchor_coef > 0 and norm.on)
        betas = tuple(dict.fromkeys([lc.jsd_beta] * jsd_on + [0.0] * remedy_on))  # of the teacher terms
        fw = self._forward(b, rows, betas, anchor_on)
        win, lp, mask = fw.win, fw.lp_BT, fw.mask_BT
        on = self._tensor(b.on_policy_B.astype(np.float32), rows)[:, None]
        sampler = self._tensor(b.sampler_logprobs_BS, rows, win)
        terms = [(0.0, torch.zeros((), device=self.device), losses.sampler_mismatch_metrics(
            lp, sampler, mask * on))] if (mask * on).any() else []
        if lc.distill == "reverse_kl_pg" and lc.distill_coef and norm.pg:
            pg_mask = mask * on * self._tensor(b.seq_weight_B, rows)[:, None]  # stop-properly
            terms.append((lc.distill_coef, *losses.reverse_kl_pg_loss(
                lp, sampler, self._tensor(b.teacher_logprobs_BS, rows, win), pg_mask,
                clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high, tis_cap=lc.tis_cap,
                discount=lc.discount, seq_advantage_B=self._tensor(b.seq_advantage_B, rows),
                normalizer=norm.pg, no_reward_BT=self._tensor(b.loop_tail_BS, rows, win))))
        if jsd_on:  # stale rollouts (b.is_cap): weighted by their prefix's importance weight; the PG
            # term needs none, its PPO ratio already has the sampler as behaviour policy
            stale = 1.0 if b.is_cap is None else losses.prefix_importance_weights(lp, sampler, mask * on, b.is_cap)
            terms.append((lc.distill_coef, *self._jsd(b, rows, fw, mask * on * stale, norm.on, lc.jsd_beta)))
        if remedy_on:  # the length remedy: forward KL, top-k
            w = self._tensor(b.topk_kl_coef_B, rows)[:, None]
            loss, m = self._jsd(b, rows, fw, mask * on * w, norm.on, 0.0)
            terms.append((1.0, loss, {"loss/topk_kl": loss.item()}))
        if anchor_on:  # the divergence anchor: KL(student || starting student)
            terms.append((b.anchor_coef, *self._anchor_kl(fw, mask * on, norm.on)))
        if norm.sft:
            sft_mask = mask * self._tensor(b.sft_weight_B, rows)[:, None]
            terms.append((1.0, *losses.sft_loss(lp, sft_mask, normalizer=norm.sft)))
        total = sum((c * loss for c, loss, _ in terms), torch.zeros((), device=self.device))
        return total, {k: v for _, _, m in terms for k, v in m.items()}

    def _jsd(self, b: TrainBatch, rows, fw: "Forward", mask_BT, n_tokens, beta: float):
        """The generalized JSD to the teacher at `beta` (full distribution or top-k), token mean."""
        mask_N = fw.tokens(mask_BT)
        if fw.teacher_NJ is not None:
            return losses.divergence_loss(fw.teacher_NJ[:, fw.betas.index(beta)], mask_N, n_tokens)
        return losses.topk_jsd_from_logprobs(
            fw.topk_NK, fw.tokens(self._tensor(b.teacher_topk_logprobs_BSK, rows, fw.win)),
            fw.tokens(self._tensor(b.teacher_topk_ids_BSK, rows, fw.win)), mask_N, beta=beta,
            tail_bucket=self.loss_cfg.tail_bucket, normalizer=n_tokens)

    def _anchor_kl(self, fw: "Forward", mask_BT, n_tokens):
        """KL(student || anchor) per token over the full vocabulary (StableOPD's KL constraint;
        the anchor is the frozen starting student), normalised like the distillation terms."""
        return losses.divergence_loss(fw.anchor_N, fw.tokens(mask_BT), n_tokens, name="anchor_kl")

    def _forward(self, b: TrainBatch, rows: np.ndarray, betas: tuple[float, ...] = (),
                 anchor: bool = False) -> "Forward":
        """Some rows through the student (`Forward`): the log-probs of their targets and what the
        teacher terms at `betas` and the anchor need per trained token. The decoder runs only
        over the columns up to these rows' last target (their trailing padding is cut); the LM
        head, one log_softmax per temperature and all that is read from it, chunk by chunk
        over the trained tokens only (`losses.logprobs_from_hidden`)."""
        mask = b.loss_mask_BS[rows]
        S = max(2, int(row_ends(mask).max(initial=0)))
        win = self._window(mask[:, :S])
        ids = self._tensor(b.input_ids_BS, rows)[:, :S]
        tgt, mask_BT = win.targets(ids), self._tensor(b.loss_mask_BS, rows, win)
        sel = mask_BT.reshape(-1).nonzero().squeeze(1)
        hidden, head = self._hidden(ids, win, sel)
        gathers, refs = self._teacher_requests(b, rows, win, sel, betas)
        if anchor:
            refs["anchor"] = self._anchor_reference(ids, win, sel)
        gathers = [(take_tokens(tgt, sel)[:, None], b.temperature), *gathers]  # the targets first
        (lp_N, *topk), divs = losses.logprobs_from_hidden(hidden, head, gathers, list(refs.values()),
                                                          HEAD_CHUNK)
        lp_BT = lp_N.new_zeros(tgt.numel()).index_copy(0, sel, lp_N[:, 0]).view(tgt.shape)
        divs = dict(zip(refs, divs))
        return Forward(win, tgt, mask_BT, sel, lp_BT, betas, topk[0] if topk else None, divs.get("teacher"),
                       divs["anchor"][:, 0] if anchor else None)

    def _teacher_requests(self, b: TrainBatch, rows, win: "Window", sel_N: torch.Tensor,
                          betas: tuple[float, ...]) -> tuple[list, dict]:
        """What the teacher terms at `betas` read from the chunked pass: the student's log-probs
        at the teacher's top-k ids, or divergences to its full distribution (jsd_temperature)."""
        T = self.loss_cfg.jsd_temperature
        if not betas:
            return [], {}
        if b.teacher_full_logprobs_BSV is not None:
            full = take_tokens(self._tensor(b.teacher_full_logprobs_BSV, rows, win), sel_N)
            return [], {"teacher": losses.Reference(full, betas, T)}
        if b.teacher_topk_ids_BSK is None:
            raise ValueError("loss.distill=jsd and the length remedy need teacher.logprobs=full or topk")
        return [(take_tokens(self._tensor(b.teacher_topk_ids_BSK, rows, win), sel_N), T)], {}

    def _anchor_reference(self, ids_BS: torch.Tensor, win: "Window", sel_N: torch.Tensor) -> losses.Reference:
        """The frozen anchor at the trained tokens, for KL(student || anchor) at temperature 1."""
        if self.anchor is None:
            raise ValueError("the batch asks for the divergence anchor, but this learner has none: "
                             "set length.mode=auto and length.remedies.anchor_coef > 0 when it starts")
        with torch.no_grad():
            hidden, head = self._hidden(ids_BS, win, sel_N, self.anchor)
        return losses.Reference(hidden, (1.0,), 1.0, head)

    def _pair_terms(self, b: TrainBatch, idx: np.ndarray, n_pairs: int) -> tuple[torch.Tensor, dict]:
        """SMPO over a micro-batch of pairs, weighted by its share of the batch's pairs."""
        s = self.loss_cfg.smpo
        c, r = self._forward(b, b.pairs.chosen_rows[idx]), self._forward(b, b.pairs.rejected_rows[idx])
        margin = losses.margin_schedule(self.step, s.margin, s.margin_start, s.margin_ramp_steps)
        loss, m = losses.smpo_loss(
            c.lp_BT, c.mask_BT, r.lp_BT, r.mask_BT, r.tgt_BT, b.rejected_eos_id,
            beta=s.beta, margin=margin, rho=s.rho, loss_type=s.loss_type, sft_coef=s.sft_coef,
            eos_protection=s.eos_protection, lower_percentile=s.lower_percentile,
            min_log_prob=s.min_log_prob, chosen_upper_percentile=s.chosen_upper_percentile)
        return self.loss_cfg.smpo_coef * loss * (len(idx) / n_pairs), m

    # ------------------------------------------------------------------ step
    def train_step(self, b: TrainBatch) -> dict[str, float]:
        """One optimizer step. A non-finite loss or gradient norm skips the update (the grads
        are dropped, the LR schedule still advances) and counts in `optim/skipped`."""
        t0 = time.time()
        self.opt.zero_grad(set_to_none=True)
        acc = self._backward(b)
        clip = self.optim_cfg.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                         clip if clip > 0 else float("inf")))
        lr = self.sched.get_last_lr()[0]
        losses_ok = all(math.isfinite(v) for k, vs in acc.items() if k.endswith("_total") for v, _ in vs)
        if losses_ok and math.isfinite(grad_norm):
            self.opt.step()
            self.bad_in_row = 0
        else:
            self._skip_update(grad_norm)
        with warnings.catch_warnings():  # torch warns if the first step skipped optimizer.step()
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        out = {k: _combine(k, vs) for k, vs in acc.items()}
        return {**out, "optim/grad_norm": grad_norm, "optim/lr": lr, "optim/skipped": float(self.skipped),
                "learner/tokens": max(1.0, b.num_tokens), "learner/step": self.step,
                **batch_shape_metrics(b), "learner/peak_rss_mb": peak_rss_mb(),
                "time/learn_compute": time.time() - t0}

    def _backward(self, b: TrainBatch) -> dict[str, list]:
        """Forward and backward over every micro-batch; returns each metric's (value, rows).
        Rows go into micro-batches in order of length, so that each one's padding is short."""
        mb = self.optim_cfg.micro_batch_size
        norm, B = Normalizers.of(b), b.input_ids_BS.shape[0]
        rows_on = self._row_loss_on(b, norm)
        acc: dict[str, list] = {} if rows_on else {"loss/rows_total": [(0.0, B)]}  # logged either way
        order = np.argsort(row_ends(b.loss_mask_BS), kind="stable") if rows_on else np.arange(0)
        chunks = [("rows", order[i: i + mb]) for i in range(0, len(order), mb)]
        use_pairs = b.pairs is not None and len(b.pairs.chosen_rows) and self.loss_cfg.smpo_coef
        if use_pairs:
            M = len(b.pairs.chosen_rows)
            chunks += [("pairs", np.arange(i, min(M, i + mb))) for i in range(0, M, mb)]
        for kind, idx in chunks:
            loss, m = (self._row_terms(b, idx, norm) if kind == "rows"
                       else self._pair_terms(b, idx, M))
            if loss.requires_grad:
                loss.backward()
            for k, v in {**m, f"loss/{kind}_total": float(loss.detach())}.items():
                acc.setdefault(k, []).append((v, len(idx)))
        return acc

    def _row_loss_on(self, b: TrainBatch, norm: "Normalizers") -> bool:
        """Whether any row term (distillation, length remedies, SFT) can train this batch: an
        SMPO-only batch skips the forward over every row (its pairs have their own)."""
        lc = self.loss_cfg
        distill = lc.distill != "none" and lc.distill_coef > 0 and norm.on > 0
        remedies = (b.topk_kl_coef_B is not None or b.anchor_coef > 0) and norm.on
        return bool(distill or remedies or norm.sft)

    def _skip_update(self, grad_norm: float) -> None:
        """A bad step: drop the gradients; too many in a row stop the run (the learner's step
        is then still the last completed one, so the driver's final checkpoint matches it)."""
        self.opt.zero_grad(set_to_none=True)
        self.bad_in_row += 1
        if self.bad_in_row >= self.optim_cfg.max_bad_steps:
            raise BadStepsError(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm (last grad "
                f"norm {grad_norm}), optim.max_bad_steps={self.optim_cfg.max_bad_steps}: stopping. "
                f"Check the teacher's log-probs and the losses' inputs, or lower optim.lr")
        self.skipped += 1

    def ready(self) -> int:
        """Answers once the model is loaded (start-up has its own timeout); the process id."""
        return os.getpid()

    @torch.no_grad()
    def logprobs(self, b: TrainBatch) -> np.ndarray:
        """The student's log-probs of every target token [B, S] (0 where masked)."""
        out = np.zeros(b.input_ids_BS.shape, np.float32)
        mb = self.optim_cfg.micro_batch_size
        for i in range(0, len(out), mb):
            rows = np.arange(i, min(len(out), i + mb))
            fw = self._forward(b, rows)
            fw.win.scatter(out[rows[0]: rows[-1] + 1], fw.lp_BT.cpu().numpy())
        return out

    # ------------------------------------------------------------------ weights
    def state_for_sync(self, dtype: str = "float32") -> dict[str, torch.Tensor]:
        sd = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied: the engine reads the embedding
        return {k: v.detach().to(getattr(torch, dtype)).contiguous().cpu() for k, v in sd.items()}

    def export_weights(self, dtype: str = "float32") -> WeightUpdate:
        t0 = time.time()
        return WeightUpdate.from_tensors(self.step, self.state_for_sync(dtype), seconds=time.time() - t0)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_dir: str | Path, extra: dict) -> str:
        """A Hugging Face model dir + learner state; `extra` is JSON (data cursor, monitor).
        Atomic: a crash mid-save leaves only a hidden `.step-*.tmp` directory behind."""
        d = Path(ckpt_dir)
        tmp = d.parent / f".{d.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "learner_state.pt")
        state = {"step": self.step, "skipped": self.skipped, "bad_in_row": self.bad_in_row,
                 "python_rng": _jsonable(random.getstate()), "numpy_rng": _jsonable(np.random.get_state()),
                 "extra": extra}
        (tmp / "learner_state.json").write_text(json.dumps(state))
        if d.exists():  # the same step saved again (e.g. the final save after an error)
            old = d.parent / f".{d.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(d, old)
            shutil.rmtree(old)
        os.rename(tmp, d)
        return str(d)

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restore the learner state saved next to the model weights (loaded at start)."""
        d = Path(ckpt_dir)
        st = torch.load(d / "learner_state.pt", weights_only=True, map_location="cpu")
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        js = json.loads((d / "learner_state.json").read_text())
        self.step = js["step"]
        self.skipped, self.bad_in_row = js.get("skipped", 0), js.get("bad_in_row", 0)
        random.setstate(_tuplify(js["python_rng"]))
        np.random.set_state(tuple(_tuplify(js["numpy_rng"])))
        return js["extra"]


def _combine(key: str, values: list) -> float:
    """One step's metric from its micro-batches' (value, rows): loss/* is each micro-batch's
    share of the whole-batch loss (global normaliser), so they sum; */min_* is a minimum; any
    other metric is a mean within its micro-batch, averaged weighted by rows."""
    if key.startswith("loss/"):
        return sum(v for v, _ in values)
    if "/min_" in key:
        return min(v for v, _ in values)
    return sum(v * n for v, n in values) / max(1, sum(n for _, n in values))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"ndarray": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuplify(x: Any) -> Any:
    if isinstance(x, dict) and "ndarray" in x:
        return np.array(x["ndarray"], dtype=x["dtype"])
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x
