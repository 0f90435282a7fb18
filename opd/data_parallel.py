"""A batch shared among data-parallel replicas, and their answers joined back in the batch's
order: the calls `opd.actors.Workers` sends, whether the replicas are Ray actors or plain
objects in this process.

- `generate` (the rollout workers): prompt p goes to replica p % W, as its (p // W)-th prompt.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from opd.types import PromptBatch, RolloutBatch, SamplingSettings

Calls = list[tuple[Any, str, tuple]]  # (actor, method, args), as `ActorCalls.gather` takes them


def generate_calls(actors: Sequence[Any], prompts: PromptBatch,
                   sampling: SamplingSettings) -> tuple[Calls, Callable[[list[RolloutBatch]], RolloutBatch]]:
    """`generate` calls sharing `prompts` among `actors` by stride (an actor with no prompt
    gets no call), and the merge of their answers (in call order) into prompt order."""
    W = len(actors)
    parts = [prompts.rows(slice(i, None, W)) for i in range(W)]
    calls = [(a, "generate", (p, sampling)) for a, p in zip(actors, parts) if p.prompt_ids]
    sizes = [len(p.prompt_ids) for p in parts if p.prompt_ids]
    return calls, lambda outs: merge_rollouts(outs, sizes, W, sampling.n)


def merge_rollouts(outs: list[RolloutBatch], n_prompts: list[int], W: int, G: int) -> RolloutBatch:
    """Undo the strided split (prompt p went to worker p % W as its (p // W)-th, with G rollouts
    each): rollout order follows the original prompt order."""
    starts = [sum(len(o.completion_ids) for o in outs[:w]) for w in range(len(outs))]  # worker w's first row
    order = [starts[p % W] + (p // W) * G + g for p in range(sum(n_prompts)) for g in range(G)]
    return RolloutBatch.concat(*outs).select(order)

