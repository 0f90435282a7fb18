"""Weight sync, sampler/learner log-prob agreement, teacher backends and the tokenizer check.

One vLLM engine on the tiny student (in-process class, no Ray) and one learner on the same
weights: after the learner's weights change and are synced, the engine must sample from
exactly the learner's distribution (fp32, <= 1e-3) and decode what the learner decodes.
That engine takes the weights as safetensors bytes; the Ray actors' path (numpy arrays by
reference from the object store, reloaded in place) has a test of its own, with Ray.
"""

import json
import gc

import numpy as np
import pytest
import torch

from opd.batch import build_train_batch
from opd.learner import Learner
from opd.tasks import build_task, prompt_batch
from opd.teacher import TeacherScorer, TokenizerMismatch, check_tokenizers
from opd.types import SamplingSettings
from opd.zoo import build_tokenizer, load_tokenizer

pytestmark = pytest.mark.slow


def _prompts(cfg, tok, n=6):
    task = build_task("addition", cfg.task.seed, 100, n, cfg.task.max_digits)
    exs = task.heldout()
    return prompt_batch(tok, exs)


def _settings(n=2, seed=7, temperature=1.0):
    return SamplingSettings(max_new_tokens=8, temperature=temperature, top_p=1.0, top_k=-1,
                            repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=seed, n=n)


@pytest.fixture
def engine(student_engine):
    return student_engine  # the session's engine, holding the zoo student's weights again


@torch.no_grad()
def _hf_greedy(model, tok, prompt_ids, max_new):
    outs = []
    for p in prompt_ids:
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        outs.append(tok.decode(out[0, len(p):], skip_special_tokens=True))
    return outs


def test_sync_moves_engine_to_learner_weights(tiny_cfg, tiny_zoo, engine):
    learner = Learner(str(tiny_zoo.student), tiny_cfg)
    tok = learner.tokenizer
    prompts = _prompts(tiny_cfg, tok)
    before = engine.generate(prompts, _settings())
    with torch.no_grad():  # move the learner's weights far from the engine's
        g = torch.Generator().manual_seed(0)
        for p in learner.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    learner.step = 5
    mismatch = learner.logprobs(build_train_batch(before, None, tok.pad_token_id, tok.eos_token_id, True, 1.0))
    stale = build_train_batch(before, None, tok.pad_token_id, tok.eos_token_id, True, 1.0)
    assert np.abs(mismatch - stale.sampler_logprobs_BS)[stale.loss_mask_BS > 0].max() > 1e-2

    assert engine.load_weights(learner.export_weights()) == 5
    after = engine.generate(prompts, _settings())
    assert after.weight_version == 5
    batch = build_train_batch(after, None, tok.pad_token_id, tok.eos_token_id, True, 1.0)
    recomputed = learner.logprobs(batch)
    m = batch.loss_mask_BS > 0
    assert np.abs(recomputed - batch.sampler_logprobs_BS)[m].max() <= 1e-3
    # greedy decoding of the engine now equals the learner's own greedy decoding
    hf = _hf_greedy(learner.model.eval(), tok, prompts.prompt_ids, 8)
    assert engine.greedy(prompts.prompt_ids, 8) == hf


def test_sampler_logprobs_follow_temperature(tiny_cfg, tiny_zoo, engine):
    """processed log-probs: the distribution actually sampled from (logits / T)."""
    learner = Learner(str(tiny_zoo.student), tiny_cfg)
    engine.load_weights(learner.export_weights())
    tok = learner.tokenizer
    out = engine.generate(_prompts(tiny_cfg, tok), _settings(temperature=2.0))
    batch = build_train_batch(out, None, tok.pad_token_id, tok.eos_token_id, True, 2.0)
    m = batch.loss_mask_BS > 0
    assert np.abs(learner.logprobs(batch) - batch.sampler_logprobs_BS)[m].max() <= 1e-3


def test_teacher_backends_agree(tiny_cfg, tiny_zoo, engine):
    from dataclasses import replace

    tok = load_tokenizer(tiny_zoo.student)
    rollouts = engine.generate(_prompts(tiny_cfg, tok), _settings())
    full = TeacherScorer(str(tiny_zoo.teacher), replace(tiny_cfg.teacher, logprobs="full", chunk_size=5), tiny_cfg.rollout)
    topk = TeacherScorer(str(tiny_zoo.teacher), replace(tiny_cfg.teacher, logprobs="topk", topk=4), tiny_cfg.rollout)
    s_full, s_topk = full.score(rollouts), topk.score(rollouts)
    assert s_full.topk_ids_NTK is None and s_topk.full_logprobs_NTV is None  # only what the mode asks
    for n, comp in enumerate(rollouts.completion_ids):
        for t, tokid in enumerate(comp):
            row = s_full.full_logprobs_NTV[n, t]
            assert abs(row[tokid] - s_full.logprobs_NT[n, t]) < 1e-6
            assert abs(np.exp(row).sum() - 1) < 1e-4
            np.testing.assert_allclose(np.sort(row)[::-1][:4], s_topk.topk_logprobs_NTK[n, t], atol=1e-5)
    vll = TeacherScorer(str(tiny_zoo.teacher), replace(tiny_cfg.teacher, backend="vllm", logprobs="topk", topk=4),
                        tiny_cfg.rollout)
    s_v = vll.score(rollouts)
    for n, comp in enumerate(rollouts.completion_ids):
        n_tok = len(comp)
        np.testing.assert_allclose(s_v.logprobs_NT[n, :n_tok], s_full.logprobs_NT[n, :n_tok], atol=1e-4)
        np.testing.assert_allclose(s_v.topk_logprobs_NTK[n, :n_tok], s_topk.topk_logprobs_NTK[n, :n_tok],
                                   atol=1e-4)
    del vll
    gc.collect()


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_zoo):
    student = load_tokenizer(tiny_zoo.student)
    assert "tokenizers match" in check_tokenizers(student, load_tokenizer(tiny_zoo.teacher))
    build_tokenizer(tmp_path / "other", alphabet="0123456789+")
    with pytest.raises(TokenizerMismatch, match="vocabulary sizes"):
        check_tokenizers(student, load_tokenizer(tmp_path / "other"))
    other = load_tokenizer(tiny_zoo.teacher)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(TokenizerMismatch, match="chat templates"):
        check_tokenizers(student, other)
    note = check_tokenizers(student, load_tokenizer(tiny_zoo.teacher), len(student), len(student) + 6)
    assert "padding" in note
    with pytest.raises(TokenizerMismatch, match="fewer rows"):
        check_tokenizers(student, load_tokenizer(tiny_zoo.teacher), len(student) - 1, len(student))


def test_start_up_checks_embedding_rows(tmp_path, tiny_zoo):
    """The launch's pair check reads each model's embedding rows from its config: rows that
    differ only by padding past the tokenizer are tolerated and said; fewer rows are refused."""
    import shutil

    from opd.teacher import check_pair

    def with_rows(name: str, rows: int) -> str:
        dst = tmp_path / name
        shutil.copytree(tiny_zoo.teacher, dst)
        conf = json.loads((dst / "config.json").read_text())
        conf["vocab_size"] = rows
        (dst / "config.json").write_text(json.dumps(conf))
        return str(dst)

    n = len(load_tokenizer(tiny_zoo.student))
    tok, note = check_pair(str(tiny_zoo.student), with_rows("padded", n + 64))
    assert len(tok) == n and f"student {n}, teacher {n + 64}" in note
    with pytest.raises(TokenizerMismatch, match="fewer rows"):
        check_pair(with_rows("short", n - 1), str(tiny_zoo.teacher))


def test_ray_sync_reloads_numpy_weights_by_reference(tiny_overrides, tiny_zoo, tmp_path):
    """The sync the Ray actors use (`Workers.sync` with resources.use_ray=true): the learner
    actor's exported numpy arrays stay in Ray's object store, the rollout worker actor gets
    their reference and its in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) reloads
    them in place. The session's engines take safetensors bytes instead (their engine core is
    a process of its own), so only this test covers this path. Before the sync the engine's
    log-probs are the old weights' (they differ from the trained learner's); after it they
    equal the learner's forward (fp32, <= 1e-3)."""
    import ray

    from opd.actors import Workers, start_ray
    from opd.config import load_config

    cfg = load_config(tiny_overrides + [f"run_dir={tmp_path}", "resources.use_ray=true", "optim.lr=0.01",
                                        "optim.warmup_steps=0"])
    started, workers = start_ray(cfg.resources), None
    try:
        workers = Workers(cfg, str(tiny_zoo.student), str(tiny_zoo.teacher))
        tok = load_tokenizer(tiny_zoo.student)
        prompts = _prompts(cfg, tok)
        old = workers.generate(prompts, _settings())
        batch = build_train_batch(old, workers.score(old), tok.pad_token_id, tok.eos_token_id, True, 1.0)
        workers.train(batch)  # the learner is at step 1, the engine still at version 0
        m = batch.loss_mask_BS > 0
        assert np.abs(workers.student_logprobs(batch) - batch.sampler_logprobs_BS)[m].max() > 1e-2

        (update,), versions = workers.sync()
        assert versions == [1] and update.version == 1
        # read in place from the object store: the arrays are Ray's shared, read-only memory
        assert update.arrays and not any(a.flags.writeable for a in update.arrays.values())
        new = workers.generate(prompts, _settings())
        assert new.weight_version == 1
        synced = build_train_batch(new, None, tok.pad_token_id, tok.eos_token_id, True, 1.0)
        m = synced.loss_mask_BS > 0
        assert np.abs(workers.student_logprobs(synced) - synced.sampler_logprobs_BS)[m].max() <= 1e-3
    finally:
        if workers is not None:
            workers.shutdown()
        if started:
            ray.shutdown()
