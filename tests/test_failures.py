"""Nothing is lost: an actor error mid-run leaves a final checkpoint that `resume=auto`
continues from, and a hung Ray actor becomes a clear, named timeout instead of a hang."""

import json
import time

import pytest

from opd.actors import ActorError, Workers, _Remote, check_resources
from opd.config import load_config
from opd.train import run_training

pytestmark = pytest.mark.slow


def test_error_mid_run_saves_checkpoint_and_resume_auto_continues(tiny_overrides, tiny_zoo, tmp_path, monkeypatch):
    over = tiny_overrides + [f"run_dir={tmp_path}", "resources.use_ray=false", "steps=4", "eval_every=0",
                             "checkpoint_every=0", "length.reference_prompts=8"]
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
    summary = run_training(load_config(over + ["resume=auto"]))
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()
    assert summary["student_before"] >= 0  # carried over from the interrupted run


def test_hung_actor_times_out_with_its_name():
    import ray

    class Sleepy:  # defined here so Ray ships it by value to its worker
        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        workers = Workers.__new__(Workers)  # only the plumbing, no models
        workers.use_ray, workers.timeout = True, 1.0
        actor = _Remote(ray.remote(Sleepy).options(num_cpus=0.1).remote(), "sleepy")
        assert workers.call(actor, "nap", 0.01) == 0.01
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
