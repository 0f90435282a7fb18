"""The learner's bf16 path (`student.dtype=bfloat16`) on CPU, the same code CUDA runs:
matmuls under bf16 autocast, fp32 master weights, gradients and AdamW moments, fp32
log-probs, and a step that agrees with the fp32 learner's within bf16 rounding.

The reference is the fp32 learner on the same weights and batch; the decoder's own output
dtype shows that autocast ran (the fp32 learner's is float32)."""

from dataclasses import replace

import pytest
import torch

from opd.learner import Learner
from tests.test_batch import _random_batch

# bf16 keeps 8 bits of mantissa (relative rounding 2**-8 ~ 4e-3 per operation); a tiny
# model's step accumulates a few of them
RTOL = 5e-2


def _learner(tiny_cfg, tiny_zoo, dtype, device="cpu", checkpointing=False):
    cfg = replace(tiny_cfg, student=replace(tiny_cfg.student, dtype=dtype),
                  optim=replace(tiny_cfg.optim, device=device, gradient_checkpointing=checkpointing))
    return Learner(str(tiny_zoo.student), cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _step(learner, batch):
    """One step; the dtypes of a decoder matmul's inputs during it (autocast's products), one
    per forward of the layer (a recomputed layer runs twice); the gradients it left, on the CPU."""
    seen = []
    # a pre-hook: a recomputation stops once it has what backward needs, before this matmul returns
    hook = learner.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0].dtype))
    try:
        metrics = learner.train_step(batch)
    finally:
        hook.remove()
    grads = {n: p.grad.cpu().clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return metrics, seen, grads


def test_a_bf16_learner_computes_in_bf16_keeps_fp32_state_and_takes_the_fp32_step(tiny_cfg, tiny_zoo):
    fp32, bf16 = _learner(tiny_cfg, tiny_zoo, "float32"), _learner(tiny_cfg, tiny_zoo, "bfloat16")
    batch = _random_batch(len(fp32.tokenizer), [1, 0, 1, 0.1, 1, 1])
    lp32, lp16 = fp32.logprobs(batch), bf16.logprobs(batch)  # float32 arrays from either
    assert 0 < float(abs(lp16 - lp32).max()) < 0.1  # bf16 rounding, not another model

    m32, dt32, g32 = _step(fp32, batch)
    m16, dt16, g16 = _step(bf16, batch)
    assert set(dt32) == {torch.float32} and set(dt16) == {torch.bfloat16}
    for key in ("loss/rows_total", "optim/grad_norm"):
        assert m16[key] == pytest.approx(m32[key], rel=RTOL), key
    assert g16.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g16.values())
    total = torch.cat([g.flatten() for g in g32.values()])
    assert _rel(torch.cat([g16[k].flatten() for k in g32]), total) < RTOL
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    moments = [s[k] for s in bf16.opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_learner_under_bf16_and_checkpointing_takes_the_fp32_cpu_step(tiny_cfg, tiny_zoo, monkeypatch):
    """The GPU path: the learner on CUDA, bf16 autocast under activation checkpointing, the LM
    head in chunks of 4 tokens (several per micro-batch); its step against the fp32 learner's
    on the CPU, within bf16 rounding."""
    from opd.learner import forward

    monkeypatch.setattr(forward, "HEAD_CHUNK", 4)
    cpu = _learner(tiny_cfg, tiny_zoo, "float32")
    gpu = _learner(tiny_cfg, tiny_zoo, "bfloat16", device="cuda", checkpointing=True)
    batch = _random_batch(len(cpu.tokenizer), [1, 0, 1, 0.1, 1, 1])
    assert batch.num_tokens > 2 * forward.HEAD_CHUNK
    assert 0 < float(abs(gpu.logprobs(batch) - cpu.logprobs(batch)).max()) < 0.1
    m32, dt32, g32 = _step(cpu, batch)
    m16, dt16, g16 = _step(gpu, batch)
    assert set(dt16) == {torch.bfloat16} and len(dt16) == 2 * len(dt32)  # autocast, and recomputed
    for key in ("loss/rows_total", "optim/grad_norm"):
        assert m16[key] == pytest.approx(m32[key], rel=RTOL), key
    assert _rel(torch.cat([g16[k].flatten() for k in g32]), torch.cat([g.flatten() for g in g32.values()])) < RTOL
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in gpu.model.parameters())
