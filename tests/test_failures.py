"""Nothing is lost: an actor error mid-run leaves a final checkpoint that `resume=auto`
continues from, a dead learner is restored from the newest checkpoint and its steps since
are replayed (each step logged once), a broken newest checkpoint is skipped, a non-finite
step is skipped without touching the weights, and a hung Ray actor becomes a clear, named
timeout instead of a hang."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from opd.actors import ActorDied, ActorError, LearnerDied, Workers, _Local, _Remote, check_resources, start_ray
from opd.batch import build_train_batch
from opd.config import load_config
from opd.learner import BadStepsError, Learner
from opd.run_io import RunDir, resolve_resume
from opd.train import prepare_run, run_training
from opd.types import RolloutBatch, TeacherScores

pytestmark = pytest.mark.slow

FAST = ["resources.use_ray=false", "eval_every=0", "length.reference_prompts=8"]


def _steps(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_error_mid_run_saves_checkpoint_and_resume_auto_continues(tiny_overrides, tiny_zoo, tmp_path, monkeypatch):
    over = tiny_overrides + FAST + [f"run_dir={tmp_path}", "steps=4", "checkpoint_every=0"]
    real_train = Workers.train
    calls = {"n": 0}

    def flaky_train(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("learner died")
        return real_train(self, batch)

    monkeypatch.setattr(Workers, "train", flaky_train)
    with pytest.raises(RuntimeError, match="learner died"):
        run_training(load_config(over))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # the last completed step, saved on the way out
    monkeypatch.setattr(Workers, "train", real_train)
    saved = json.loads((tmp_path / "checkpoints" / "step-000002" / "learner_state.json").read_text())
    summary = run_training(load_config(over + ["resume=auto"]))
    assert [m["step"] for m in _steps(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()
    before = saved["extra"]["summary"]["eval"]["before"]  # measured by the interrupted run
    assert summary["eval"]["before"] == before and summary["student_before"] == before["accuracy/greedy"]


@pytest.mark.parametrize("checkpoint_every,die_at,replay_from", [(2, 4, 2), (0, 2, 0)])
def test_dead_learner_is_restored_and_its_steps_replayed_once(tiny_overrides, tiny_zoo, tmp_path, monkeypatch,
                                                              checkpoint_every, die_at, replay_from):
    """The learner dies in step `die_at`: it is rebuilt from the newest checkpoint (or the start
    of the run), the steps since are redone exactly as before, and every step is logged once."""
    over = tiny_overrides + FAST + [f"run_dir={tmp_path}", "steps=4", f"checkpoint_every={checkpoint_every}",
                                    "keep_checkpoints=5"]
    real_train, calls, first_try = Workers.train, {"n": 0}, {}

    def dying_train(self, batch):
        calls["n"] += 1
        if calls["n"] == die_at:
            first_try.update({m["step"]: m for m in _steps(tmp_path)})
            raise LearnerDied("learner.train_step: the actor died (test)")
        return real_train(self, batch)

    monkeypatch.setattr(Workers, "train", dying_train)
    summary = run_training(load_config(over))
    steps = _steps(tmp_path)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    restarts = [[e["actor"] for e in m["events"] if e.get("event") == "restart"] for m in steps]
    assert restarts == [[]] * replay_from + [["learner"]] + [[]] * (3 - replay_from)  # on the first step redone
    assert [m["fault/restarts"] for m in steps] == [0.0] * replay_from + [1.0] * (4 - replay_from)
    for s in range(replay_from + 1, die_at):  # steps done twice: the same step both times
        for key in ("loss/rows_total", "optim/grad_norm", "rollout/weight_version"):
            assert steps[s - 1][key] == pytest.approx(first_try[s][key], rel=1e-4, abs=1e-6), (s, key)
    assert [m["rollout/weight_version"] for m in steps] == [0, 1, 2, 3]


def test_restarts_are_counted_evented_and_limited(capsys):
    class Thing:
        def ready(self) -> int:
            return 1

    workers = Workers.__new__(Workers)  # only the plumbing, no models
    workers.max_restarts, workers.restarts, workers.events = 1, 0, []
    workers.use_ray, workers.rollouts, workers.learners = False, [], []
    workers.cfg = load_config([])
    thing = _Local(Thing, "thing", ())
    first = thing.obj
    workers.restart(thing, "thing.ready: the actor died (test)")
    assert thing.obj is not first and thing.restarts == 1 and workers.restarts == 1
    assert workers.take_events() == [{"event": "restart", "actor": "thing", "restart": 1,
                                      "reason": "thing.ready: the actor died (test)"}]
    assert workers.take_events() == []
    assert "fault: thing.ready: the actor died (test); restarted thing (1 of at most 1)" in capsys.readouterr().out
    with pytest.raises(ActorDied, match=r"restarted 1 times already \(resources\.max_actor_restarts=1\)"):
        workers.restart(thing, "thing.ready: the actor died again")


# ------------------------------------------------------------------ checkpoints
def _two_checkpoints(tiny_cfg, tiny_zoo, root):
    run, learner = RunDir(root), Learner(str(tiny_zoo.student), tiny_cfg)
    for step in (1, 2):
        learner.step = step
        learner.save_checkpoint(run.checkpoint_dir(step), {"step": step})
    return run


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKAGES = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is unreadable"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "bad state json": (lambda d: (d / "learner_state.json").write_text('{"step": 2, "py'), "learner_state.json"),
    "no optimizer state": (lambda d: (d / "learner_state.pt").unlink(), "learner_state.pt is missing"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_resume_auto_skips_a_broken_newest_checkpoint(tiny_cfg, tiny_zoo, tmp_path, capsys, breakage):
    run = _two_checkpoints(tiny_cfg, tiny_zoo, tmp_path)
    assert resolve_resume("auto", run) == run.checkpoint_dir(2)
    breaks, reason = BREAKAGES[breakage]
    breaks(run.checkpoint_dir(2))
    assert resolve_resume("auto", run) == run.checkpoint_dir(1)
    out = capsys.readouterr().out
    assert f"resume=auto: skipping checkpoint {run.checkpoint_dir(2)} ({reason}" in out
    with pytest.raises(FileNotFoundError, match=f"resume=.*step-000002: {reason}"):
        resolve_resume(str(run.checkpoint_dir(2)), run)


def test_run_resumes_from_the_checkpoint_before_a_truncated_one(tiny_overrides, tiny_cfg, tiny_zoo, tmp_path, capsys):
    run = _two_checkpoints(tiny_cfg, tiny_zoo, tmp_path)
    _truncate(run.checkpoint_dir(2) / "model.safetensors")
    _run, student_path, _teacher, resume, *_ = prepare_run(
        load_config(tiny_overrides + [f"run_dir={tmp_path}", "resume=auto"]))
    assert resume == run.checkpoint_dir(1) and student_path == str(run.checkpoint_dir(1))
    assert "skipping checkpoint" in capsys.readouterr().out


def test_checkpoint_is_written_atomically(tiny_cfg, tiny_zoo, tmp_path, monkeypatch):
    run = _two_checkpoints(tiny_cfg, tiny_zoo, tmp_path)
    learner = Learner(str(tiny_zoo.student), tiny_cfg)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # dies half way through the save
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(run.checkpoint_dir(3), {"step": 3})
    assert not run.checkpoint_dir(3).exists()
    assert resolve_resume("auto", run) == run.checkpoint_dir(2)
    monkeypatch.undo()
    learner.step = 7
    learner.save_checkpoint(run.checkpoint_dir(2), {"step": 2})  # over an existing one
    assert json.loads((run.checkpoint_dir(2) / "learner_state.json").read_text())["step"] == 7
    assert sorted(p.name for p in run.ckpt_root.iterdir()) == [".step-000003.tmp", "step-000001", "step-000002"]


# ------------------------------------------------------------------ bad steps
def _nan_teacher_batch(V, nan=True):
    rng = np.random.default_rng(0)
    B, T = 4, 3
    teacher = np.full((B, T), np.nan if nan else -2.0, np.float32)  # sampler: -1
    rollouts = RolloutBatch([[5, 6, 7]] * B, rng.integers(3, V, size=(B, T)).tolist(),
                            [[-1.0] * T] * B, ["stop"] * B, [""] * B, 0)
    return build_train_batch(rollouts, TeacherScores(teacher, 1.0), 0, 2, True, 1.0)


def test_non_finite_step_skips_the_update_and_too_many_stop(tiny_cfg, tiny_zoo):
    # no ratio clipping: the batch's made-up sampler log-probs are far from the student's
    cfg = replace(tiny_cfg, loss=replace(tiny_cfg.loss, distill="reverse_kl_pg", clip_eps_low=None,
                                         clip_eps_high=None, tis_cap=None),
                  optim=replace(tiny_cfg.optim, max_bad_steps=2, warmup_steps=0))
    learner = Learner(str(tiny_zoo.student), cfg)
    V = len(learner.tokenizer)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    out = learner.train_step(_nan_teacher_batch(V))
    assert not np.isfinite(out["loss/rows_total"]) or not np.isfinite(out["optim/grad_norm"])
    assert out["optim/skipped"] == 1 and out["learner/step"] == 1
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in learner.model.parameters())
    assert learner.sched.last_epoch == 1  # the LR schedule still follows the step count
    good = learner.train_step(_nan_teacher_batch(V, nan=False))  # a finite step trains again
    assert good["optim/skipped"] == 1 and np.isfinite(good["optim/grad_norm"]) and good["optim/grad_norm"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())
    learner.train_step(_nan_teacher_batch(V))  # one bad step: skipped
    with pytest.raises(BadStepsError, match=r"2 steps in a row .* optim\.max_bad_steps=2"):
        learner.train_step(_nan_teacher_batch(V))
    assert learner.step == 3  # the failed step is not counted: the final checkpoint matches


def test_too_many_bad_steps_stop_the_run_with_a_checkpoint(tiny_overrides, tiny_zoo, tmp_path, monkeypatch):
    over = tiny_overrides + FAST + [f"run_dir={tmp_path}", "steps=5", "checkpoint_every=0", "optim.max_bad_steps=2"]
    real_score, real_train, trained = Workers.score, Workers.train, {"steps": 0}

    def nan_score(self, rollouts, teachers=()):  # the teacher goes bad after the first step
        s = real_score(self, rollouts, teachers)
        if trained["steps"] < 1:
            return s
        return replace(s, full_logprobs_NTV=np.full_like(s.full_logprobs_NTV, np.nan))

    def counting_train(self, batch):
        out = real_train(self, batch)
        trained["steps"] += 1
        return out

    monkeypatch.setattr(Workers, "score", nan_score)
    monkeypatch.setattr(Workers, "train", counting_train)
    with pytest.raises(BadStepsError, match="optim.max_bad_steps=2"):
        run_training(load_config(over))
    steps = _steps(tmp_path)
    assert [(m["step"], m["optim/skipped"]) for m in steps] == [(1, 0.0), (2, 1.0)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


# ------------------------------------------------------------------ timeouts
def test_hung_actor_times_out_with_its_name():
    import ray

    class Sleepy:  # defined here so Ray ships it by value to its worker
        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    # address="local": a Ray of its own, even when another one runs on this machine
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        workers = Workers.__new__(Workers)  # only the plumbing, no models
        workers.use_ray, workers.timeout = True, 1.0
        actor = _Remote(Sleepy, "sleepy", (), {"num_cpus": 0.1})
        # start-up (a new worker process) is not part of the budget under test
        assert workers.gather([(actor, "nap", (0.01,))], timeout=120)[0] == 0.01
        with pytest.raises(ActorError, match=r"sleepy\.nap did not answer within 1s"):
            workers.call(actor, "nap", 30)
        # a request the cluster cannot hold is refused at start, naming the keys
        too_many = load_config(["resources.rollout_workers=3"]).resources  # 3 x 0.5 + 0.5 + 0.5 > 1
        with pytest.raises(ValueError, match=r"ask for 2\.5 CPU \(resources\.rollout_workers x "
                                             r"resources\.rollout_num_cpus.*cluster has 1"):
            check_resources(too_many)
        check_resources(load_config(["resources.rollout_num_cpus=0.2", "resources.teacher_num_cpus=0.2",
                                     "resources.learner_num_cpus=0.2"]).resources)
    finally:
        ray.shutdown()


def test_a_local_ray_that_starts_too_slowly_is_started_again(monkeypatch, capsys):
    import ray

    calls = []

    def slow_init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert start_ray(load_config([]).resources)
    assert calls == ["local", "shutdown", "local"]  # a Ray of its own each time, the failed one shut down
    assert "Ray did not start (The current node timed out during startup.); trying once more" in capsys.readouterr().out
