"""A TrainBatch split across the ranks of a sharded learner, balanced by token count.

The units of the split are rows, except that the two rows of an SMPO pair (and any rows that
pairs chain together) stay on one rank, so that no pair splits. Units go, longest first, to
the rank with the fewest tokens so far (a row's tokens: prompt and completion up to its last
target, what the learner's forward runs over). Each rank's share carries the whole batch's
normalisers and the micro-batch counts that every rank runs (`RankPlan`), so that N ranks
take the update one rank takes on the same batch. A rank left without rows (a batch with
fewer units than ranks) gets the batch's first row as padding only.
"""

from __future__ import annotations

import math

import numpy as np

from opd.learner.forward import row_ends
from opd.learner.objective import Normalizers, RankPlan
from opd.types import TrainBatch


def units(b: TrainBatch) -> list[np.ndarray]:
    """The batch's rows grouped so that every SMPO pair's rows are in one group."""
    parent = list(range(len(b.input_ids_BS)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if b.pairs is not None:
        for c, r in zip(b.pairs.chosen_rows, b.pairs.rejected_rows):
            parent[root(int(c))] = root(int(r))
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    return [np.array(g, np.int64) for g in groups.values()]


def assign(costs: list[float], n: int) -> list[list[int]]:
    """Indices of `costs` per bin, longest first into the lightest of `n` bins."""
    bins, load = [[] for _ in range(n)], [0.0] * n
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        k = min(range(n), key=lambda k: (load[k], k))
        bins[k].append(i)
        load[k] += costs[i]
    return bins


def split_batch(b: TrainBatch, n: int, micro_batch_size: int) -> list[tuple[TrainBatch, RankPlan]]:
    """Each rank's rows (in batch order) and its `RankPlan`."""
    groups, tokens = units(b), row_ends(b.loss_mask_BS)
    bins = assign([float(tokens[g].sum()) for g in groups], n)
    shares = [np.sort(np.concatenate([groups[i] for i in k])) if k else None for k in bins]
    parts = [b.select(rows if rows is not None else np.arange(1)) for rows in shares]
    chunks = lambda k: math.ceil(k / micro_batch_size)  # noqa: E731
    row_chunks = max(chunks(len(p.input_ids_BS)) for p, rows in zip(parts, shares) if rows is not None)
    pair_chunks = max(chunks(0 if p.pairs is None else len(p.pairs.chosen_rows)) for p in parts)
    norm = Normalizers.of(b)
    return [(p, RankPlan(norm, row_chunks, pair_chunks, rows is None)) for p, rows in zip(parts, shares)]


def split_rows(b: TrainBatch, n: int, micro_batch_size: int) -> list[tuple[np.ndarray, TrainBatch, RankPlan]]:
    """For a forward without training (the student's log-probs): rows in n contiguous
    parts, each with its rows (empty for a padding share), its batch and its plan."""
    parts = np.array_split(np.arange(len(b.input_ids_BS)), n)
    row_chunks = math.ceil(max(len(p) for p in parts) / micro_batch_size)
    norm = Normalizers.of(b)
    return [(rows, b.select(rows if len(rows) else np.arange(1)), RankPlan(norm, row_chunks, 0, not len(rows)))
            for rows in parts]
