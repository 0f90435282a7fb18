"""Batch assembly (positions, masks, stop-properly weights), SMPO pairs, the order of rollouts
merged from several workers, micro-batch invariance of a learner step, and the weight
update's round trip through numpy."""

import numpy as np
import pytest
import torch

from opd.data_parallel import merge_rollouts
from opd.batch import build_pairs, build_train_batch, rollout_scores
from opd.types import PromptBatch, RolloutBatch, TeacherScores, WeightUpdate


def _rollouts():
    return RolloutBatch(prompt_ids=[[1, 5, 6], [1, 5]], completion_ids=[[7, 8, 2], [9]],
                        sampler_logprobs=[[-0.1, -0.2, -0.3], [-0.4]], finish_reasons=["stop", "length"],
                        texts=["x", "y"], weight_version=3)


def test_train_batch_places_tokens_and_keeps_eos_trained():
    r = _rollouts()
    scores = TeacherScores(logprobs_NT=np.array([[-1, -2, -3], [-4, 0, 0]], np.float32), temperature=1.0)
    b = build_train_batch(r, scores, pad_id=0, eos_id=2, on_policy=True, temperature=1.0,
                          seq_weight_N=np.array([1.0, 0.0]), seq_advantage_N=np.array([0.0, -1.0]))
    np.testing.assert_array_equal(b.input_ids_BS, [[1, 5, 6, 7, 8, 2], [1, 5, 9, 0, 0, 0]])
    # completion tokens are targets (the EOS id 2 included), prompt and padding are not;
    # the truncated row's tokens stay in the token mask: stop-properly acts through seq_weight
    np.testing.assert_array_equal(b.loss_mask_BS, [[0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b.seq_weight_B, [1, 0])
    np.testing.assert_allclose(b.sampler_logprobs_BS[0, 3:], [-0.1, -0.2, -0.3])
    np.testing.assert_allclose(b.teacher_logprobs_BS[1], [0, 0, -4, 0, 0, 0])
    np.testing.assert_allclose(b.seq_advantage_B, [0, -1])
    assert b.num_tokens == 4


def test_pairs_best_vs_worst_with_gap_threshold_and_badness():
    score = np.array([0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.4, 0.3], np.float32)  # G = 2, 4 prompts
    p = build_pairs(score, G=2, min_gap=0.05)
    np.testing.assert_array_equal(p.chosen_rows, [0, 5, 6])
    np.testing.assert_array_equal(p.rejected_rows, [1, 4, 7])
    assert p.skipped == 1  # prompt 1: equal scores
    # with G = 4 and badness, the rejected is the lowest-scoring among the worst-badness rows
    assert build_pairs(score, G=4, min_gap=0.0).rejected_rows.tolist() == [1, 4]
    bad = np.array([0, 0, 0, 1, 0, 0, 0, 0])  # row 3 truncated/repetitive: rejected although 0.5 > 0.1
    p = build_pairs(score, G=4, min_gap=0.0, badness_N=bad)
    assert p.chosen_rows.tolist() == [0, 5] and p.rejected_rows.tolist() == [3, 4]


def test_checker_scores_use_the_prompt_answer():
    r = RolloutBatch([[1]] * 4, [[3]] * 4, [[0.0]] * 4, ["stop"] * 4, ["12", " 12 ", "13", "7"], 0)
    exact = PromptBatch([[1], [1]], ["12", "7"], ["a", "b"])
    np.testing.assert_array_equal(rollout_scores(r, None, exact, 2, "checker"), [1, 1, 0, 1])
    # extraction by prompt: the last number of "it is 7." is 7; exact match of it fails
    r2 = RolloutBatch([[1]] * 4, [[3]] * 4, [[0.0]] * 4, ["stop"] * 4, ["12", "=12", "it is 7.", "7"], 0)
    mixed = PromptBatch([[1], [1]], ["12", "7"], ["a", "b"], ["exact", "last_number"])
    np.testing.assert_array_equal(rollout_scores(r2, None, mixed, 2, "checker"), [1, 0, 1, 1])


def test_merge_rollouts_restores_prompt_order():
    W, G, P = 2, 2, 5
    parts = []
    for w in range(W):
        prompts = list(range(w, P, W))
        rows = [(p, g) for p in prompts for g in range(G)]
        parts.append(RolloutBatch([[p] for p, _ in rows], [[p * 10 + g] for p, g in rows], [[0.0]] * len(rows),
                                  ["stop"] * len(rows), [""] * len(rows), 0))
    merged = merge_rollouts(parts, [3, 2], W, G)
    assert [c[0] for c in merged.completion_ids] == [p * 10 + g for p in range(P) for g in range(G)]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def _random_batch(V, seq_weight):
    rng = np.random.default_rng(0)
    B = len(seq_weight)
    ids = rng.integers(3, 40, size=(B, 9))
    return build_train_batch(
        RolloutBatch([list(r[:4]) for r in ids], [list(r[4: 4 + 1 + b % 5]) for b, r in enumerate(ids)],
                     [list(rng.normal(-1, 0.3, 1 + b % 5)) for b in range(B)], ["stop"] * B, [""] * B, 0),
        TeacherScores(rng.normal(-1.5, 0.5, (B, 5)).astype(np.float32), 1.0,
                      full_logprobs_NTV=_log_softmax(rng.normal(0, 2, (B, 5, V)))), 0, 2, True, 1.0,
        seq_weight_N=np.asarray(seq_weight, np.float32))


def _learner(tiny_cfg, tiny_zoo, **loss):
    from dataclasses import replace

    from opd.learner import Learner

    cfg = replace(tiny_cfg, optim=replace(tiny_cfg.optim, micro_batch_size=loss.pop("mb", 64)),
                  loss=replace(tiny_cfg.loss, **loss))
    return Learner(str(tiny_zoo.student), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("distill", ["reverse_kl_pg", "jsd"])
def test_micro_batch_split_does_not_change_the_step(tiny_cfg, tiny_zoo, distill):
    from opd.zoo import load_tokenizer

    batch = _random_batch(len(load_tokenizer(tiny_zoo.student)), [1, 0, 1, 0.1, 1, 1])
    out = {mb: _learner(tiny_cfg, tiny_zoo, distill=distill, mb=mb).train_step(batch) for mb in (1, 4, 6)}
    for mb in (1, 4):
        assert out[mb]["optim/grad_norm"] == pytest.approx(out[6]["optim/grad_norm"], rel=1e-5)
        for key in ("loss/rows_total", "loss/pg" if distill == "reverse_kl_pg" else "loss/jsd"):
            assert out[mb][key] == pytest.approx(out[6][key], rel=1e-5), key


@pytest.mark.slow
def test_stop_properly_weights_silence_only_the_policy_gradient(tiny_cfg, tiny_zoo):
    """Rows weighted 0 (truncated, mask mode) give no PG gradient; GKD still learns from them."""
    from opd.zoo import load_tokenizer

    V = len(load_tokenizer(tiny_zoo.student))
    silenced = _random_batch(V, [0] * 6)
    assert _learner(tiny_cfg, tiny_zoo, distill="reverse_kl_pg").train_step(silenced)["optim/grad_norm"] == 0
    assert _learner(tiny_cfg, tiny_zoo, distill="jsd").train_step(silenced)["optim/grad_norm"] > 0
    full = _learner(tiny_cfg, tiny_zoo, distill="reverse_kl_pg").train_step(_random_batch(V, [1] * 6))
    assert full["optim/grad_norm"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_update_round_trip_shares_memory(dtype):
    """Weights travel as numpy arrays (bf16 as its bits) and come back bit-exact, as views."""
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(3, 4, generator=g).to(dtype), "b.bias": torch.randn(5, generator=g).to(dtype)}
    up = WeightUpdate.from_tensors(7, sd)
    assert up.version == 7 and up.dtype == str(dtype).removeprefix("torch.")
    assert up.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    back = dict(up.tensors())
    for k, t in sd.items():
        assert back[k].dtype == dtype and torch.equal(back[k], t)
        assert back[k].data_ptr() == up.arrays[k].ctypes.data  # no copy on the way back
    with pytest.raises(ValueError, match="one dtype"):
        WeightUpdate.from_tensors(0, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)})


def test_weight_update_joins_dim0_shards_in_rank_order():
    """A sharded learner's ranks' parts (torch.chunk along dim 0, as FSDP2 lays them out, an
    empty last part included) join into the whole update, bf16 bits too."""
    g = torch.Generator().manual_seed(0)
    whole = {"w": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b": torch.randn(2, generator=g).to(torch.bfloat16)}
    parts = [WeightUpdate.from_tensors(4, {k: v.chunk(3)[r] if r < len(v.chunk(3)) else v[:0] for k, v in whole.items()})
             for r in range(3)]
    joined = WeightUpdate.join(parts)
    assert joined.version == 4 and joined.dtype == "bfloat16"
    assert {k: torch.equal(t, whole[k]) for k, t in joined.tensors()} == {"w": True, "b": True}
    assert WeightUpdate.join(parts[:1]) is parts[0]
