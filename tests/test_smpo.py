"""What benchmarks/exp_smpo.py relies on: the rejected-side collapse metrics are exact, and a
learner step on a pair whose rejected completion ends in EOS leaves that EOS's log-prob
clearly higher under EOS protection "exclude" or "flip" than the same step under "none"
(which lowers it when the chosen side has no EOS of its own)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from opd.losses import smpo_loss
from opd.types import PairBatch, RolloutBatch

EOS = 5
DT = torch.float64


def _hand_built():
    """Three rejected rows: ends in EOS; ends in EOS after a half-weight token; truncated."""
    lr = torch.tensor([[-0.5, -2.0, -1.0, -1.5, 0.0],
                       [-0.1, -0.5, -4.0, 0.0, 0.0],
                       [-0.3, -7.0, -0.2, -0.9, -0.6]], dtype=DT, requires_grad=True)
    mr = torch.tensor([[1, 1, 1, 1, 0], [1, 0.5, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=DT)
    ids = torch.tensor([[1, 2, 3, EOS, EOS],     # pad == eos: the padding after EOS is not EOS
                        [4, 1, EOS, EOS, EOS],
                        [1, 2, 3, 4, 1]])
    lc = torch.full((3, 2), -3.0, dtype=DT)
    return lc, torch.ones(3, 2, dtype=DT), lr, mr, ids


@pytest.mark.parametrize("protection", ["exclude", "flip", "none"])
def test_rejected_eos_metrics_are_exact(protection):
    lc, mc, lr, mr, ids = _hand_built()
    _, m = smpo_loss(lc, mc, lr, mr, ids, EOS, eos_protection=protection)
    assert m["smpo/eos_logp_rejected"] == pytest.approx((-1.5 + -4.0) / 2, rel=1e-12)
    assert m["smpo/rejected_eos_frac"] == pytest.approx(2 / 3, rel=1e-12)
    assert m["smpo/min_logp_rejected"] == -7.0      # raw log-probs: the floor (-2.3) is not applied


def test_rejected_eos_metrics_empty_and_masked():
    lc, mc, lr, mr, ids = _hand_built()
    _, m = smpo_loss(lc, mc, lr, mr, torch.zeros_like(ids), EOS)
    assert m["smpo/eos_logp_rejected"] == 0.0 and m["smpo/rejected_eos_frac"] == 0.0
    lr_pad = torch.where(mr > 0, lr.detach(), torch.full_like(lr, -50.0))   # garbage in padding
    assert smpo_loss(lc, mc, lr_pad, mr, ids, EOS)[1]["smpo/min_logp_rejected"] == -7.0
    _, m = smpo_loss(lc, mc, lr, torch.zeros_like(mr), ids, EOS)
    assert (m["smpo/eos_logp_rejected"], m["smpo/rejected_eos_frac"], m["smpo/min_logp_rejected"]) == (0, 0, 0)


def test_min_metric_is_a_minimum_over_micro_batches():
    from opd.learner.objective import combine

    assert combine("smpo/min_logp_rejected", [(-3.0, 4), (-9.0, 1)]) == -9.0
    assert combine("smpo/eos_logp_rejected", [(-3.0, 3), (-9.0, 1)]) == -4.5
    assert combine("loss/smpo", [(1.0, 3), (2.0, 1)]) == 3.0


# --------------------------------------------------------------------- a learner step
def _pair_batch(eos: int, pad: int, chosen_stops: bool):
    """One prompt; the rejected completion ends in EOS and its body differs obviously from
    the chosen one's, which ends in EOS too or is truncated. Rows: 0 chosen, 1 rejected."""
    from opd.batch import build_train_batch

    prompt = [7, 8, 9, 10]
    chosen = [11, 12, eos] if chosen_stops else [11, 12, 13]
    rollouts = RolloutBatch([prompt, prompt], [chosen, [20, 21, 22, 23, eos]], [[-1.0] * 3, [-1.0] * 5],
                            ["stop" if chosen_stops else "length", "stop"], ["", ""], 0)
    pairs = PairBatch(np.array([0]), np.array([1]), np.array([1.0], np.float32), 0)
    return build_train_batch(rollouts, None, pad, eos, on_policy=True, temperature=1.0,
                             pairs=pairs, sft_weight_N=np.zeros(2, np.float32))


def _eos_logp_change(tiny_cfg, tiny_zoo, chosen_stops: bool, **smpo) -> float:
    """Log-prob of the rejected row's EOS after one SMPO-only step minus before."""
    from opd.learner import Learner
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    loss = replace(tiny_cfg.loss, distill="none", smpo_coef=1.0,
                   smpo=replace(tiny_cfg.loss.smpo, margin=5.0, margin_ramp_steps=0, **smpo))
    cfg = replace(tiny_cfg, loss=loss, optim=replace(tiny_cfg.optim, lr=3e-3, warmup_steps=0, grad_clip=0.0))
    learner = Learner(str(tiny_zoo.student), cfg)
    batch = _pair_batch(tok.eos_token_id, tok.pad_token_id, chosen_stops)
    eos_pos = 4 + 5 - 1
    before = learner.logprobs(batch)[1, eos_pos]
    m = learner.train_step(batch)
    assert m["loss/smpo_pref"] > 0 and m["smpo/rejected_eos_frac"] == 1.0
    assert m["smpo/eos_logp_rejected"] == pytest.approx(float(before), abs=1e-5)
    return float(learner.logprobs(batch)[1, eos_pos] - before)


STABILISED = dict(lower_percentile=0.02, min_log_prob=-2.3, loss_type="sigmoid", beta=5.0)
# How much higher a protection must leave the rejected EOS than "none" does: the smallest
# gap on these pairs is ~1e-2 nats ("exclude", chosen side stops), float noise ~1e-6.
MARGIN = 5e-3


@pytest.fixture(scope="module")
def unprotected(tiny_cfg, tiny_zoo):
    """`_eos_logp_change` under eos_protection="none" on the same pair and settings, by
    (chosen_stops, sft_coef): what each protection is measured against (computed once)."""
    cache: dict[tuple[bool, float], float] = {}

    def change(chosen_stops: bool, sft_coef: float) -> float:
        if (chosen_stops, sft_coef) not in cache:
            cache[chosen_stops, sft_coef] = _eos_logp_change(
                tiny_cfg, tiny_zoo, chosen_stops, eos_protection="none", sft_coef=sft_coef, **STABILISED)
        return cache[chosen_stops, sft_coef]

    return change


@pytest.mark.slow
@pytest.mark.parametrize("chosen_stops", [True, False])
@pytest.mark.parametrize("sft_coef", [1.0, 0.0])
def test_flip_step_raises_rejected_eos_above_unprotected(tiny_cfg, tiny_zoo, unprotected, sft_coef, chosen_stops):
    """"flip": the rejected EOS enters r(rejected) as -log p, so the step pushes it up."""
    delta = _eos_logp_change(tiny_cfg, tiny_zoo, chosen_stops, eos_protection="flip", sft_coef=sft_coef,
                             **STABILISED)
    none = unprotected(chosen_stops, sft_coef)
    assert delta >= 0.0 and delta > none + MARGIN, (delta, none)


@pytest.mark.slow
@pytest.mark.parametrize("sft_coef", [1.0, 0.0])
def test_exclude_step_keeps_rejected_eos_above_unprotected_when_chosen_stops(tiny_cfg, tiny_zoo, unprotected,
                                                                              sft_coef):
    delta = _eos_logp_change(tiny_cfg, tiny_zoo, True, eos_protection="exclude", sft_coef=sft_coef,
                             **STABILISED)
    none = unprotected(True, sft_coef)
    assert delta >= 0.0 and delta > none + MARGIN, (delta, none)


@pytest.mark.slow
def test_exclude_removes_only_the_direct_push(tiny_cfg, tiny_zoo, unprotected):
    """"exclude" takes EOS out of r(rejected): no gradient reaches it directly. Through the
    shared weights (rejected body down, a chosen side without EOS up) it can still fall, here
    even with the SFT term on; less than with "none", which also pushes it directly."""
    kw = dict(sft_coef=0.0, **STABILISED)
    none = unprotected(False, 0.0)
    exclude = _eos_logp_change(tiny_cfg, tiny_zoo, False, eos_protection="exclude", **kw)
    flip = _eos_logp_change(tiny_cfg, tiny_zoo, False, eos_protection="flip", **kw)
    assert none + MARGIN < exclude < 0.0 <= flip, (none, exclude, flip)


@pytest.mark.slow
def test_unprotected_step_lowers_rejected_eos(unprotected):
    """"none": EOS is a rejected token like any other; when the chosen side has no EOS to pull
    it back up (truncated), the step pushes it down, winsorization and floor on (EOS is above
    the floor here: they do not stop it)."""
    delta = unprotected(False, 0.0)
    assert delta < 0.0 and math.isfinite(delta)


@pytest.mark.slow
def test_unprotected_step_keeps_eos_when_the_chosen_side_stops_too(unprotected):
    """"none" with EOS on both sides: the chosen EOS (shorter row, larger weight in its
    length-normalised reward) pulls the shared EOS logit up more than the rejected one pushes
    it down. Collapse needs pairs where the rejected side stops and the chosen one does not,
    or stops later."""
    delta = unprotected(True, 0.0)
    assert delta >= 0.0, delta


# ------------------------------------------------------- the monitor's rejected choice
@pytest.mark.parametrize("mode,monitor_asks,rejected", [
    ("never", True, 1), ("always", False, 2), ("auto", False, 1), ("auto", True, 2)])
def test_prefer_bad_rejected_modes(mode, monitor_asks, rejected):
    """Three samples of one prompt: 0 best, 1 worst by score, 2 truncated (in between)."""
    from opd import length as L
    from opd.batch import select_pairs
    from opd.config import load_config
    from opd.types import TeacherScores

    cfg = load_config(["loss=smpo", "rollout.samples_per_prompt=3", f"loss.smpo.prefer_bad_rejected={mode}"])
    rollouts = RolloutBatch([[1]] * 3, [[3, EOS], [4, EOS], [6, 7]], [[0.0] * 2] * 3,
                            ["stop", "stop", "length"], [""] * 3, 0)
    scores = TeacherScores(np.array([[-1.0] * 2, [-3.0] * 2, [-2.0] * 2], np.float32), 0.0)
    stats = L.rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, {EOS}, 2)
    plan = L.PenaltyPlan(prefer_bad_rejected=monitor_asks)
    pairs = select_pairs(rollouts, scores, None, 3, cfg.loss.smpo, plan, stats.repetitive)
    assert (pairs.chosen_rows.tolist(), pairs.rejected_rows.tolist()) == ([0], [rejected])
