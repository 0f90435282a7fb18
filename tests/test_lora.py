"""LoRA students (student.lora.enabled): only the adapters train, the engines get the merged
weights or the adapter alone and then sample what the learner computes, the anchor is the base with the adapters
off, and checkpoints hold a peft adapter and a merged model that resume exactly and load in
peft, transformers and vLLM.

The learner trains the tiny zoo student on fixed random batches (`tests.test_batch`); its
adapters' B starts at zero, so the first step moves B only and later steps A as well.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from opd.batch import build_train_batch
from opd.learner import Learner, lora
from tests.test_batch import _random_batch
from tests.test_sync import _hf_greedy, _prompts, _settings

pytestmark = pytest.mark.slow


def _cfg(tiny_cfg, anchor=False, **lora_kw):
    """The tiny config with LoRA on (rank 4 on every projection), lr high enough to move the
    adapters visibly; `anchor`: the length remedies' divergence anchor kept."""
    student = replace(tiny_cfg.student, lora=replace(tiny_cfg.student.lora, enabled=True, r=4, alpha=8, **lora_kw))
    length = replace(tiny_cfg.length, mode="auto",
                     remedies=replace(tiny_cfg.length.remedies, anchor_coef=0.1 if anchor else 0.0))
    return replace(tiny_cfg, student=student, length=length, optim=replace(tiny_cfg.optim, lr=1e-2))


def _batches(learner, n):
    V = len(learner.tokenizer)
    b = _random_batch(V, [1, 0, 1, 0.1, 1, 1, 1])
    return [replace(b, input_ids_BS=np.roll(b.input_ids_BS, i, axis=0)) for i in range(n)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_adapters_train(tiny_cfg, tiny_zoo):
    learner = Learner(str(tiny_zoo.student), _cfg(tiny_cfg))
    before = _state(learner.model)
    for b in _batches(learner, 2):
        learner.train_step(b)
    after = _state(learner.model)
    adapters = [k for k in before if ".lora_" in k]
    assert adapters and all(".lora_" in k or torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(before[k], after[k]) for k in adapters)  # B after step 1, A after step 2
    counts = learner.where()
    assert 0 < counts["trainable_params"] == sum(before[k].numel() for k in adapters) < counts["total_params"]
    assert {id(p) for p in learner.opt.state} == {id(p) for p in learner.model.parameters() if p.requires_grad}


def test_anchor_is_the_base_with_adapters_off(tiny_cfg, tiny_zoo):
    """KL(student || anchor) from the disabled adapters equals the KL to a separate frozen
    copy of the starting student, once the adapters have moved the student away from it."""
    from opd.learner.forward import StudentForward
    from opd.learner.shard import Whole

    learner = Learner(str(tiny_zoo.student), _cfg(tiny_cfg, anchor=True))
    assert learner.anchor is None  # no second copy of the student
    batches = _batches(learner, 3)
    for b in batches[:2]:
        learner.train_step(replace(b, anchor_coef=0.1))
    rows = np.arange(len(batches[2].input_ids_BS))
    frozen = StudentForward(learner.whole, Whole(learner._frozen(str(tiny_zoo.student))), "cpu", False,
                            learner.vocab_size)
    with torch.no_grad():
        via_base = learner.forward(batches[2], rows, anchor=True).anchor_N
        via_copy = frozen(batches[2], rows, anchor=True).anchor_N
    assert float(via_copy.abs().max()) > 1e-4  # the adapters did move the student
    torch.testing.assert_close(via_base, via_copy, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_engine_samples_what_the_lora_learner_computes(tiny_cfg, tiny_zoo, engine_pool, sync):
    """Either sync (the merged weights, or the adapter alone on the engine's base): after
    one and after three steps, the engine's sampled log-probs equal the LoRA learner's
    recomputed ones; before the sync they differ."""
    learner = Learner(str(tiny_zoo.student), _cfg(tiny_cfg, sync=sync))
    student_engine = engine_pool.acquire(tiny_zoo.student, tiny_cfg.rollout, lora_rank=4 if sync == "adapter" else 0)
    tok = learner.tokenizer
    prompts = _prompts(tiny_cfg, tok)
    batches = iter(_batches(learner, 3))
    for steps in (1, 2):  # 1, then 3 steps in all
        for _ in range(steps):
            learner.train_step(next(batches))
        stale = build_train_batch(student_engine.generate(prompts, _settings()), None, tok.pad_token_id,
                                  tok.eos_token_id, True, 1.0)
        m = stale.loss_mask_BS > 0
        assert np.abs(learner.logprobs(stale) - stale.sampler_logprobs_BS)[m].max() > 1e-2
        assert student_engine.load_weights(learner.export_weights()) == learner.step
        fresh = build_train_batch(student_engine.generate(prompts, _settings()), None, tok.pad_token_id,
                                  tok.eos_token_id, True, 1.0)
        m = fresh.loss_mask_BS > 0
        assert np.abs(learner.logprobs(fresh) - fresh.sampler_logprobs_BS)[m].max() <= 1e-3


def _trained_checkpoint(tiny_cfg, tiny_zoo, tmp_path, cfg):
    learner = Learner(str(tiny_zoo.student), cfg)
    batches = _batches(learner, 3)
    for b in batches[:2]:
        learner.train_step(b)
    return learner, batches, Path(learner.save_checkpoint(tmp_path / "step-2", {"cursor": 2}))


def test_checkpoint_resumes_exactly(tiny_cfg, tiny_zoo, tmp_path):
    """A LoRA learner resumed from its checkpoint (the base from the start, the adapter from
    the checkpoint) takes the next step exactly as the uninterrupted one: every weight and
    every AdamW moment bit-identical."""
    cfg = _cfg(tiny_cfg)
    learner, batches, ckpt = _trained_checkpoint(tiny_cfg, tiny_zoo, tmp_path, cfg)
    resumed = Learner(str(ckpt), cfg, start_path=str(tiny_zoo.student))
    assert resumed.load_checkpoint(ckpt) == {"cursor": 2} and resumed.step == 2
    learner.train_step(batches[2])
    resumed.train_step(batches[2])
    a, b = _state(learner.model), _state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moments = [(learner.opt.state[p], resumed.opt.state[q])
               for p, q in zip(learner.model.parameters(), resumed.model.parameters()) if p.requires_grad]
    assert moments and all(torch.equal(x[k], y[k]) for x, y in moments for k in x)


def test_checkpoint_loads_in_peft_transformers_and_vllm(tiny_cfg, tiny_zoo, tmp_path, engine_pool):
    """The adapter loads with `PeftModel.from_pretrained` and computes the learner's logits;
    the merged model loads in transformers with the same logits, and in vLLM (the session's
    engine for this config, given the checkpoint's model.safetensors), which then decodes
    greedily what transformers decodes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner, _, ckpt = _trained_checkpoint(tiny_cfg, tiny_zoo, tmp_path, _cfg(tiny_cfg))
    ids = torch.as_tensor(_batches(learner, 1)[0].input_ids_BS)
    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    peft_model = PeftModel.from_pretrained(load(tiny_zoo.student), str(ckpt / lora.ADAPTER_DIR)).eval()
    merged = load(ckpt)
    with torch.no_grad():
        want = learner.model.eval()(input_ids=ids).logits
        assert float((want - load(tiny_zoo.student)(input_ids=ids).logits).abs().max()) > 1e-3
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    prompts = _prompts(tiny_cfg, learner.tokenizer)
    hf = _hf_greedy(merged, learner.tokenizer, prompts.prompt_ids, 8)
    assert engine_pool.acquire(ckpt, tiny_cfg.rollout).greedy(prompts.prompt_ids, 8) == hf
    start = engine_pool.acquire(tiny_zoo.student, tiny_cfg.rollout).greedy(prompts.prompt_ids, 8)
    assert start != hf  # the training changed what is decoded


def test_bad_target_modules_are_refused_by_key(tiny_cfg, tiny_zoo):
    cfg = _cfg(tiny_cfg, target_modules=["q_proj", "qkv"])
    why = lora.check_targets(str(tiny_zoo.student), cfg.student)
    assert why.startswith("student.lora.target_modules: ['qkv'] match no linear layer")
    assert "'q_proj'" in why and "'down_proj'" in why  # the names that exist
    with pytest.raises(ValueError, match="student.lora.target_modules"):
        Learner(str(tiny_zoo.student), cfg)
    assert lora.check_targets(str(tiny_zoo.student), _cfg(tiny_cfg).student) is None
    tied = lora.check_targets(str(tiny_zoo.student), _cfg(tiny_cfg, trainable_modules=["lm_head"]).student)
    assert tied.startswith("student.lora.trainable_modules: ['lm_head'] share one matrix")
