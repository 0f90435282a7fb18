"""The typed messages' own operations, on hand-built values:

- `RolloutBatch.select` / `concat` keep every per-rollout field and the rows' order, and
  round-trip (select, then concat, gives the batch back); numpy and unset fields included;
- `CheckpointState` comes back equal from its JSON (summary and pending rollouts typed).
"""

import json
import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import pytest

from opd.types import CheckpointState, Pending, PromptBatch, RolloutBatch, Summary


def _batch(n: int = 4, version: int = 3, seconds: float = 1.5) -> RolloutBatch:
    return RolloutBatch(prompt_ids=[[1, n - i] for i in range(n)],
                        completion_ids=[[10 + i] * (i + 1) for i in range(n)],
                        sampler_logprobs=[[-0.5 * i] * (i + 1) for i in range(n)],
                        finish_reasons=["stop" if i % 2 else "length" for i in range(n)],
                        texts=[f"t{i}" for i in range(n)], weight_version=version, seconds=seconds)


def test_select_takes_the_rows_in_the_given_order_and_keeps_the_batch_fields():
    b = _batch()
    s = b.select([3, 1])
    assert s.completion_ids == [b.completion_ids[3], b.completion_ids[1]]
    assert s.texts == ["t3", "t1"] and s.finish_reasons == ["stop", "stop"]
    assert (s.weight_version, s.seconds) == (3, 1.5)
    assert [f.name for f in fields(s)] == [f.name for f in fields(b)]
    assert b.select([]).completion_ids == [] and b.select([]).weight_version == 3


def test_select_then_concat_round_trips():
    b = _batch(5)
    assert RolloutBatch.concat(b.select([0, 1]), b.select([2, 3, 4])) == b
    shuffled = [4, 0, 3, 1, 2]
    back = RolloutBatch.concat(*(b.select([i]) for i in shuffled)).select(np.argsort(shuffled).tolist())
    assert back == b
    assert RolloutBatch.concat(b) == b


def test_concat_joins_rows_in_order_from_the_oldest_weights_in_the_longest_time():
    a, b = _batch(2, version=4, seconds=1.0), _batch(3, version=2, seconds=2.5)
    c = RolloutBatch.concat(a, b)
    assert c.prompt_ids == a.prompt_ids + b.prompt_ids and c.texts == a.texts + b.texts
    assert c.sampler_logprobs == a.sampler_logprobs + b.sampler_logprobs
    assert (c.weight_version, c.seconds) == (2, 2.5)


@dataclass(frozen=True)
class _WithArrays(RolloutBatch):
    """A batch with a numpy per-rollout field and an optional one (unset or set)."""

    reward_N: np.ndarray = None
    extra_N: Optional[np.ndarray] = None


def test_select_and_concat_handle_numpy_and_unset_fields():
    b = _WithArrays(**{f.name: getattr(_batch(), f.name) for f in fields(RolloutBatch)},
                    reward_N=np.arange(4, dtype=np.float32))
    s = b.select([2, 0])
    assert isinstance(s, _WithArrays) and s.extra_N is None
    np.testing.assert_array_equal(s.reward_N, np.float32([2, 0]))
    back = _WithArrays.concat(b.select([0, 1]), b.select([2, 3]))
    np.testing.assert_array_equal(back.reward_N, b.reward_N)
    assert back.extra_N is None and back.completion_ids == b.completion_ids
    with pytest.raises(ValueError, match="set in some batches and unset in others"):
        _WithArrays.concat(b, replace(b, extra_N=np.zeros(4)))


def _state(**summary) -> CheckpointState:
    prompts = PromptBatch([[1, 2], [3]], ["3", None], ["addition:train:1", "data.jsonl:2"], ["exact", "last_number"])
    return CheckpointState(
        step=7, rng_state=[3, list(range(625)), None],
        summary=Summary(eval={"teacher": {"accuracy/greedy": 0.75}, "before": {"kl": 0.5}}, teacher=0.75,
                        student_before=0.25, student_after=0.5, starved_steps=1, steps_done=7, **summary),
        monitor={"state": {"inflation": "on"}, "max_new_tokens": 24}, starved=1, reference=[12.5, 20.0],
        pending=Pending(prompts, _batch(2)))


@pytest.mark.parametrize("early_stop", [None, {"stop": True, "reason": "worse than run 0", "reference": 1.0}])
def test_checkpoint_state_round_trips_through_json(early_stop):
    state = _state(early_stop=early_stop)
    back = CheckpointState.from_dict(json.loads(json.dumps(state.as_dict())))
    assert back == state
    assert isinstance(back.summary, Summary) and isinstance(back.pending, Pending)
    assert isinstance(back.pending.rollouts, RolloutBatch) and isinstance(back.pending.prompts, PromptBatch)
    quiet = replace(state, pending=None, monitor=None, reference=None)  # rollout.overlap off, no monitor yet
    assert CheckpointState.from_dict(json.loads(json.dumps(quiet.as_dict()))) == quiet


def test_checkpoint_state_keeps_unmeasured_values_as_nan():
    state = _state()
    state.summary.student_after = math.nan  # never measured: nan, which equals nothing
    text = json.dumps(state.as_dict())
    back = CheckpointState.from_dict(json.loads(text))
    assert math.isnan(back.summary.student_after) and json.dumps(back.as_dict()) == text
