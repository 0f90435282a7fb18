"""Chaos: a Ray run in which a rollout worker, one of two teacher replicas and one of two
learner ranks are each killed (SIGKILL) mid-run (the whole learner group is then rebuilt
from the newest checkpoint). The run still finishes its steps, logs each step exactly
once, its rollouts' weight version never goes backwards, only the killed actors are
restarted, and the final student is evaluated."""

import json
import os
import signal

import pytest

from opd.actors import Workers
from opd.config import load_config
from opd.train import run_training

pytestmark = pytest.mark.slow

STEPS = 6


def _kill_on_call(monkeypatch, verb: str, n: int, victim):
    """Before the n-th call of Workers.<verb>, SIGKILL the actor that `victim(workers)` names."""
    real, calls = getattr(Workers, verb), {"n": 0}

    def hooked(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(victim(self).pid(), signal.SIGKILL)
        return real(self, *args)

    monkeypatch.setattr(Workers, verb, hooked)


def test_killed_actors_are_restarted_and_the_run_finishes(tiny_overrides, tiny_zoo, tmp_path, monkeypatch, capsys):
    cfg = load_config(tiny_overrides + [
        f"run_dir={tmp_path}", "resources.use_ray=true", f"steps={STEPS}", "eval_every=0", "checkpoint_every=2",
        "length.reference_prompts=8", "resources.max_actor_restarts=1",
        "resources.teacher_workers=2", "resources.learner_workers=2",  # 5 actors in 2 CPUs
        "resources.teacher_num_cpus=0.25", "resources.learner_num_cpus=0.25"])
    _kill_on_call(monkeypatch, "generate", 3, lambda w: w.rollouts[0])  # call 1 is sampled_before
    _kill_on_call(monkeypatch, "score", 3, lambda w: w.teachers[1])  # teacher-0 keeps serving
    _kill_on_call(monkeypatch, "train", 5, lambda w: w.learners[1])  # restored from step 4's checkpoint
    summary = run_training(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))  # each step exactly once
    versions = [m["rollout/weight_version"] for m in lines]
    assert versions == sorted(versions) and versions[-1] == STEPS - 1, versions
    restarted = [e["actor"] for m in lines for e in m["events"] if e.get("event") == "restart"]
    assert restarted == ["rollout-0", "teacher-1", "learner"]
    assert lines[-1]["fault/restarts"] == 3
    out = capsys.readouterr().out
    for name in ("rollout-0", "teacher-1", "learner"):
        assert f"restarted {name} (1 of at most 1)" in out
    assert "student_after" in json.loads((tmp_path / "summary.json").read_text())
