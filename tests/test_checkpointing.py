"""Activation checkpointing (`optim.gradient_checkpointing`): the decoder layers recompute
their activations in backward, and the step is the step without it, in fp32 and under bf16
autocast alike (recomputation repeats the same arithmetic)."""

import pytest
import torch

from tests.test_batch import _random_batch
from tests.test_bf16 import _learner, _step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_checkpointed_learner_recomputes_each_layer_and_takes_the_same_step(tiny_cfg, tiny_zoo, dtype):
    plain, ckpt = (_learner(tiny_cfg, tiny_zoo, dtype, checkpointing=c) for c in (False, True))
    batch = _random_batch(len(plain.tokenizer), [1, 0, 1, 0.1, 1, 1])
    m0, seen0, g0 = _step(plain, batch)
    m1, seen1, g1 = _step(ckpt, batch)
    assert len(seen0) >= 1 and len(seen1) == 2 * len(seen0)  # each layer's forward again in backward
    for key in ("loss/rows_total", "optim/grad_norm", "learner/tokens"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-6), key
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    for p0, p1 in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-8)
