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


def _learner(tiny_cfg, tiny_zoo, dtype):
    cfg = replace(tiny_cfg, student=replace(tiny_cfg.student, dtype=dtype),
                  optim=replace(tiny_cfg.optim, device="cpu"))
    return Learner(str(tiny_zoo.student), cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _step(learner, batch):
    """One step; the dtype of a decoder matmul's output during it; the gradients it left."""
    seen = []
    hook = learner.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        metrics = learner.train_step(batch)
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return metrics, set(seen), grads


def test_a_bf16_learner_computes_in_bf16_keeps_fp32_state_and_takes_the_fp32_step(tiny_cfg, tiny_zoo):
    fp32, bf16 = _learner(tiny_cfg, tiny_zoo, "float32"), _learner(tiny_cfg, tiny_zoo, "bfloat16")
    batch = _random_batch(len(fp32.tokenizer), [1, 0, 1, 0.1, 1, 1])
    lp32, lp16 = fp32.logprobs(batch), bf16.logprobs(batch)  # float32 arrays from either
    assert 0 < float(abs(lp16 - lp32).max()) < 0.1  # bf16 rounding, not another model

    m32, dt32, g32 = _step(fp32, batch)
    m16, dt16, g16 = _step(bf16, batch)
    assert dt32 == {torch.float32} and dt16 == {torch.bfloat16}
    for key in ("loss/rows_total", "optim/grad_norm"):
        assert m16[key] == pytest.approx(m32[key], rel=RTOL), key
    assert g16.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g16.values())
    total = torch.cat([g.flatten() for g in g32.values()])
    assert _rel(torch.cat([g16[k].flatten() for k in g32]), total) < RTOL
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    moments = [s[k] for s in bf16.opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
