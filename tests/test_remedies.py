"""Length control that rescues a collapsing student instead of silencing it.

- `effective_weights` is exact on hand-built batches;
- the monitor never lets stop-properly masking zero a batch: it down-weights and says so;
- a batch where every rollout is truncated still yields a gradient under `auto`;
- each remedy moves the student the way its docstring says: the top-k KL remedy and the
  teacher mixture raise the student's EOS log-prob where the teacher stops; the loop-tail
  rule denies a looping tail any positive advantage;
- the learner's row terms (distillation, top-k remedy, anchor), computed from hidden states
  in chunks, equal the logits-level losses on full logits: values and gradients.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from opd import length as L
from opd import losses
from opd.losses import reference
from opd.batch import build_train_batch, effective_weights, with_extra_rows
from opd.types import PairBatch, RolloutBatch, TeacherScores


def _rollouts(comps, reasons, prompt=(1, 5)):
    return RolloutBatch([list(prompt)] * len(comps), [list(c) for c in comps],
                        [[-1.0] * len(c) for c in comps], list(reasons), [""] * len(comps), 0)


# ----------------------------------------------------------------- effective weight
def test_effective_weight_is_exact_per_term():
    r = _rollouts([[7, 8, 9], [9]], ["stop", "length"])
    b = build_train_batch(r, None, 0, 2, True, 1.0, seq_weight_N=np.array([1.0, 0.0]))
    w = effective_weights(b, {"pg": True, "jsd": False, "sft": True})
    assert w == {"length/effective_weight/pg": 0.75, "length/effective_weight/sft": 0.0,
                 "length/effective_weight": 0.75}
    # every rollout masked: the batch trains on nothing, and the number says so
    masked = build_train_batch(r, None, 0, 2, True, 1.0, seq_weight_N=np.zeros(2))
    assert effective_weights(masked, {"pg": True})["length/effective_weight"] == 0.0
    # down-weighting counts its weight; the distribution term counts every student token
    down = build_train_batch(r, None, 0, 2, True, 1.0, seq_weight_N=np.array([0.1, 0.1]))
    got = effective_weights(down, {"pg": True, "jsd": True})
    assert got["length/effective_weight/pg"] == pytest.approx(0.1)
    assert got["length/effective_weight"] == 1.0


def test_effective_weight_with_mixture_rows_and_pairs():
    r = _rollouts([[7, 8, 9], [9], [4, 2]], ["length", "length", "stop"])
    b = build_train_batch(r, None, 0, 2, np.array([True, True, False]), 1.0, seq_weight_N=np.zeros(3),
                          sft_weight_N=np.array([0.0, 0.0, 2.0]), topk_kl_coef_N=np.array([1.0, 0.0, 0.0]),
                          pairs=PairBatch(np.array([0]), np.array([1]), np.array([1.0], np.float32), 0))
    w = effective_weights(b, {"pg": True, "sft": True, "topk_kl": True, "smpo": True})
    assert w["length/effective_weight/pg"] == 0.0
    assert w["length/effective_weight/sft"] == pytest.approx(2 / 6)   # a weight of 2 counts once
    assert w["length/effective_weight/topk_kl"] == pytest.approx(3 / 6)
    assert w["length/effective_weight/smpo"] == pytest.approx(4 / 6)
    assert w["length/effective_weight"] == 1.0


def test_extra_rows_pad_scores_and_train_by_sft_only():
    r = _rollouts([[7, 8], [9]], ["length", "length"])
    s = TeacherScores(np.array([[-1, -2], [-3, 0]], np.float32), 1.0,
                      topk_ids_NTK=np.ones((2, 2, 3), np.int64), topk_logprobs_NTK=np.zeros((2, 2, 3), np.float32))
    merged, ms = with_extra_rows(r, s, _rollouts([[4, 5, 2]], ["stop"]))
    assert merged.completion_ids == [[7, 8], [9], [4, 5, 2]] and ms.logprobs_NT.shape == (3, 3)
    assert np.isneginf(ms.topk_logprobs_NTK[2]).all() and (ms.logprobs_NT[:2, :2] == s.logprobs_NT).all()


# ----------------------------------------------------------------- the monitor's guard
def _monitor(max_new_tokens=4, **remedies):
    cfg = L.LengthConfig(mode="auto", control="switch", stats=L.StatsConfig(tail_window=8), detector=L.DetectorConfig(k_on=1, k_off=1),
                         penalties=L.PenaltyConfig(overlong_buffer=1, stop_properly_mode="mask"),
                         remedies=L.RemedyConfig(**{"topk_kl_coef": 1.0, "mixture_fraction": 0.25,
                                                    "loop_tail_rule": True, "anchor_coef": 0.0, **remedies}))
    return L.LengthMonitor({2}, max_new_tokens, cfg)


def test_monitor_down_weights_instead_of_masking_everything_and_says_so():
    m = _monitor()
    _, events, plan = m.observe([[5, 5, 5, 5]] * 4, ["length"] * 4, step=1)
    assert plan.stop_properly == "downweight" and plan.stop_properly_weight == pytest.approx(0.1)
    assert [(e.condition, e.state) for e in events if e.condition == "effective_weight"] == [("effective_weight", "low")]
    assert "0% of the tokens" in [e for e in events if e.condition == "effective_weight"][0].reason
    assert L.loss_weights(plan, ["length"] * 4).min() > 0
    # the remedies that teach stopping are on: top-k KL on every truncated row, teacher mixture
    stats, _, plan = m.observe([[5, 6, 7, 8]] * 4, ["length"] * 4, step=2)
    np.testing.assert_array_equal(plan.topk_kl_coef_N(stats, ["length"] * 4), [1, 1, 1, 1])
    assert plan.mixture_fraction == 0.25
    # recovered: masking is safe again (an 'ok' event), the remedies switch off with the detector
    _, events, plan = m.observe([[5, 2]] * 4, ["stop"] * 4, step=3)
    assert ("effective_weight", "ok") in [(e.condition, e.state) for e in events]
    assert plan.topk_kl_coef_N(stats, ["stop"] * 4) is None and plan.mixture_fraction == 0.0


def test_monitor_keeps_masking_while_enough_rollouts_stop():
    m = _monitor()
    _, events, plan = m.observe([[5, 2], [5, 2], [5, 6, 7, 8]], ["stop", "stop", "length"], step=1)
    assert plan.stop_properly == "mask" and not [e for e in events if e.condition == "effective_weight"]


def test_loop_tail_rule_marks_only_looping_rollouts():
    m = _monitor(max_new_tokens=16)
    loop = [3, 4] * 8
    stats, _, plan = m.observe([loop, list(range(5, 21))], ["length", "length"], step=1)
    assert stats.repetitive == (True, False)
    assert plan.loop_tail_tokens_N(stats) == [8, 0]


# ----------------------------------------------------------------- the loss-level rule
def test_no_reward_tail_denies_positive_advantage_only():
    lp = torch.zeros(1, 4, requires_grad=True)
    sampler = torch.zeros(1, 4)
    teacher = torch.tensor([[1.0, 1.0, -1.0, 1.0]])  # advantages +1, +1, -1, +1
    mask = torch.ones(1, 4)
    no_reward = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # the last three tokens are a looping tail
    loss, _ = losses.reverse_kl_pg_loss(lp, sampler, teacher, mask, None, None, no_reward_BT=no_reward)
    loss.backward()
    # -grad = advantage / 4: +1 kept outside the tail, -1 kept inside, +1 denied inside
    np.testing.assert_allclose(-lp.grad.numpy()[0], [0.25, 0.0, -0.25, 0.0])


# ----------------------------------------------------------------- learner-level proofs
@pytest.fixture(scope="module")
def learner_cfg(tiny_overrides):
    from opd.config import load_config

    return load_config(tiny_overrides + ["loss=opd", "optim.lr=0.01", "optim.warmup_steps=0",
                                         "optim.schedule=constant", "optim.grad_clip=0"])


@pytest.fixture()
def learner(learner_cfg, tiny_zoo):
    from opd.learner import Learner

    return Learner(str(tiny_zoo.student), learner_cfg)


def _eos_logprob(learner, tok, prompt, prefix) -> float:
    """log p_student(EOS | prompt, prefix)."""
    probe = build_train_batch(RolloutBatch([prompt], [prefix + [tok.eos_token_id]], [[0.0] * (len(prefix) + 1)],
                                           ["stop"], [""], 0), None, tok.pad_token_id, tok.eos_token_id, False, 1.0)
    pos = len(prompt) + len(prefix)
    return float(learner.logprobs(probe)[0, pos])


def _assert_stops_more(before: float, after: float) -> None:
    """The probability of *not* stopping where the teacher stops at least halves."""
    assert 1 - np.exp(after) < 0.5 * (1 - np.exp(before)), (before, after)


def _truncated_batch(tok, remedy: bool, stop_properly_weight: float):
    """Two truncated rollouts; at every position the teacher would stop (EOS at p=0.99)."""
    prompt, digit = tok("3+4", add_special_tokens=False)["input_ids"], tok("7", add_special_tokens=False)["input_ids"]
    comp = [digit + digit + digit, digit + digit + digit]
    r = RolloutBatch([prompt] * 2, comp, [[-2.0] * 3] * 2, ["length"] * 2, ["", ""], 0)
    K, eos = 4, tok.eos_token_id
    ids = np.tile(np.array([eos, digit[0], 0, 1]), (2, 3, 1))
    lps = np.tile(np.log(np.array([0.99, 0.005, 0.003, 0.002], np.float32)), (2, 3, 1))
    scores = TeacherScores(np.full((2, 3), -5.0, np.float32), 1.0, topk_ids_NTK=ids, topk_logprobs_NTK=lps)
    batch = build_train_batch(r, scores, tok.pad_token_id, eos, True, 1.0,
                              seq_weight_N=np.full(2, stop_properly_weight),
                              topk_kl_coef_N=np.ones(2) if remedy else None)
    return batch, prompt, digit


def test_all_truncated_batch_still_trains_under_auto(learner, tiny_zoo):
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    masked, _, _ = _truncated_batch(tok, remedy=False, stop_properly_weight=0.0)
    assert learner.train_step(masked)["optim/grad_norm"] == 0.0  # what used to happen: nothing
    rescued, _, _ = _truncated_batch(tok, remedy=True, stop_properly_weight=0.1)  # what auto plans now
    assert learner.train_step(rescued)["optim/grad_norm"] > 0.0


@pytest.mark.parametrize("remedy", [True, False])
def test_topk_kl_remedy_raises_eos_where_the_teacher_stops(learner, tiny_zoo, remedy):
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    batch, prompt, digit = _truncated_batch(tok, remedy=remedy, stop_properly_weight=0.0)
    before = _eos_logprob(learner, tok, prompt, [])  # right after the question: the student answers
    for _ in range(3):
        learner.train_step(batch)
    after = _eos_logprob(learner, tok, prompt, [])
    if remedy:
        _assert_stops_more(before, after)
    else:  # masked PG alone: no gradient, no change
        assert after == pytest.approx(before, abs=1e-6)


def test_teacher_mixture_rows_teach_stopping(learner, tiny_zoo):
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    prompt, digit = tok("3+4", add_special_tokens=False)["input_ids"], tok("7", add_special_tokens=False)["input_ids"]
    student = RolloutBatch([prompt], [digit * 3], [[-2.0] * 3], ["length"], [""], 0)
    teacher = RolloutBatch([prompt], [[tok.eos_token_id]], [[0.0]], ["stop"], [""], -1)  # it stops at once
    s = TeacherScores(np.full((1, 3), -2.0, np.float32), 1.0)
    rows, scores = with_extra_rows(student, replace(s), teacher)
    batch = build_train_batch(rows, scores, tok.pad_token_id, tok.eos_token_id, np.array([True, False]), 1.0,
                              seq_weight_N=np.zeros(2), sft_weight_N=np.array([0.0, 1.0]))
    before = _eos_logprob(learner, tok, prompt, [])
    for _ in range(3):
        learner.train_step(batch)
    _assert_stops_more(before, _eos_logprob(learner, tok, prompt, []))


# ----------------------------------------------------------------- remedy (c): the anchor
def test_anchor_is_on_only_while_repetition_is():
    m = _monitor(max_new_tokens=16, anchor_coef=0.5)
    loop = [3, 4] * 8
    _, _, plan = m.observe([list(range(5, 21))] * 2, ["length"] * 2, step=1)  # inflation only
    assert plan.topk_kl_coef == 1.0 and plan.anchor_coef == 0.0
    _, _, plan = m.observe([loop] * 2, ["length"] * 2, step=2)  # repetition
    assert plan.anchor_coef == 0.5 and plan.as_metrics()["length/penalty/anchor_coef"] == 0.5


@pytest.fixture()
def anchored(learner_cfg, tiny_zoo):
    """A learner with the anchor, its student pushed away from the start by weight noise."""
    from dataclasses import replace as dc_replace

    from opd.learner import Learner

    cfg = dc_replace(learner_cfg, length=dc_replace(learner_cfg.length, mode="auto",
                                                         remedies=dc_replace(learner_cfg.length.remedies, anchor_coef=1.0)))
    lrn = Learner(str(tiny_zoo.student), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lrn.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lrn


def _kl_to_anchor(lrn, batch) -> float:
    """Brute force: mean over completion tokens of KL(student || anchor), from full forwards."""
    ids = torch.as_tensor(batch.input_ids_BS)
    with torch.no_grad():
        s = torch.log_softmax(lrn.model(input_ids=ids).logits[:, :-1], -1)
        a = torch.log_softmax(lrn.anchor(input_ids=ids).logits[:, :-1], -1)
    kl = (s.exp() * (s - a)).sum(-1)
    mask = torch.as_tensor(batch.loss_mask_BS[:, 1:])
    return float((kl * mask).sum() / mask.sum())


def test_anchor_kl_is_exact_and_pulls_the_student_back(anchored, tiny_zoo):
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    batch, _, _ = _truncated_batch(tok, remedy=False, stop_properly_weight=0.0)  # no other term trains
    batch = replace(batch, anchor_coef=1.0)
    before = _kl_to_anchor(anchored, batch)
    m = anchored.train_step(batch)
    assert before > 1e-3 and m["loss/anchor_kl"] == pytest.approx(before, rel=1e-4)
    for _ in range(2):
        anchored.train_step(batch)
    assert _kl_to_anchor(anchored, batch) < 0.5 * before
    # off in the batch: the same learner takes no step at all
    assert anchored.train_step(replace(batch, anchor_coef=0.0))["optim/grad_norm"] == 0.0


def test_anchor_is_the_start_even_when_the_learner_loads_a_checkpoint(anchored, learner_cfg, tiny_zoo, tmp_path):
    """A resumed (or restarted) learner trains its checkpoint's weights and anchors to the run's
    starting student: its anchor equals the start's weights, not the checkpoint's."""
    from dataclasses import replace as dc_replace

    from opd.learner import Learner

    ckpt = anchored.save_checkpoint(tmp_path / "step-000001", {"step": 1})  # perturbed weights
    cfg = dc_replace(learner_cfg, length=dc_replace(learner_cfg.length, mode="auto",
                                                         remedies=dc_replace(learner_cfg.length.remedies, anchor_coef=1.0)))
    resumed = Learner(ckpt, cfg, start_path=str(tiny_zoo.student))
    for (name, a), s, m in zip(resumed.anchor.state_dict().items(), anchored.anchor.state_dict().values(),
                               resumed.model.state_dict().values()):
        assert torch.equal(a, s), name
    assert any(not torch.equal(a, m) for a, m in zip(resumed.anchor.parameters(), resumed.model.parameters()))


# ------------------------------------------- the learner's chunked path = the logits path
def _scored_batch(V: int, teacher: str, seed: int = 0):
    """Four rollouts of different lengths (right padding), teacher scores (full or top-k),
    remedy weights on some rows and the anchor on."""
    rng = np.random.default_rng(seed)
    lens = [5, 2, 7, 4]
    r = RolloutBatch([[1, 5, 6]] * 4, [list(rng.integers(3, V, n)) for n in lens],
                     [list(rng.normal(-1, 0.3, n)) for n in lens], ["stop"] * 4, [""] * 4, 0)
    logp = rng.normal(0, 2, (4, 7, V))
    logp = (logp - np.log(np.exp(logp).sum(-1, keepdims=True))).astype(np.float32)
    ids = np.argsort(-logp, -1)[..., :5]
    kw = (dict(full_logprobs_NTV=logp) if teacher == "full"
          else dict(topk_ids_NTK=ids, topk_logprobs_NTK=np.take_along_axis(logp, ids, -1)))
    return build_train_batch(r, TeacherScores(rng.normal(-1.5, 0.5, (4, 7)).astype(np.float32), 1.0, **kw),
                             0, 2, True, 1.0, topk_kl_coef_N=np.array([1.0, 0.5, 0.0, 1.0]), anchor_coef=0.7)


def _logits_path(lrn, b, teacher: str):
    """The row terms from full-sequence logits and the logits-level losses, as brute force."""
    lc, V = lrn.loss_cfg, lrn.vocab_size
    ids = torch.as_tensor(b.input_ids_BS)
    logits = lrn.model(input_ids=ids).logits[:, :-1, :V]
    with torch.no_grad():
        ref = lrn.anchor(input_ids=ids).logits[:, :-1, :V]
    mask = torch.as_tensor(b.loss_mask_BS[:, 1:])
    n, w = float(mask.sum()), torch.as_tensor(b.topk_kl_coef_B)[:, None]
    if teacher == "full":
        t = torch.as_tensor(b.teacher_full_logprobs_BSV[:, 1:])
        jsd = [reference.generalized_jsd(logits, t, m, beta=beta, temperature=lc.jsd_temperature, normalizer=n)[0]
               for m, beta in ((mask, lc.jsd_beta), (mask * w, 0.0))]
    else:
        t_lp, t_ids = (torch.as_tensor(a[:, 1:]) for a in (b.teacher_topk_logprobs_BSK, b.teacher_topk_ids_BSK))
        jsd = [reference.generalized_jsd_topk(logits, t_lp, t_ids, m, beta=beta, temperature=lc.jsd_temperature,
                                              tail_bucket=lc.tail_bucket, normalizer=n)[0]
               for m, beta in ((mask, lc.jsd_beta), (mask * w, 0.0))]
    anchor = reference.generalized_jsd(logits, ref, mask, beta=1.0, normalizer=n)[0]
    return lc.distill_coef * jsd[0] + jsd[1] + b.anchor_coef * anchor, [t.item() for t in (*jsd, anchor)]


@pytest.mark.parametrize("teacher", ["full", "topk"])
def test_learner_terms_equal_the_logits_path(anchored, tiny_zoo, teacher):
    """Distillation (GKD at beta 0.3, jsd_temperature 1.5 != the sampler's 1.0), the top-k
    remedy and the anchor, from hidden states in chunks over the trained tokens only = from
    full [B, S, V] logits with the logits-level losses: values, and every weight's gradient."""
    lrn = anchored
    lrn.loss_cfg = replace(lrn.loss_cfg, distill="jsd", jsd_beta=0.3, jsd_temperature=1.5)
    b = _scored_batch(lrn.vocab_size, teacher)
    total, values = _logits_path(lrn, b, teacher)
    grads = torch.autograd.grad(total, list(lrn.model.parameters()), allow_unused=True)
    m = lrn.train_step(b)  # the gradients stay on the parameters after the step
    got = [m["loss/jsd" if teacher == "full" else "loss/jsd_topk"], m["loss/topk_kl"], m["loss/anchor_kl"]]
    assert got == pytest.approx(values, rel=1e-5)
    for (name, p), g in zip(lrn.model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g, rtol=1e-4, atol=1e-6,
                                   msg=name)
