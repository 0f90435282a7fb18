"""A batch shared among data-parallel replicas, and their answers joined back in the batch's
order: the calls `opd.actors.Workers` sends, whether the replicas are Ray actors or plain
objects in this process.

- `generate` (the rollout workers, and the teacher pool's own completions): prompt p goes to
  replica p % W, as its (p // W)-th prompt.
- `score` (the teacher pool): rollouts go in shares of about equal token count (prompt +
  completion, what a teacher's forward pass costs), longest rollout first onto the least
  loaded share; each share keeps the batch's row order.
- several teachers (`routed_score_calls`, `routed_generate_calls`): the rows are first grouped
  by the teacher each names, each group shared among that teacher's own replicas as above,
  and every answer put back in the batch's order. All the groups' calls go out together.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from opd.types import PromptBatch, RolloutBatch, SamplingSettings, TeacherScores

# A prime apart from SamplingSettings.seed_stride: two teachers' prompts never share a seed.
GROUP_SEED_STRIDE = 104729
Calls = list[tuple[Any, str, tuple]]  # (actor, method, args), as `ActorCalls.gather` takes them


def generate_calls(actors: Sequence[Any], prompts: PromptBatch,
                   sampling: SamplingSettings) -> tuple[Calls, Callable[[list[RolloutBatch]], RolloutBatch]]:
    """`generate` calls sharing `prompts` among `actors` by stride (an actor with no prompt
    gets no call), and the merge of their answers (in call order) into prompt order. Each
    prompt keeps the seed it has in one call (`SamplingSettings.prompt_seed`), so W actors
    sample what one would."""
    W = len(actors)
    parts = [prompts.rows(slice(i, None, W)) for i in range(W)]
    calls = [(a, "generate", (p, sampling.for_rows(i, W)))
             for i, (a, p) in enumerate(zip(actors, parts)) if p.prompt_ids]
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


Pools = Mapping[str, Sequence[Any]]  # each teacher's replicas, by name


def by_teacher(names: Sequence[str]) -> dict[str, list[int]]:
    """The row indices of each teacher, in row order (teachers in order of first appearance)."""
    groups: dict[str, list[int]] = {}
    for n, name in enumerate(names):
        groups.setdefault(name, []).append(n)
    return groups


def _routed(pools: Pools, names: Sequence[str], split: Callable[[Sequence[Any], list[int]], tuple[Calls, Callable]],
            join: Callable[[list, list[list[int]]], Any]) -> tuple[Calls, Callable[[list], Any]]:
    """Calls for every teacher's group of rows (`split(replicas, rows)`: that group's calls and
    their merge), and the merge of all their answers back into row order (`join`)."""
    if not names:  # no names: the one teacher has every row
        if len(pools) != 1:
            raise ValueError(f"rows that name no teacher, with several teachers ({sorted(pools)})")
        return split(next(iter(pools.values())), None)
    groups = by_teacher(names)
    parts = [split(pools[name], rows) for name, rows in groups.items()]
    calls = [c for part_calls, _ in parts for c in part_calls]

    def merge(outs: list) -> Any:
        cuts = np.cumsum([0] + [len(c) for c, _ in parts])
        return join([m(outs[a:b]) for (_, m), a, b in zip(parts, cuts[:-1], cuts[1:])], list(groups.values()))

    return calls, merge


def routed_score_calls(pools: Pools, rollouts: RolloutBatch, names: Sequence[str]) -> tuple[Calls, Callable]:
    """`score` calls for rollouts whose row n is scored by teacher `names[n]` (on its replicas,
    by token count), and the merge of the answers into the batch's row order."""
    split = lambda reps, rows: score_calls(reps, rollouts if rows is None else rollouts.select(rows))  # noqa: E731
    return _routed(pools, names, split, merge_scores)


def routed_generate_calls(pools: Pools, prompts: PromptBatch, sampling: SamplingSettings) -> tuple[Calls, Callable]:
    """`generate` calls for prompts that each name a teacher (`prompts.teachers`; none: the one
    teacher), each teacher answering its own, and the merge into prompt order (n per prompt).
    The g-th teacher's prompts are seeded GROUP_SEED_STRIDE * g apart from the first's."""
    groups = list(by_teacher(prompts.teachers)) if prompts.teachers else [None]

    def split(reps: Sequence[Any], rows: Optional[list[int]]) -> tuple[Calls, Callable]:
        if rows is None:
            return generate_calls(reps, prompts, sampling)
        g = groups.index(prompts.teachers[rows[0]])
        return generate_calls(reps, prompts.select(rows), sampling.shifted(GROUP_SEED_STRIDE * g))

    return _routed(pools, prompts.teachers, split, lambda outs, groups: join_by_prompt(outs, groups, sampling.n))


def join_by_prompt(outs: list[RolloutBatch], groups: list[list[int]], G: int) -> RolloutBatch:
    """Undo a split of prompts into `groups` (outs[i]: G completions of each prompt of
    groups[i], in that order): the completions in prompt order."""
    at = np.argsort(np.array([p for g in groups for p in g], np.int64), kind="stable")  # prompt -> place
    return RolloutBatch.concat(*outs).select([int(j) * G + g for j in at for g in range(G)])
