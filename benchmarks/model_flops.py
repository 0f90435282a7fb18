"""Model FLOPs of the loop's phases, to read their seconds against the machine's matmul peak.

Used by `bench_step.py`. Counts are the model's useful arithmetic, multiply-adds as 2 FLOPs,
from the Hugging Face config of a decoder-only model (Llama / Qwen2 shapes):

- the decoder: 2 x its non-embedding parameters per token a forward runs over;
- attention's scores and weighted sums: 2 x 2 x (mean causal context) x hidden per token and
  layer, the context being half the mean sequence length;
- the LM head: 2 x hidden x vocabulary per position it runs on;
- training: the forward and twice it for the backward (3x), with no recomputation counted:
  the learner's chunked head recomputes its logits in the backward, which costs time and is
  not counted as useful work.

The phases: the learner trains on its sequence tokens (decoder) and on the trained tokens
only (head); the teacher runs a forward over the same sequences with the head on every
position (vLLM's prompt log-probs and a transformers forward both do); generation runs a
forward per new token, with the head on each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    decoder_params: int  # attention and MLP weights of every layer (norms and biases left out)

    @classmethod
    def of(cls, model_dir: str) -> "ModelShape":
        c = json.loads((Path(model_dir) / "config.json").read_text())
        h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or h // heads
        kv = c.get("num_key_value_heads", heads) * head_dim
        per_layer = 2 * h * heads * head_dim + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
        return cls(h, inter, layers, c["vocab_size"], layers * per_layer)

    def forward(self, tokens: float, head_tokens: float, mean_seq: float) -> float:
        """FLOPs of one forward over `tokens` positions with the head on `head_tokens`."""
        attention = 2 * 2 * (mean_seq / 2) * self.hidden * self.layers
        return tokens * (2 * self.decoder_params + attention) + head_tokens * 2 * self.hidden * self.vocab


def phase_flops(student: ModelShape, teacher: ModelShape, loop: dict, rows: float) -> dict[str, float]:
    """Model FLOPs per step of each phase, from the loop's mean token counts (`loop_means`):
    `rows` sequences of `learner/seq_tokens` tokens in all, `learner/tokens` of them trained,
    `rollout/tokens` generated."""
    seq, trained, new = loop["learner/seq_tokens"], loop["learner/tokens"], loop["rollout/tokens"]
    mean_seq = seq / max(1.0, rows)
    return {"learn": 3 * student.forward(seq, trained, mean_seq),
            "teacher": teacher.forward(seq, seq, mean_seq),
            "generate": student.forward(new, new, mean_seq)}
