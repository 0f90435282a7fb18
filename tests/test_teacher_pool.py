"""The teacher pool (`resources.teacher_workers`): rollouts shared among the replicas by token
count and their scores joined back in row order (`opd.data_parallel`, `TeacherScores.select`
/ `concat`), checked against brute-force references; and two real teacher replicas behind
`Workers` scoring and generating exactly what one teacher does.

`Workers.score` and `teacher_generate` build the same calls and merges with Ray as in
process (`opd.data_parallel`); only the waiting differs (`ActorCalls`). The Ray path, with a
replica killed mid-run, is in tests/test_chaos.py."""

import itertools
import random
from dataclasses import replace

import numpy as np
import pytest

from opd.data_parallel import generate_calls, merge_scores, routed_generate_calls, score_calls, token_shares
from opd.rollout import greedy_settings
from opd.types import PromptBatch, RolloutBatch, TeacherScores

K, V = 3, 5


def _rollouts(prompt_lens, completion_lens, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(V) for _ in range(p)] for p in prompt_lens]
    comps = [[rng.randrange(V) for _ in range(c)] for c in completion_lens]
    return RolloutBatch(prompts, comps, [[0.0] * len(c) for c in comps], ["stop"] * len(comps),
                        [""] * len(comps), 0)


def _row(rng, L):
    """One rollout's ragged scores: [L], [L, K], [L, K], [L, V]."""
    return (rng.normal(size=L).astype(np.float32), rng.integers(0, V, (L, K)),
            rng.normal(size=(L, K)).astype(np.float32), rng.normal(size=(L, V)).astype(np.float32))


def _reference(rows, T, seconds=0.0):
    """Scores of ragged rows, filled position by position: 0 past a row's tokens (-inf top-k
    log-probs), as the scorer leaves them."""
    lp, ids = np.zeros((len(rows), T), np.float32), np.zeros((len(rows), T, K), np.int64)
    tlp, full = np.full((len(rows), T, K), -np.inf, np.float32), np.zeros((len(rows), T, V), np.float32)
    for n, (a, b, c, d) in enumerate(rows):
        for t in range(len(a)):
            lp[n, t], ids[n, t], tlp[n, t], full[n, t] = a[t], b[t], c[t], d[t]
    return TeacherScores(lp, 1.0, ids, tlp, full, seconds)


def _assert_same(a: TeacherScores, b: TeacherScores):
    for f in ("logprobs_NT", "topk_ids_NTK", "topk_logprobs_NTK", "full_logprobs_NTV"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, f
            np.testing.assert_array_equal(x, y, err_msg=f)


def test_split_scores_merge_back_into_row_order():
    """Rows of ragged length scored in shares (each share padded to its own T) and merged
    equal the whole batch scored at once; `concat` alone stacks the parts' rows."""
    rng = np.random.default_rng(0)
    lens = [7, 1, 4, 12, 2, 9, 3, 3, 6]
    rows = [_row(rng, L) for L in lens]
    whole = _reference(rows, max(lens))
    shares = [[3, 1, 8], [0, 6], [5, 2, 4, 7]]  # any order within a share
    parts = [_reference([rows[n] for n in s], max(lens[n] for n in s), seconds=i + 1.0)
             for i, s in enumerate(shares)]
    merged = merge_scores(parts, shares)
    _assert_same(merged, whole)
    assert merged.seconds == 3.0 and merged.temperature == 1.0
    stacked = TeacherScores.concat(*parts)
    _assert_same(stacked, _reference([rows[n] for s in shares for n in s], max(lens)))
    _assert_same(stacked.select([4, 0]), _reference([rows[6], rows[3]], max(lens)))  # stacked rows 4, 0
    with pytest.raises(ValueError, match="temperatures"):
        TeacherScores.concat(parts[0], TeacherScores(parts[1].logprobs_NT, 2.0))


def test_one_share_in_row_order_is_not_copied():
    scores = _reference([_row(np.random.default_rng(1), 4)], 4)
    assert merge_scores([scores], [[0]]) is scores


def test_scores_without_optional_arrays_join():
    a, b = TeacherScores(np.ones((2, 3), np.float32), 1.0), TeacherScores(np.full((1, 5), 2, np.float32), 1.0)
    out = TeacherScores.concat(a, b)
    assert out.topk_ids_NTK is None and out.full_logprobs_NTV is None
    np.testing.assert_array_equal(out.logprobs_NT, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2]])


@pytest.mark.parametrize("W", [1, 2, 3])
def test_token_shares_are_balanced(W):
    """Every row in exactly one share, in row order; the largest share's tokens within 4/3 of
    the best split's (brute force over every assignment), and one share when W=1."""
    prompt_lens, comp_lens = [3, 3, 2, 4, 3, 2, 3, 5], [9, 1, 6, 12, 2, 7, 3, 4]
    r = _rollouts(prompt_lens, comp_lens)
    sizes = [p + c for p, c in zip(prompt_lens, comp_lens)]
    shares = token_shares(r, W)
    assert len(shares) == W and sorted(n for s in shares for n in s) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in shares)
    best = min(max(sum(sizes[n] for n in range(len(sizes)) if a[n] == w) for w in range(W))
               for a in itertools.product(range(W), repeat=len(sizes)))
    assert max(sum(sizes[n] for n in s) for s in shares) <= 4 / 3 * best
    assert token_shares(_rollouts([1, 1, 1, 1], [5, 4, 3, 3]), 2) == [[0, 3], [1, 2]]  # 6+4 | 5+4


def test_pool_calls_skip_replicas_without_rows():
    """More replicas than rows: the extra replicas get no call; the rest still merge in order."""
    r = _rollouts([2, 2], [3, 1])
    calls, merge = score_calls(["t0", "t1", "t2"], r)
    assert [(a, m) for a, m, _ in calls] == [("t0", "score"), ("t1", "score")]
    outs = [TeacherScores(np.array([[float(n) for n in range(len(args[0].completion_ids[0]))]], np.float32), 1.0)
            for _, _, args in calls]
    np.testing.assert_array_equal(merge(outs).logprobs_NT, [[0, 1, 2], [0, 0, 0]])
    calls, _ = generate_calls(["t0", "t1", "t2"], PromptBatch([[1], [2]], [None, None], ["a", "b"]),
                              greedy_settings(4))
    assert [a for a, _, _ in calls] == ["t0", "t1"]


def _seeds_by_prompt(calls) -> dict:
    """What each prompt (its one token) is seeded with, over the calls' shares."""
    return {p[0]: sampling.prompt_seed(j) for _, _, (part, sampling) in calls for j, p in enumerate(part.prompt_ids)}


def test_every_prompt_keeps_its_seed_on_any_number_of_replicas():
    """Prompt p is seeded as in one call (seed + p * stride), however many replicas share
    the batch; so no two prompts share a seed, and W replicas sample what one does."""
    prompts = PromptBatch([[p] for p in range(7)], [None] * 7, ["t"] * 7)
    s = replace(greedy_settings(4), temperature=1.0, seed=11)
    one = _seeds_by_prompt(generate_calls(["t0"], prompts, s)[0])
    assert one == {p: 11 + p * s.seed_stride for p in range(7)}
    for W in (2, 3, 4):
        assert _seeds_by_prompt(generate_calls([f"t{i}" for i in range(W)], prompts, s)[0]) == one, W


def test_a_share_of_rows_keeps_each_rows_seed_and_unseeded_stays_unseeded():
    s = replace(greedy_settings(4), temperature=1.0, seed=5)
    for start, step in ((0, 1), (2, 1), (1, 3), (4, 2)):
        part = s.for_rows(start, step)
        assert [part.prompt_seed(j) for j in range(4)] == [s.prompt_seed(start + j * step) for j in range(4)]
    assert s.shifted(7).prompt_seed(2) == s.prompt_seed(2) + 7
    g = greedy_settings(4)
    assert g.for_rows(3, 2).prompt_seed(1) is None and g.shifted(7).seed is None


def test_the_engines_get_each_prompts_own_seed():
    """vLLM applies a SamplingParams' seed to every prompt given it: one SamplingParams per prompt."""
    from opd.rollout import seeded_params

    s = replace(greedy_settings(4), temperature=1.0, seed=3)
    assert [p.seed for p in seeded_params(s, 3)] == [3, 3 + s.seed_stride, 3 + 2 * s.seed_stride]
    assert [p.seed for p in seeded_params(greedy_settings(4), 2)] == [None, None]


def test_two_teachers_prompts_never_share_a_seed():
    prompts = PromptBatch([[p] for p in range(6)], [None] * 6, ["t"] * 6, teachers=list("abbaab"))
    s = replace(greedy_settings(4), temperature=1.0, seed=0)
    calls, _ = routed_generate_calls({"a": ["a0", "a1"], "b": ["b0"]}, prompts, s)
    seeds = _seeds_by_prompt(calls)
    assert sorted(seeds) == list(range(6)) and len(set(seeds.values())) == 6


def test_resources_count_every_replica(monkeypatch):
    """resources=local asks 0.5 CPU a replica: two fit on 2 CPUs beside a rollout worker and
    the learner, three do not, and the refusal names the knob."""
    import ray

    from opd.actors import check_resources
    from opd.config import load_config

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    check_resources(load_config(["resources.teacher_workers=2"]).resources)
    with pytest.raises(ValueError, match=r"ask for 2\.5 CPU .*resources\.teacher_workers x "
                                         r"resources\.teacher_num_cpus.*cluster has 2"):
        check_resources(load_config(["resources.teacher_workers=3"]).resources)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "full"])
def test_two_replicas_score_and_generate_like_one(mode, tiny_overrides, tiny_zoo, tmp_path):
    """`Workers` with resources.teacher_workers=2 (real TeacherScorers, in process): both
    replicas get rows, and the merged scores of ragged rollouts equal one replica scoring the
    whole batch; the teacher's own greedy completions come back in prompt order, the same as
    one replica's."""
    from opd.actors import Workers
    from opd.config import load_config
    from opd.tasks import build_task, prompt_batch
    from opd.zoo import load_tokenizer

    cfg = load_config(tiny_overrides + [f"run_dir={tmp_path}", "resources.use_ray=false", "resources.teacher_workers=2",
                                        f"teacher.logprobs={mode}", "teacher.topk=4", "teacher.batch_size=4"])
    workers = Workers(cfg, str(tiny_zoo.student), str(tiny_zoo.teacher))
    try:
        assert [t.name for t in workers.teachers] == ["teacher-0", "teacher-1"]
        task = build_task("addition", cfg.task.seed, 100, 6, cfg.task.max_digits)
        prompts = prompt_batch(load_tokenizer(tiny_zoo.student), task.heldout())
        one = workers.teachers[0].obj
        rng, vocab = random.Random(1), one.vocab_size
        comps = [[rng.randrange(vocab) for _ in range(L)] for L in (9, 1, 4, 11, 2, 7, 3, 10, 5, 6, 8, 2)]
        rollouts = RolloutBatch([prompts.prompt_ids[n // 2] for n in range(len(comps))], comps,
                                [[0.0] * len(c) for c in comps], ["stop"] * len(comps), [""] * len(comps), 0)
        expected, greedy = one.score(rollouts), one.generate(prompts, greedy_settings(6))
        seen = _count_rows(workers.teachers)
        got = workers.score(rollouts)
        assert sorted(seen) == ["teacher-0", "teacher-1"] and sum(seen.values()) == len(comps), seen
        assert got.logprobs_NT.shape == expected.logprobs_NT.shape
        for f in ("logprobs_NT", "topk_logprobs_NTK", "full_logprobs_NTV"):
            if getattr(expected, f) is None:
                assert getattr(got, f) is None
            else:
                np.testing.assert_allclose(getattr(got, f), getattr(expected, f), atol=1e-5, rtol=0, err_msg=f)
        if mode == "topk":
            np.testing.assert_array_equal(got.topk_ids_NTK, expected.topk_ids_NTK)
        pool = workers.teacher_generate(prompts, greedy_settings(6))
        assert pool.prompt_ids == prompts.prompt_ids and pool.completion_ids == greedy.completion_ids
    finally:
        workers.shutdown()


def _count_rows(teachers) -> dict:
    """{replica name: rows it scored}, counted from here on."""
    seen = {}
    for t in teachers:
        def score(r, real=t.obj.score, name=t.name):
            seen[name] = seen.get(name, 0) + len(r.completion_ids)
            return real(r)
        t.obj.score = score
    return seen
