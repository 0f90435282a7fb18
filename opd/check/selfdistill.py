"""Row 3 of opd-check: the self-distillation smoke test.

The student scored as its own teacher must give a loss and a KL of 0 and a zero gradient,
through the real loss path: the learner's forward and objective (`opd.learner.objective`),
on a TrainBatch built as the loop builds it (`opd.batch.build_train_batch`), for every
`loss.distill`. The self-teacher's scores are the student's log-softmax at each completion
position (sampled token at temperature 1, top-k or full at `loss.jsd_temperature`), from a
plain forward of the learner's own model; the sampler's log-probs are its own too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from opd.check.report import Row, Verdict, worst
from opd.types import RolloutBatch, TeacherLogprobs, TeacherScores

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig

DISTILLS = ("reverse_kl_pg", "jsd")  # every loss.distill that has a teacher term ("none" has none)
LOSS_TOL, GRAD_TOL = 1e-4, 1e-3  # |loss|, |KL| and the gradient's global norm
KL_KEYS = ("kl/k3", "loss/jsd_topk", "loss/jsd")  # the term's divergence metric, as each loss logs it


@torch.no_grad()
def self_scores(model: torch.nn.Module, rollouts: RolloutBatch, vocab: int, mode: str, k: int,
                temperature: float) -> TeacherScores:
    """The student as its own teacher: per completion token, log p(token) at temperature 1,
    and the top-k or the full distribution at `temperature`. One sequence per forward."""
    N, T = len(rollouts.completion_ids), max(1, max(rollouts.lengths))
    device = next(model.parameters()).device
    lp = np.zeros((N, T), np.float32)
    topk = (np.zeros((N, T, k), np.int64), np.full((N, T, k), -np.inf, np.float32)) if mode == "topk" else None
    full = np.zeros((N, T, vocab), np.float32) if mode == "full" else None
    for n, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        ids = torch.tensor([list(p) + list(c)], device=device)
        logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(c) - 1, :vocab].float()
        lp[n, : len(c)] = torch.log_softmax(logits, -1).gather(1, torch.tensor(c, device=device)[:, None])[:, 0].cpu()
        at_t = torch.log_softmax(logits / temperature, -1)
        if topk is not None:
            v, i = at_t.topk(k, -1)
            topk[0][n, : len(c)], topk[1][n, : len(c)] = i.cpu().numpy(), v.cpu().numpy()
        if full is not None:
            full[n, : len(c)] = at_t.cpu().numpy()
    return TeacherScores(lp, 1.0, topk and topk[0], topk and topk[1], full)


def grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def one_distill(cfg: TrainConfig, learner: Any, batch: Any, distill: str) -> dict[str, float]:
    """Loss, KL and gradient norm of one loss.distill on the self-scored batch."""
    from opd.learner import objective

    lc = replace(cfg.loss, distill=distill, distill_coef=1.0, smpo_coef=0.0, sft_coef=0.0, on_policy_fraction=1.0)
    learner.opt.zero_grad(set_to_none=True)
    acc = objective.backward(learner.forward, lc, batch, cfg.optim.micro_batch_size, 0)
    metrics = {k: objective.combine(k, v) for k, v in acc.items()}
    kl = next((metrics[k] for k in KL_KEYS if k in metrics), float("nan"))
    out = {"loss": metrics.get("loss/rows_total", float("nan")), "kl": kl, "grad_norm": grad_norm(learner.model)}
    learner.opt.zero_grad(set_to_none=True)
    return out


def self_distill_row(cfg: TrainConfig, learner: Any, rollouts: RolloutBatch, tok: Any) -> Row:
    """Row 3: every loss.distill, the student its own teacher: 0 loss, 0 KL, 0 gradient."""
    from opd.batch import build_train_batch

    mode = cfg.teacher.logprobs if cfg.teacher.logprobs != TeacherLogprobs.SAMPLED else "full"  # jsd reads top-k/full
    scores = self_scores(learner.model, rollouts, learner.vocab_size, mode, cfg.teacher.topk, cfg.loss.jsd_temperature)
    own = replace(rollouts, sampler_logprobs=[list(scores.logprobs_NT[n, :L]) for n, L in enumerate(rollouts.lengths)])
    batch = build_train_batch(own, scores, tok.pad_token_id or 0, tok.eos_token_id, True, 1.0)
    found, verdicts, data = [], [], {}
    for d in DISTILLS:
        r = one_distill(cfg, learner, batch, d)
        ok = abs(r["loss"]) <= LOSS_TOL and abs(r["kl"]) <= LOSS_TOL and r["grad_norm"] <= GRAD_TOL
        verdicts.append(Verdict.OK if ok else Verdict.FAIL)
        found.append(f"loss.distill={d}: loss {r['loss']:.1e}, KL {r['kl']:.1e}, grad norm {r['grad_norm']:.1e}"
                     + ("" if ok else f" (tolerance {LOSS_TOL:g} / {GRAD_TOL:g})"))
        data[d] = r
    todo = [] if Verdict.FAIL not in verdicts else [
        "a student scored as its own teacher must give 0: the loss path mixes up temperatures, masks or "
        "positions (opd/learner/objective.py, opd/losses/)"]
    return Row("self-distillation", worst(verdicts), found, todo, data)
