"""The driver loop with fake workers (canned rollouts, no engines, no Ray): what the loop
itself decides, checked exactly.

- `length=auto` penalties and remedies reach the TrainBatch the learner gets;
- the greedy probe runs every `length.probe_every` steps, is timed, and feeds the controller;
- `loss.on_policy_fraction` picks on- or off-policy steps;
- a batch that trains on nothing is counted and said, even with the floor at 0;
- the loop's RNG and the monitor's state survive a checkpoint and restore;
- the summary's "before" view is carried over exactly;
- these fakes, the benchmark's sleeping workers and the real `Workers` all have every verb
  of `LoopWorkers`, under the same names and parameters.
"""

import inspect
import json
from dataclasses import replace

import numpy as np
import pytest

from opd.loop import Distillation
from opd.run_io import RunDir
from opd.steps import sampling_settings
from opd.tasks import Example
from opd.types import CheckpointState, LoopWorkers, RolloutBatch, TeacherScores, WeightUpdate
from tests.conftest import benchmark_module


class FakeWorkers:
    """Canned rollouts: the student writes `loop_token` until the cap (or stops after
    `stop_after` tokens); the teacher answers one token and EOS. Records every TrainBatch."""

    def __init__(self, eos: int, loop_token: int = 5, stop_after=None):
        self.eos, self.loop_token, self.stop_after = eos, loop_token, stop_after
        self.batches, self.version, self.restarts, self.teacher_eval = [], 0, 0, None
        self.saved = {}

    def generate(self, prompts, sampling):
        n = len(prompts.prompt_ids) * sampling.n
        if self.stop_after is None:
            comp, why = [self.loop_token] * sampling.max_new_tokens, "length"
        else:
            comp, why = [self.loop_token] * self.stop_after + [self.eos], "stop"
        return RolloutBatch([list(p) for p in prompts.prompt_ids for _ in range(sampling.n)],
                            [list(comp) for _ in range(n)], [[-1.0] * len(comp) for _ in range(n)],
                            [why] * n, ["x"] * n, self.version, 0.01)

    def generate_async(self, prompts, sampling):
        out = self.generate(prompts, sampling)  # generated now, from the current weights
        return lambda: out

    def score(self, rollouts, teachers=()):
        T = max(rollouts.lengths)
        return TeacherScores(np.full((len(rollouts.lengths), T), -2.0, np.float32), 1.0, seconds=0.01)

    def teacher_generate(self, prompts, sampling):
        n = len(prompts.prompt_ids) * sampling.n
        return RolloutBatch([list(p) for p in prompts.prompt_ids for _ in range(sampling.n)],
                            [[7, self.eos]] * n, [[0.0, 0.0]] * n, ["stop"] * n, ["7"] * n, -1)

    def train(self, batch):
        self.batches.append(batch)
        return {"loss/rows_total": 0.5, "optim/grad_norm": 1.0}

    def sync(self):
        self.version += 1
        return [WeightUpdate(self.version, {"w": np.zeros(2, np.float32)})], [self.version]

    def student_logprobs(self, batch):
        return np.full(batch.input_ids_BS.shape, -1.0, np.float32)

    def take_events(self):
        return []

    def save_checkpoint(self, path, state):
        self.saved[path] = CheckpointState.from_dict(json.loads(json.dumps(state.as_dict())))  # as on disk
        return path

    def load_checkpoint(self, path):
        return self.saved[path]

    def restart_learner(self, ckpt, reason):  # the fake learner never dies
        raise AssertionError(f"no learner restart expected ({reason})")


@pytest.fixture(scope="module")
def tok(tiny_cfg):
    from opd.zoo import ensure_tokenizer, load_tokenizer

    return load_tokenizer(ensure_tokenizer(tiny_cfg.zoo_dir))


def _loop(tiny_overrides, tok, tmp_path, overrides, workers=None, heldout=True):
    from opd.config import load_config

    cfg = load_config(tiny_overrides + ["steps=4", "eval_every=0", "checkpoint_every=0", "log_every=100",
                                        "length.reference_prompts=0", "rollout.max_new_tokens=8",
                                        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                                        "length.detector.k_on=1", f"run_dir={tmp_path}"] + overrides)
    train = [Example(None, f"{a}+{b}=", str(a + b), f"fake:{a}{b}") for a in range(5) for b in range(5)]
    digit = tok("5", add_special_tokens=False)["input_ids"][0]  # an ordinary token: well formed
    w = workers or FakeWorkers(tok.eos_token_id, loop_token=digit)
    loop = Distillation(cfg, w, tok, train, train[:4] if heldout else [], RunDir(tmp_path))
    if heldout:  # the teacher's held-out (greedy, sampled) completions, made at start
        one = replace(sampling_settings(cfg.rollout, 8, 0), n=1)
        w.teacher_eval = (w.teacher_generate(loop.heldout, one), w.teacher_generate(loop.heldout, one))
    return loop, w


def test_auto_penalties_and_remedies_reach_the_train_batch(tiny_overrides, tok, tmp_path):
    loop, w = _loop(tiny_overrides, tok, tmp_path, ["length=auto", "length.control=switch", "loss=opd",
                                                   "teacher.logprobs=topk", "length.remedies.mixture_fraction=0.5"])
    loop.run()
    first, later = w.batches[0], w.batches[-1]
    # step 1: every rollout truncated -> inflation on at once (k_on=1): the guard down-weights
    # instead of masking, the overlong penalty is -1, the top-k remedy covers every rollout
    np.testing.assert_array_equal(first.seq_weight_B[first.on_policy_B], np.float32([0.1] * 8))
    assert first.seq_advantage_B[first.on_policy_B].tolist() == [-1.0] * 8
    assert first.topk_kl_coef_B[first.on_policy_B].tolist() == [1.0] * 8
    # the teacher mixture: 2 of 4 prompts answered by the teacher, trained by SFT only
    assert (~first.on_policy_B).sum() == 2 and first.sft_weight_B[~first.on_policy_B].tolist() == [1.0, 1.0]
    assert later.topk_kl_coef_B is not None and loop.record.summary.starved_steps == 0


def test_monitor_mode_changes_nothing_in_the_batch(tiny_overrides, tok, tmp_path):
    loop, w = _loop(tiny_overrides, tok, tmp_path, ["length=monitor", "loss=opd"])
    loop.run()
    b = w.batches[-1]
    assert b.seq_weight_B.tolist() == [1.0] * 8 and b.seq_advantage_B.tolist() == [0.0] * 8
    assert b.topk_kl_coef_B is None and b.on_policy_B.all()


@pytest.mark.parametrize("fraction, on_steps", [(1.0, 4), (0.0, 0)])
def test_on_policy_fraction_picks_the_step_kind(tiny_overrides, tok, tmp_path, fraction, on_steps):
    loop, w = _loop(tiny_overrides, tok, tmp_path, ["loss=gkd", f"loss.on_policy_fraction={fraction}",
                                                   "teacher.logprobs=topk"])
    loop.run()
    assert [b.on_policy for b in w.batches].count(True) == on_steps and len(w.batches) == 4


def test_a_batch_with_no_gradient_is_counted_even_with_the_floor_at_zero(tiny_overrides, tok, tmp_path, capsys):
    loop, w = _loop(tiny_overrides, tok, tmp_path, [
        "length=auto", "length.control=switch", "loss=opd", "length.penalties.min_effective_weight=0",
        "length.remedies.topk_kl_coef=0", "length.remedies.mixture_fraction=0", "length.remedies.anchor_coef=0",
        "length.penalties.overlong_buffer=1"])
    summary = loop.run()
    # stop-properly masks every (truncated) rollout from step 1 on: nothing left to train
    assert all(b.seq_weight_B.sum() == 0 for b in w.batches)
    assert summary.starved_steps == 4
    assert "trains on 0.0% of its tokens" in capsys.readouterr().out


def test_greedy_probe_feeds_the_controller_and_is_timed(tiny_overrides, tok, tmp_path):
    loop, w = _loop(tiny_overrides, tok, tmp_path, ["length=auto", "loss=opd", "teacher.logprobs=topk",
                                                   "length.probe_every=2", "length.probe_prompts=3"])
    loop.run()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss/' in l]
    assert [("time/probe" in r) for r in rows] == [False, True, False, True]
    assert "length/probe/repetitive" not in rows[0]
    assert all(rows[i]["length/probe/repetitive"] == 1.0 and rows[i]["length/probe/truncated"] == 1.0
               for i in (1, 2, 3))  # the fake student loops to the cap; held until the next probe
    assert loop.monitor.controller.state.probe["truncated_frac"] == 1.0
    assert all(r["length/strength/topk_kl"] > 0 and "length/ctrl/err_trunc" in r for r in rows)


def test_rng_and_monitor_state_survive_checkpoint_and_restore(tiny_overrides, tok, tmp_path):
    a, _ = _loop(tiny_overrides, tok, tmp_path / "a", ["length=auto", "loss=opd", "teacher.logprobs=topk"])
    a.run()
    state = CheckpointState.from_dict(json.loads(json.dumps(a.loop_state().as_dict())))  # what a checkpoint keeps (JSON)
    b, _ = _loop(tiny_overrides, tok, tmp_path / "b", ["length=auto", "loss=opd", "teacher.logprobs=topk"])
    b.restore(state)
    assert b.step == a.step == 4 and b.rng.getstate() == a.rng.getstate()
    assert b.monitor.state_dict() == a.monitor.state_dict()
    assert b.next_prompts().prompt_ids == a.next_prompts().prompt_ids
    assert b.record.summary.eval["before"] == a.record.summary.eval["before"]  # carried over exactly


def test_resumed_run_keeps_the_before_view(tiny_overrides, tok, tmp_path):
    a, _ = _loop(tiny_overrides, tok, tmp_path / "a", ["steps=2"])
    a.run()
    state = CheckpointState.from_dict(json.loads(json.dumps(a.loop_state().as_dict())))
    b, w = _loop(tiny_overrides, tok, tmp_path / "b", ["steps=4"])
    summary = b.run(state)
    assert summary.eval["before"] == a.record.summary.eval["before"] and len(w.batches) == 2


@pytest.mark.parametrize("correction, cap", [("tis", 2.0), ("none", None)])
def test_overlap_trains_on_the_rollouts_of_the_step_before(tiny_overrides, tok, tmp_path, correction, cap):
    """rollout.overlap: step t trains on the prompts drawn, and the rollouts generated, during
    step t-1 (from its weights: staleness 1); the importance cap goes with them when asked."""
    loop, w = _loop(tiny_overrides, tok, tmp_path, ["loss=gkd", "teacher.logprobs=topk", "rollout.overlap=true",
                                                   f"rollout.overlap_correction={correction}"])
    seen = []
    w.generate_async = lambda p, s, f=w.generate_async: seen.append((p.prompt_ids, w.version)) or f(p, s)
    loop.run()
    assert [v for _, v in seen] == [0, 1, 2]  # launched during steps 1..3, before their sync
    for step, (prompts, _) in enumerate(seen, start=2):  # trained one step later
        ids = w.batches[step - 1].input_ids_BS
        assert [ids[2 * i, :len(p)].tolist() for i, p in enumerate(prompts)] == prompts
    assert [b.is_cap for b in w.batches] == [None, cap, cap, cap]


def test_overlap_resumes_with_the_pending_rollouts(tiny_overrides, tok, tmp_path):
    """A checkpoint of an overlapped run keeps the rollouts made for the next step: the
    resumed run trains on exactly what the uninterrupted one did."""
    over = ["loss=gkd", "teacher.logprobs=topk", "rollout.overlap=true", "checkpoint_every=2"]
    a, wa = _loop(tiny_overrides, tok, tmp_path / "a", over)
    a.run()
    state = wa.saved[next(k for k in wa.saved if k.endswith("step-000002"))]
    assert state.pending is not None
    b, wb = _loop(tiny_overrides, tok, tmp_path / "b", over)
    b.run(state)
    for x, y in zip(wa.batches[2:], wb.batches):
        np.testing.assert_array_equal(x.input_ids_BS, y.input_ids_BS)
    assert len(wb.batches) == 2


def _sleep_workers() -> type:
    return benchmark_module("sim_overlap").SleepWorkers


def _verbs(protocol: type) -> dict[str, list[str]]:
    """A protocol's methods and their parameter names (without self)."""
    return {name: list(inspect.signature(f).parameters)[1:] for name, f in vars(protocol).items()
            if inspect.isfunction(f) and not name.startswith("_")}


def _declared(cls: type, name: str) -> bool:
    """`name` is annotated on the class (an attribute its __init__ sets) or in a base class."""
    return any(name in vars(k).get("__annotations__", {}) for k in cls.__mro__)


@pytest.mark.parametrize("impl", ["fake", "sleep", "actors"])
def test_workers_have_every_verb_of_the_protocol(impl):
    """The loop calls its workers only through LoopWorkers: a verb renamed, or a parameter
    renamed, in any of them fails here."""
    from opd.actors import Workers

    cls = {"fake": FakeWorkers, "sleep": _sleep_workers(), "actors": Workers}[impl]
    verbs = _verbs(LoopWorkers)
    assert {"generate", "generate_async", "score", "train", "sync", "save_checkpoint"} <= set(verbs)
    for name, params in verbs.items():
        assert callable(getattr(cls, name, None)), f"{cls.__name__} has no {name}"
        assert list(inspect.signature(getattr(cls, name)).parameters)[1:] == params, (cls.__name__, name)
    made = None if cls is Workers else cls(**({"eos": 2} if impl == "fake" else {"phases": {}, "eos": 2}))
    for name in LoopWorkers.__annotations__:  # restarts, teacher_eval
        assert hasattr(made, name) if made else _declared(cls, name), f"{cls.__name__} lacks {name}"


def test_the_reference_is_generated_in_rollout_sized_batches_and_covers_every_prompt(tiny_overrides, tok, tmp_path):
    class Recording(FakeWorkers):
        """The teacher's completion of a prompt is as long as the prompt, plus EOS."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.calls, self.seeds = [], []

        def teacher_generate(self, prompts, sampling):
            self.calls.append([list(p) for p in prompts.prompt_ids])
            self.seeds.append(sampling.seed)
            out = super().teacher_generate(prompts, sampling)
            comp = [[7] * len(p) + [self.eos] for p in prompts.prompt_ids for _ in range(sampling.n)]
            return replace(out, completion_ids=comp)

    w = Recording(tok.eos_token_id)
    loop, _ = _loop(tiny_overrides, tok, tmp_path, ["length.reference_prompts=10", "rollout.seed=0"],
                    workers=w, heldout=False)
    w.calls.clear(), w.seeds.clear()
    ref = loop.reference_lengths()
    assert [len(c) for c in w.calls] == [4, 4, 2, 4, 4, 2]  # sampled, then greedy: prompts_per_step=4 at a time
    # sampled: seeded, never -1 (vLLM's "unseeded"), each batch apart from the others; greedy: no seed
    assert len(set(w.seeds[:3])) == 3 and min(w.seeds[:3]) >= 0 and w.seeds[3:] == [None] * 3
    sampled = [p for c in w.calls[:3] for p in c]
    assert len({tuple(p) for p in sampled}) == 10 and w.calls[:3] == w.calls[3:]
    assert ref.mean == pytest.approx(np.mean([len(p) + 1 for p in sampled]))  # every prompt's completions
