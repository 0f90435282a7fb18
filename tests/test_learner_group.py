"""A sharded learner (resources.learner_workers=2: two Ray actors, one gloo process group,
the student in FSDP2 shards) takes the step one learner takes on the same batch, holds about
half of the bytes, syncs the whole weights, and checkpoints in a form either size resumes.

The reference is the plain learner (N = 1) in this process, on the same weights and batches.
Batches are fixed (no sampling), so any difference comes from the split across ranks: only
float summation order may differ.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from opd.actors import Workers, _make, start_ray
from opd.learner import Learner
from opd.types import PairBatch, WeightUpdate
from tests.test_batch import _random_batch

pytestmark = pytest.mark.slow

RTOL = 1e-5
BF16_RTOL = 5e-2


@pytest.fixture(scope="module")
def ray_local(tiny_cfg):
    import ray

    started = start_ray(tiny_cfg.resources)
    yield
    if started:
        ray.shutdown()


def _cfg(tiny_cfg, n, lora=False, dtype="float32", checkpointing=False, **loss):
    """The tiny config with `n` learner ranks and these loss settings (the anchor kept);
    `lora`: a rank-4 LoRA student; `dtype`: the student's compute dtype; `checkpointing`:
    activation checkpointing of the decoder layers."""
    length = replace(tiny_cfg.length, mode="auto", remedies=replace(tiny_cfg.length.remedies, anchor_coef=0.1))
    student = replace(tiny_cfg.student, dtype=dtype,
                      lora=replace(tiny_cfg.student.lora, enabled=lora, r=4, alpha=8))
    return replace(tiny_cfg, loss=replace(tiny_cfg.loss, **loss), length=length, student=student,
                   optim=replace(tiny_cfg.optim, micro_batch_size=2, lr=3e-3, gradient_checkpointing=checkpointing),
                   resources=replace(tiny_cfg.resources, learner_workers=n, use_ray=True, learner_num_cpus=0.5))


def _group(cfg, model_path, start_path=None):
    """The driver's handle on a learner group alone (no engines, no teacher), on the weights
    at `model_path`; `start_path`: the anchor's (default the same)."""
    w = Workers.__new__(Workers)
    w.cfg, w.use_ray, w.timeout, w.max_restarts = cfg, True, 300.0, 0
    w.restarts, w.events, w.rollouts = 0, [], []
    w.start_path = start_path or model_path
    from opd.learner_group import placement, rank_names

    N = cfg.resources.learner_workers
    w.placement, opts = placement(cfg, 300)
    w.learners = [_make(Learner, name, True, 0.5, 0, {"OMP_NUM_THREADS": "1"}, model_path, cfg, w.start_path, i, N,
                        opts=opts and opts[i]) for i, name in enumerate(rank_names(N))]
    w.gather([(a, "ready") for a in w.learners], 300)
    w._join_learners()
    return w


def _close(w):
    from opd.learner_group import release

    for a in w.learners:
        a.kill()
    release(w.placement)


def _batches(V, kind):
    """Three fixed batches of a kind: student rollouts (PG / JSD, remedies, the anchor),
    teacher completions (SFT only, as loss=seqkd trains), or rollouts with SMPO pairs."""
    out = []
    for step in range(3):
        b = _random_batch(V, [1, 0, 1, 0.1, 1, 1, 1])
        rng = np.random.default_rng(step)
        b = replace(b, input_ids_BS=np.roll(b.input_ids_BS, step, axis=0), anchor_coef=0.1,
                    topk_kl_coef_B=rng.uniform(0, 1, 7).astype(np.float32))
        if kind == "sft":
            b = replace(b, on_policy_B=np.zeros(7, bool), sft_weight_B=np.ones(7, np.float32), anchor_coef=0.0,
                        topk_kl_coef_B=None)
        if kind == "pairs":
            b = replace(b, pairs=PairBatch(np.array([0, 2, 4]), np.array([1, 3, 5]), np.ones(3, np.float32), 0))
        out.append(b)
    return out


def _weights(update):
    return {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in update.arrays.items()}


def _rel(a, b):
    """The largest relative difference of a tensor, over every tensor but the attention's
    key biases: their gradient is zero in exact arithmetic (a shift of every key's logit
    cancels in the softmax), so AdamW turns rounding noise there into full-size steps of
    either sign, in one rank as in two."""
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b if not k.endswith("k_proj.bias"))


@pytest.mark.parametrize("kinds,loss", [
    (("sft", "rollouts"), dict(distill="jsd")),  # loss=seqkd's rows, then loss=gkd's with the
    #                                              top-k KL remedy and the anchor
    (("rollouts",), dict(distill="reverse_kl_pg")),  # loss=opd, the same
    (("pairs",), dict(distill="reverse_kl_pg", smpo_coef=1.0)),  # SMPO pairs, never split
    (("rollouts",), dict(distill="jsd", lora=True)),  # a LoRA student; its anchor: the adapters off
    (("rollouts",), dict(distill="jsd", dtype="bfloat16")),  # bf16 compute: FSDP2's bf16 gathers
    #                                                          against one rank's autocast
    (("rollouts",), dict(distill="jsd", checkpointing=True)),  # recomputed layers inside FSDP2's units
])
def test_two_ranks_take_the_step_one_rank_takes(ray_local, tiny_cfg, tiny_zoo, kinds, loss):
    one = Learner(str(tiny_zoo.student), _cfg(tiny_cfg, 1, **loss))
    two = _group(_cfg(tiny_cfg, 2, **loss), str(tiny_zoo.student))
    # bf16: the two compute in bf16 in different places (FSDP2 casts every gathered weight,
    # autocast only the matmuls' inputs), so they agree to bf16 rounding, not to fp32's
    rtol = BF16_RTOL if loss.get("dtype") == "bfloat16" else RTOL
    try:
        for step, b in enumerate(b for kind in kinds for b in _batches(len(one.tokenizer), kind)):
            a, m = one.train_step(b), two.train(b)
            for key in ("loss/rows_total", "loss/pairs_total", "optim/grad_norm", "learner/tokens"):
                if key in a:
                    assert m[key] == pytest.approx(a[key], rel=rtol, abs=1e-7), (step, key)
        gathered = _weights(two._on_ranks("export_weights")[0])
        assert _rel(gathered, _weights(one.export_weights())) < rtol
        joined = _weights(WeightUpdate.join(two._on_ranks("export_shards")))  # merged from shards, for LoRA
        assert joined.keys() == gathered.keys() and all(torch.equal(joined[k], gathered[k]) for k in joined)
        if one.peft:  # the adapters themselves (merged weights hide their differences in W's norm)
            assert _rel(_adapters(two), _adapters(one)) < RTOL
        ranks = two.learner_ranks
        assert [r["rank"] for r in ranks] == [0, 1]
    finally:
        _close(two)


def _adapters(learner):
    """A LoRA learner's adapter as student.lora.sync=adapter sends it, or a group's (each
    rank joins the gather, rank 0 sends it)."""
    import ray

    def get(self):
        return self._adapter_for_sync("float32")

    if isinstance(learner, Learner):
        return get(learner)
    return ray.get([a.handle.__ray_call__.remote(get) for a in learner.learners])[0]


def _total_bytes(where):
    return where["param_bytes"] + where["grad_bytes"] + where["optimizer_bytes"]


def test_each_rank_holds_half_and_checkpoints_resume_across_sizes(ray_local, tiny_cfg, tiny_zoo, tmp_path):
    """One step on each size, a checkpoint, a second step. Each of two ranks holds about half
    the parameter + gradient + AdamW bytes of one learner. A checkpoint written by two ranks
    resumes on one and one written by one resumes on two: the weights after the resumed step
    equal the uninterrupted run's (so lost AdamW moments would show)."""
    from opd.learner import shard

    cfg1, cfg2 = _cfg(tiny_cfg, 1, distill="jsd"), _cfg(tiny_cfg, 2, distill="jsd")
    b0, b1, _ = _batches(len(Learner(str(tiny_zoo.student), cfg1).tokenizer), "rollouts")
    one = Learner(str(tiny_zoo.student), cfg1)
    one.train_step(b0)
    whole = _total_bytes(shard.local_bytes(one.model, one.opt))
    one.save_checkpoint(tmp_path / "one", {})
    one.train_step(b1)
    reference = _weights(one.export_weights())

    two = _group(cfg2, str(tiny_zoo.student))
    try:
        two.train(b0)
        per_rank = [_total_bytes(r) for r in two._on_ranks("where")]
        print(f"bytes: one learner {whole}, per rank of two {per_rank}")
        # each rank: half of every tensor, and its own copy of AdamW's scalar step counts
        assert all(abs(b / whole - 0.5) < 0.01 for b in per_rank), (whole, per_rank)
        two._on_ranks("save_checkpoint", [(str(tmp_path / "two"), {})] * 2)
    finally:
        _close(two)
    resumed_one = Learner(str(tmp_path / "two"), cfg1, str(tiny_zoo.student))
    resumed_one.load_checkpoint(tmp_path / "two")
    resumed_one.train_step(b1)
    assert _rel(_weights(resumed_one.export_weights()), reference) < RTOL  # two ranks -> one

    resumed_two = _group(cfg2, str(tmp_path / "one"), str(tiny_zoo.student))
    try:
        resumed_two._on_ranks("load_checkpoint", [(str(tmp_path / "one"),)] * 2)
        resumed_two.train(b1)
        assert _rel(_weights(resumed_two._on_ranks("export_weights")[0]), reference) < RTOL  # one -> two
    finally:
        _close(resumed_two)


def test_engine_synced_from_two_ranks_decodes_and_scores_as_the_gathered_student(
        ray_local, tiny_cfg, tiny_zoo, student_engine):
    """After a step on two ranks, the engine loaded with the two ranks' shards decodes
    greedily what the student gathered on rank 0 decodes, and its log-probs equal the two
    ranks' sharded recomputation of them (within 1e-3)."""
    from transformers import AutoModelForCausalLM

    from opd.batch import build_train_batch
    from tests.test_sync import _hf_greedy, _prompts, _settings

    cfg = _cfg(tiny_cfg, 2, distill="jsd", )
    two = _group(replace(cfg, optim=replace(cfg.optim, lr=3e-2)), str(tiny_zoo.student))
    try:
        tok = Learner(str(tiny_zoo.student), tiny_cfg).tokenizer
        two.train(_batches(len(tok), "rollouts")[0])
        parts = two._on_ranks("export_shards")  # what Workers.sync sends: each rank's own shards
        assert student_engine.load_weights(*parts) == 1
        update = two._on_ranks("export_weights")[0]  # gathered on rank 0
        prompts = _prompts(tiny_cfg, tok)
        out = student_engine.generate(prompts, _settings(n=1))
        batch = build_train_batch(out, None, tok.pad_token_id, tok.eos_token_id, True, 1.0)
        m = batch.loss_mask_BS > 0
        assert np.abs(two.student_logprobs(batch) - batch.sampler_logprobs_BS)[m].max() <= 1e-3
        gathered = AutoModelForCausalLM.from_pretrained(str(tiny_zoo.student), dtype=torch.float32)
        gathered.load_state_dict(_weights(update), strict=False)  # a tied head reads the embedding
        assert student_engine.greedy(prompts.prompt_ids, 8) == _hf_greedy(gathered.eval(), tok, prompts.prompt_ids, 8)
    finally:
        _close(two)


def test_seqkd_run_on_two_ranks_matches_one(ray_local, tiny_overrides, tiny_zoo, tmp_path):
    """The whole loop (engines, teacher) with loss=seqkd, whose batches are the teacher's own
    completions and so do not depend on the student's sampling: 3 steps on two learner ranks
    (placed, joined, the summary naming both) take the steps one learner takes. The teacher
    samples with top_k=1, its argmax: two runs of the CPU engines at temperature 1 do not sample
    the same completions (even with one learner), and at temperature 0.05 they differed in 1
    run of 3."""
    import json

    from safetensors.torch import load_file

    from opd.config import load_config
    from opd.train import run_training

    base = tiny_overrides + ["loss=seqkd", "steps=3", "length.reference_prompts=4", "eval_every=0",
                             "rollout.prompts_per_step=6", "rollout.samples_per_prompt=1",
                             "checkpoint_every=0", "resources.use_ray=true", "resources.learner_num_cpus=0.25",
                             "optim.micro_batch_size=4", "rollout.top_k=1"]
    runs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    for n, d in runs.items():
        summary = run_training(load_config(base + [f"run_dir={d}", f"resources.learner_workers={n}"]))
        assert [r["rank"] for r in summary["learner_ranks"]] == list(range(n))
    steps = {n: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
             for n, d in runs.items()}
    assert len(steps[1]) == len(steps[2]) == 3
    for a, b in zip(steps[1], steps[2]):
        for key in ("loss/rows_total", "optim/grad_norm", "learner/tokens"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)
    final = {n: load_file(next((d / "checkpoints").glob("step-*")) / "model.safetensors") for n, d in runs.items()}
    assert _rel(final[2], final[1]) < RTOL


def test_a_rank_that_never_joins_the_step_is_named_within_the_timeout(ray_local, tiny_cfg, tiny_zoo):
    """Rank 1 is busy elsewhere (a 60 s call ahead of its step), so rank 0 waits for it in the
    step's first collective: the call fails after resources.remote_timeout_s (here 5 s) with
    an error naming both ranks and the verb, not a hang."""
    import time

    from opd.types import ActorError

    two = _group(_cfg(tiny_cfg, 2, distill="jsd"), str(tiny_zoo.student))
    two.timeout = 2.0
    try:
        two.learners[1].handle.__ray_call__.remote(lambda _self: time.sleep(60))
        b = _batches(len(Learner(str(tiny_zoo.student), tiny_cfg).tokenizer), "rollouts")[0]
        with pytest.raises(ActorError, match=r"learner-0, learner-1\.train_step did not answer within 2s"):
            two.train(b)
    finally:
        _close(two)
