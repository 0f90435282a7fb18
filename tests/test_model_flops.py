"""What benchmarks/bench_step.py reads its FLOP/s from (benchmarks/model_flops.py): the model
FLOPs it counts for a forward equal torch's own count of the matmuls a forward runs."""

import torch

from tests.conftest import benchmark_module


def test_a_forward_counts_what_torch_counts(tiny_zoo):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_zoo.teacher), dtype=torch.float32, attn_implementation="eager").eval()
    shape = benchmark_module("model_flops").ModelShape.of(str(tiny_zoo.teacher))
    B, T = 3, 11
    ids = torch.randint(7, 40, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    # (eager attention: its matmuls are counted) torch counts attention over every (query, key) pair; the model counts the causal half,
    # the keys a query sees on average, so the other half is added back here
    other_half = B * shape.layers * 2 * 2 * (T / 2) * shape.hidden * T
    assert counter.get_total_flops() == shape.forward(B * T, B * T, T) + other_half
