"""The learner's ranks as actors (`resources.learner_workers`): where they run, how they
meet, and how a step is shared between them.

- **Placement.** With Ray and N > 1 the ranks are the bundles of one placement group
  (`resources.learner_placement`: PACK keeps them on as few nodes as possible, STRICT_SPREAD
  puts each on its own node), one GPU each under `resources=gpu`.
- **Rendezvous.** Rank 0 names where the ranks meet (`opd.learner.shard.rendezvous`): on
  the local Ray opd starts, a file in a new temporary directory (nothing listens, and gloo
  stays on loopback); on a cluster, its node's address and a port free there. Every rank
  then joins the process group there (`Learner.join`). No fixed port.
- **A step.** The driver splits the TrainBatch by token count (`opd.learner.split`); every
  rank trains its share against the whole batch's normalisers, FSDP2 sums the gradients,
  and every rank returns the whole step's metrics (rank 0's are kept).
- **Calls.** Every verb is a call on every rank, waited on together: a rank found dead
  raises `LearnerDied` at once (the loop rebuilds the group from the newest checkpoint), and
  ranks that do not answer within `resources.remote_timeout_s` are named in an `ActorError`.

N = 1 is the same code with one rank and no process group.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from opd.types import ActorError, LearnerDied, TrainBatch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.actors import _Actor
    from opd.config import TrainConfig


def rank_names(n: int) -> list[str]:
    """The ranks' actor names: `learner` alone, `learner-0` .. `learner-{n-1}` in a group."""
    return ["learner"] if n == 1 else [f"learner-{r}" for r in range(n)]


def placement(cfg: TrainConfig, timeout_s: float) -> tuple[Any, Optional[list[dict]]]:
    """A placement group for the ranks and each rank's Ray scheduling options, its bundle
    ((None, None): one rank). The group outlives rebuilt ranks; `release` removes it."""
    r = cfg.resources
    if r.learner_workers == 1:
        return None, None
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": r.learner_num_cpus, **({"GPU": r.learner_num_gpus} if r.learner_num_gpus else {})}
    pg = placement_group([bundle] * r.learner_workers, strategy=r.learner_placement)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise ActorError(f"the Ray cluster could not place {r.learner_workers} learner ranks of {bundle} with "
                         f"resources.learner_placement={r.learner_placement} within {timeout_s:.0f}s") from e
    return pg, [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
                for i in range(r.learner_workers)]


def release(pg: Any) -> None:
    """Remove the ranks' placement group (None: there is none)."""
    if pg is not None:
        from ray.util import remove_placement_group

        remove_placement_group(pg)


def wait_ranks(ranks: list[_Actor], method: str, refs: list, timeout: float) -> list:
    """Every rank's answer; the first rank found dead raises `LearnerDied`, a failed call an
    `ActorError` naming its rank, and ranks silent for `timeout` an `ActorError` naming them."""
    import ray

    out, pending, deadline = [None] * len(refs), dict(zip(refs, range(len(refs)))), time.time() + timeout
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.time()))
        if not ready:
            silent = ", ".join(ranks[i].name for i in pending.values())
            raise ActorError(f"{silent}.{method} did not answer within {timeout:.0f}s "
                             f"(resources.remote_timeout_s); the other ranks may be waiting on it in a collective")
        i = pending.pop(ready[0])
        try:
            out[i] = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            raise LearnerDied(f"{ranks[i].name}.{method}: the actor died ({type(e).__name__})") from e
        except ray.exceptions.RayError as e:
            raise ActorError(f"{ranks[i].name}.{method} failed: {e}") from e
    return out


def merge_logprobs(parts: list[tuple[np.ndarray, Any]], shape: tuple[int, int]) -> np.ndarray:
    """The [B, S] log-probs from each rank's (rows, its [rows, S] answer)."""
    out = np.zeros(shape, np.float32)
    for rows, lp in parts:
        if len(rows):
            out[rows] = lp[: len(rows)]
    return out


def whole_batch_metrics(b: TrainBatch) -> dict[str, float]:
    """The step's metrics that describe the whole batch, not a rank's share of it."""
    from opd.learner.forward import batch_shape_metrics

    return {"learner/tokens": max(1.0, b.num_tokens), **batch_shape_metrics(b)}
