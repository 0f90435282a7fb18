"""The student's forward over a micro-batch: the window of target positions, the decoder, and
the LM head on the trained tokens only, chunk by chunk (`opd.losses.logprobs_from_hidden`).

No (B, T, V) logits are ever held: the decoder gives hidden states, the head runs on the N
trained tokens in chunks of HEAD_CHUNK, with one log_softmax per temperature that also gives
what the distillation terms read (log-probs at the teacher's top-k ids, generalized JSDs to
the teacher's full distribution, the KL to the frozen anchor). The result is a `Forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from opd import losses
from opd.learner.shard import Whole, reshard
from opd.types import TrainBatch

# Tokens per chunk of the LM head and its log_softmax: (HEAD_CHUNK, V) float32 temporaries,
# ~200 MB each at V = 49,152.
HEAD_CHUNK = 1024


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


@dataclass(frozen=True)
class Forward:
    """A micro-batch of rows through the student, over its window of target positions. The
    LM head ran on its N trained tokens only (loss mask > 0, row-major), chunk by chunk: no
    (B, Tc, V) logits exist. Shapes: *_BT (B, Tc); *_N* (N, ...) over the trained tokens."""

    rows: np.ndarray  # the batch rows, in order
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


class StudentForward:
    """Runs rows of a TrainBatch through the student (and the frozen anchor, if any) on one device.

    `student` is the student being trained, `anchor` the run's frozen starting student or None,
    each a `Whole` (sharded or not, `opd.learner.shard`): everything computed from a model runs
    inside its forward. `autocast`: bf16 autocast on the device, CPU or CUDA (the weights stay
    fp32; the head's logits are cast to fp32 before every log-softmax).
    `vocab_size`: the tokenizer's, to which the head's logits are cut (models may pad their
    embedding rows)."""

    def __init__(self, student: Whole, anchor: Optional[Whole], device: str, autocast: bool, vocab_size: int):
        self.student, self.anchor, self.device = student, anchor, device
        self.autocast, self.vocab_size = autocast, vocab_size
        self.device_type = torch.device(device).type
        model = student.model
        # the LM head on target positions only, where the model's logits are a plain head
        self.head_only_on_targets = (hasattr(model, "model") and not any(
            getattr(model.config, k, None) for k in ("final_logit_softcapping", "logit_scale")))

    def release(self) -> None:
        """Free what the last forward gathered and no backward will: the anchor's root (read,
        never trained; its head is read again when the chunked head recomputes in backward),
        and the student's after a forward without backward."""
        reshard(self.anchor)
        reshard(self.student)

    def tensor(self, a: Optional[np.ndarray], rows: np.ndarray, win: Optional[Window] = None
               ) -> Optional[torch.Tensor]:
        """Rows of a batch array on the device; [B, S, ...] arrays cut to the window's targets."""
        if a is None:
            return None
        t = torch.as_tensor(a[rows]).to(self.device)
        return t if win is None else win.targets(t)

    def __call__(self, b: TrainBatch, rows: np.ndarray, betas: tuple[float, ...] = (),
                 anchor: bool = False, jsd_temperature: float = 1.0) -> Forward:
        """Some rows through the student (`Forward`): the log-probs of their targets and what the
        teacher terms at `betas` (at `jsd_temperature`) and the anchor need per trained token.
        The decoder runs only over the columns up to these rows' last target (their trailing
        padding is cut); the LM head, one log_softmax per temperature and all that is read
        from it, chunk by chunk over the trained tokens only (`losses.logprobs_from_hidden`)."""
        mask = b.loss_mask_BS[rows]
        S = max(2, int(row_ends(mask).max(initial=0)))
        win = Window.of(mask[:, :S], self.device)
        ids = self.tensor(b.input_ids_BS, rows)[:, :S]
        tgt, mask_BT = win.targets(ids), self.tensor(b.loss_mask_BS, rows, win)
        sel = mask_BT.reshape(-1).nonzero().squeeze(1)
        hidden, head = self._hidden(ids, win, sel)
        gathers, refs = self._teacher_requests(b, rows, win, sel, betas, jsd_temperature)
        if anchor:
            refs["anchor"] = self._anchor_reference(ids, win, sel)
        gathers = [(take_tokens(tgt, sel)[:, None], b.temperature), *gathers]  # the targets first
        (lp_N, *topk), divs = losses.logprobs_from_hidden(hidden, head, gathers, list(refs.values()),
                                                          HEAD_CHUNK)
        lp_BT = lp_N.new_zeros(tgt.numel()).index_copy(0, sel, lp_N[:, 0]).view(tgt.shape)
        divs = dict(zip(refs, divs))
        return Forward(rows, win, tgt, mask_BT, sel, lp_BT, betas, topk[0] if topk else None,
                       divs.get("teacher"), divs["anchor"][:, 0] if anchor else None)

    def _hidden(self, ids_BS: torch.Tensor, win: Window, sel_N: torch.Tensor,
                whole: Optional[Whole] = None) -> tuple[torch.Tensor, Callable]:
        """The LM head's inputs at the trained tokens (N, H) and the head, (N, H) -> float32
        logits (N, V) over the tokenizer's vocabulary, for `losses.logprobs_from_hidden` to
        apply chunk by chunk. The decoder runs over the columns the window needs. Right padding
        only: causal attention keeps pads from touching real positions. Models that
        post-process logits (soft-capping, scaling) run whole: their logits are the inputs and
        the head only casts them. `whole`: the anchor (same architecture); default the student.
        Both run inside `whole`'s forward, which gathers a sharded model's root (embeddings,
        head) until its backward, or its `shard.reshard`."""
        return (self.student if whole is None else whole)(lambda model: self._head_inputs(model, ids_BS, win, sel_N))

    def _head_inputs(self, model: torch.nn.Module, ids_BS: torch.Tensor, win: Window,
                     sel_N: torch.Tensor) -> tuple[torch.Tensor, Callable]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.head_only_on_targets:
                x = model.model(input_ids=ids_BS[:, : win.columns]).last_hidden_state
                head = model.get_output_embeddings()
            else:
                x, head = model(input_ids=ids_BS[:, : win.columns]).logits, torch.nn.Identity()
        x_BTX = x.gather(1, win.pos_BT[..., None].expand(-1, -1, x.shape[-1]))
        return take_tokens(x_BTX, sel_N), self._float_logits(head)

    def _float_logits(self, head: torch.nn.Module) -> Callable:
        def logits(x_NX: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
                return head(x_NX)[..., : self.vocab_size].float()

        return logits

    def _teacher_requests(self, b: TrainBatch, rows: np.ndarray, win: Window, sel_N: torch.Tensor,
                          betas: tuple[float, ...], temperature: float) -> tuple[list, dict]:
        """What the teacher terms at `betas` read from the chunked pass: the student's log-probs
        at the teacher's top-k ids, or divergences to its full distribution (at `temperature`)."""
        if not betas:
            return [], {}
        if b.teacher_full_logprobs_BSV is not None:
            full = take_tokens(self.tensor(b.teacher_full_logprobs_BSV, rows, win), sel_N)
            return [], {"teacher": losses.Reference(full, betas, temperature)}
        if b.teacher_topk_ids_BSK is None:
            raise ValueError("loss.distill=jsd and the length remedy need teacher.logprobs=full or topk")
        return [(take_tokens(self.tensor(b.teacher_topk_ids_BSK, rows, win), sel_N), temperature)], {}

    def _anchor_reference(self, ids_BS: torch.Tensor, win: Window, sel_N: torch.Tensor) -> losses.Reference:
        """The frozen anchor at the trained tokens, for KL(student || anchor) at temperature 1."""
        if self.anchor is None:
            raise ValueError("the batch asks for the divergence anchor, but this learner has none: "
                             "set length.mode=auto and length.remedies.anchor_coef > 0 when it starts")
        with torch.no_grad():
            hidden, head = self._hidden(ids_BS, win, sel_N, self.anchor)
        return losses.Reference(hidden, (1.0,), 1.0, head)
