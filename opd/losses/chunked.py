"""The student's log-probs and divergences from its final hidden states, chunk by chunk.

The learner never holds (B, T, V) logits: `logprobs_from_hidden` runs the LM head on the
trained tokens' hidden states ``chunk_size`` at a time, one log_softmax per temperature, and
returns what the losses need per token (log-probs at given ids, full-vocabulary generalized
JSDs to a `Reference`). `divergence_loss` and `opd.losses.jsd.topk_jsd_from_logprobs` turn
them into the losses of the logits-level forms in `opd.losses.reference` (tests compare
values and gradients).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from opd.losses.common import Metrics, float_dtype, masked_token_mean
from opd.losses.jsd import gjsd


@dataclass(frozen=True)
class Reference:
    """A constant per-token distribution to compare the student with in `logprobs_from_hidden`
    (a teacher's full log-probs; a frozen model's hidden states): its logits are head(x_NX),
    or x_NX itself when head is None. Both sides are divided by ``temperature`` before the
    softmax; one generalized JSD (`opd.losses.jsd.gjsd`) per entry of ``betas``.

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
    logits = logits.to(float_dtype(logits))
    temps = dict.fromkeys([t for _, t in gathers] + [r.temperature for r in references])
    logp = {t: _log_softmax(logits, t) for t in temps}
    out = _gathers(logp, [(ids_NK[start:end], t) for ids_NK, t in gathers])
    for r in references:
        with torch.no_grad():
            ref = r.x_NX[start:end] if r.head is None else r.head(r.x_NX[start:end])
            ref = _log_softmax(ref.to(logits.dtype), r.temperature)
        out.append(torch.stack([gjsd(logp[r.temperature], ref, beta) for beta in r.betas], -1))
    return tuple(out)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the last axis; at temperature 1 without the
    division's (N, V) copy."""
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, -1)


def _gathers(logp: dict[float, torch.Tensor], gathers: Sequence[tuple[torch.Tensor, float]]) -> list[torch.Tensor]:
    """Each (ids_NK, temperature)'s log-probs logp[temperature][ids]: the gathers of one
    temperature as one gather over their ids side by side, then split back."""
    out: list[Optional[torch.Tensor]] = [None] * len(gathers)
    for t in dict.fromkeys(t for _, t in gathers):
        idx = [i for i, (_, ti) in enumerate(gathers) if ti == t]
        ids = [gathers[i][0].long() for i in idx]
        parts = logp[t].gather(-1, torch.cat(ids, -1)).split([x.shape[-1] for x in ids], -1)
        for i, part in zip(idx, parts):
            out[i] = part
    return out  # type: ignore[return-value]


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
        parts = [tuple(hidden_NH.new_zeros(s, dtype=float_dtype(hidden_NH)) for s in empty)]
    out = [torch.cat(p) for p in zip(*parts)]
    return out[: len(gathers)], out[len(gathers):]


def divergence_loss(div_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: float | None = None,
                    name: str = "jsd") -> tuple[torch.Tensor, Metrics]:
    """Token mean of per-token divergences (a `Reference`'s from `logprobs_from_hidden`):
    sum(D * mask) / normalizer, the loss of `generalized_jsd`, logged as ``loss/<name>``.
    Shapes: div_BT, mask_BT (B, T) or (N,) -> ()."""
    loss = masked_token_mean(div_BT, mask_BT, normalizer)
    return loss, {f"loss/{name}": loss.item()}
