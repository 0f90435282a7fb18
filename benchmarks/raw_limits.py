"""Raw limits of the loop's phases: plain transformers on the same models and sequences.

Used by `bench_step.py`. Each measurement runs in a fresh spawned process (its own peak
memory, no engine or Ray in it) with torch using every core:
- `teacher_forward`: one no-grad forward of the teacher, in its dtype, over the padded batch,
  logits over every position (what a plain transformers scorer costs);
- `learner_step`: the student's forward + backward (cross-entropy on the completion tokens,
  logits over every position) over micro-batches of the same rows, then one AdamW step
  (bf16 autocast when the student's dtype is bfloat16);
- `state_copy`: one copy of the student's weights in memory (the limit of a weight sync);
- `matmul_peak`: the best GFLOP/s of one torch matmul of a shape the model runs (tokens x
  hidden by hidden x intermediate), per dtype: the machine's measured peak that the phases'
  model FLOP/s are read against (`model_flops.py`).
Every function returns the median seconds over `repeats` (after one warm-up) and the
process's peak resident memory.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
import multiprocessing as mp


@dataclass(frozen=True)
class RawBatch:
    """Sequences (prompt + completion token ids) and each one's prompt length."""

    seqs: list[list[int]]
    prompt_lens: list[int]
    pad_id: int

    @property
    def seq_tokens(self) -> int:
        return sum(map(len, self.seqs))


def _padded(b: RawBatch, rows: range):
    import torch

    S = max(len(b.seqs[i]) for i in rows)
    ids = torch.full((len(rows), S), b.pad_id, dtype=torch.long)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for j, i in enumerate(rows):
        s = b.seqs[i]
        ids[j, : len(s)], attn[j, : len(s)] = torch.tensor(s), 1
        labels[j, b.prompt_lens[i]: len(s)] = torch.tensor(s[b.prompt_lens[i]:])
    return ids, attn, labels


def _timed(fn, repeats: int, summary=statistics.median) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def _peak_rss_mb() -> float:
    from opd.learner import peak_rss_mb

    return peak_rss_mb()


def _load(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def _teacher_forward(path: str, b: RawBatch, repeats: int, dtype: str) -> dict:
    import torch

    model = _load(path, dtype).eval()
    ids, attn, _ = _padded(b, range(len(b.seqs)))

    @torch.no_grad()
    def run():
        model(input_ids=ids, attention_mask=attn).logits.float()

    return {"seconds": _timed(run, repeats), "peak_rss_mb": _peak_rss_mb()}


def _learner_step(path: str, b: RawBatch, micro_batch: int, lr: float, repeats: int, dtype: str) -> dict:
    import torch

    model = _load(path).train()  # fp32 master weights; bfloat16: autocast, as the learner
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = len(b.seqs)
    chunks = [_padded(b, range(i, min(n, i + micro_batch))) for i in range(0, n, micro_batch)]

    def run():
        opt.zero_grad(set_to_none=True)
        for ids, attn, labels in chunks:
            with bf16:
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
        opt.step()

    return {"seconds": _timed(run, repeats), "peak_rss_mb": _peak_rss_mb()}


def _state_copy(path: str, repeats: int) -> dict:
    model = _load(path)
    sd = model.state_dict()
    mb = sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
    return {"seconds": _timed(lambda: {k: v.clone() for k, v in sd.items()}, repeats), "mb": mb}


def _matmul_peak(m: int, k: int, n: int, dtype: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(m, k).to(getattr(torch, dtype))
    b = torch.randn(k, n).to(getattr(torch, dtype))
    best = _timed(lambda: a @ b, max(10, repeats), min)  # a peak: the fastest run
    return {"shape": [m, k, n], "gflop_per_s": 2 * m * k * n / best / 1e9}


def _in_fresh_process(fn, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def teacher_forward(path: str, b: RawBatch, repeats: int = 3, dtype: str = "float32") -> dict:
    return _in_fresh_process(_teacher_forward, path, b, repeats, dtype)


def learner_step(path: str, b: RawBatch, micro_batch: int, lr: float, repeats: int = 3,
                 dtype: str = "float32") -> dict:
    """`dtype`: the student's (`student.dtype`): bfloat16 runs under autocast."""
    return _in_fresh_process(_learner_step, path, b, micro_batch, lr, repeats, dtype)


def state_copy(path: str, repeats: int = 3) -> dict:
    return _in_fresh_process(_state_copy, path, repeats)


def matmul_peak(m: int, k: int, n: int, dtype: str, repeats: int = 3) -> dict:
    return _in_fresh_process(_matmul_peak, m, k, n, dtype, repeats)
