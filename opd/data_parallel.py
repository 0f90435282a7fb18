"""A batch shared among data-parallel replicas, and their answers joined back in the batch's
order: the calls `opd.actors.Workers` sends, whether the replicas are Ray actors or plain
objects in this process.

- `generate` (the rollout workers, and the teacher pool's own completions): prompt p goes to
  replica p % W, as its (p // W)-th prompt.
- `score` (the teacher pool): rollouts go in shares of about equal token count (prompt +
  completion, what a teacher's forward pass costs), longest rollout first onto the least
  loaded share; each share keeps the batch's row order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from opd.types import PromptBatch, RolloutBatch, SamplingSettings, TeacherScores

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


def score_calls(actors: Sequence[Any],
                rollouts: RolloutBatch) -> tuple[Calls, Callable[[list[TeacherScores]], TeacherScores]]:
    """`score` calls sharing `rollouts` among `actors` by token count (an actor with no row gets
    no call), and the merge of their answers (in call order) into the batch's row order."""
    shares = [s for s in token_shares(rollouts, len(actors)) if s]
    calls = [(a, "score", (rollouts.select(s),)) for a, s in zip(actors, shares)]
    return calls, lambda outs: merge_scores(outs, shares)


def token_shares(rollouts: RolloutBatch, W: int) -> list[list[int]]:
    """The row indices of W shares of about equal prompt + completion tokens: each rollout,
    longest first (ties in row order), goes to the share with the fewest tokens so far (the
    first such). Greedy, so the largest share is at most 4/3 of the best possible split's.
    Each share lists its rows in batch order."""
    sizes = [len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
    shares, load = [[] for _ in range(W)], [0] * W
    for n in sorted(range(len(sizes)), key=lambda n: -sizes[n]):
        w = load.index(min(load))
        shares[w].append(n)
        load[w] += sizes[n]
    return [sorted(s) for s in shares]


def merge_scores(outs: list[TeacherScores], shares: list[list[int]]) -> TeacherScores:
    """Undo a split into `shares` (outs[i] scored rows shares[i], in that order): the rows in
    batch order, padded to the widest T; the time is the slowest share's. One share already
    in batch order comes back as it is (a full distribution [N, T, V] is not copied)."""
    order = np.argsort(np.array([n for s in shares for n in s], np.int64), kind="stable")
    if len(outs) == 1 and (order == np.arange(len(order))).all():
        return outs[0]
    return TeacherScores.concat(*outs).select(order)
