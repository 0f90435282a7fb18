"""The run directory: every scalar of metrics.jsonl also lands in TensorBoard's event files
under the same name, W&B is optional, and incomplete checkpoints are refused by name."""

import json

import numpy as np
import pytest

from opd.run_io import RunDir, check_loggers, checkpoint_problem, resolve_resume
from opd.types import StepMetrics


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    steps = [StepMetrics(s, {"teacher/kl": float(rng.normal()), "loss/rows_total": float(rng.normal()),
                             "length/mean": float(rng.integers(1, 50))},
                         [{"step": s, "condition": "truncation", "state": "on", "reason": "x"}])
             for s in (1, 2, 3)]
    run = RunDir(tmp_path, loggers=["tensorboard"])
    for m in steps:
        run.log(m)
    run.log(StepMetrics(3, {"eval/exact_match": 0.4}))
    run.close()
    got = _scalars(tmp_path / "tb")
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(got) == {"teacher/kl", "loss/rows_total", "length/mean", "eval/exact_match"}
    for name in ("teacher/kl", "loss/rows_total", "length/mean"):
        # TensorBoard stores float32: compare with the float32 of what metrics.jsonl holds
        assert got[name] == [(l["step"], float(np.float32(l[name]))) for l in lines if name in l]
    assert got["eval/exact_match"] == [(3, float(np.float32(0.4)))]


def test_resume_drops_redone_steps_from_tensorboard(tmp_path, monkeypatch):
    run = RunDir(tmp_path, loggers=["tensorboard"])
    for s in (1, 2, 3):
        run.log(StepMetrics(s, {"loss/rows_total": float(s)}))
    run.close()
    # TensorBoard reads event files in name order, and a name starts with the writer's second
    # and ends with a per-process counter ("...9" sorts after "...10"): a resumed run is a
    # later process, so its file comes later; here, in one process, move its clock on.
    import time

    later = time.time() + 10
    monkeypatch.setattr(time, "time", lambda: later)
    resumed = RunDir(tmp_path, loggers=["tensorboard"])
    resumed.truncate_metrics(1)  # resume from the checkpoint of step 1: steps 2, 3 are redone
    resumed.log(StepMetrics(2, {"loss/rows_total": 20.0}))
    resumed.close()
    assert _scalars(tmp_path / "tb")["loss/rows_total"] == [(1, 1.0), (2, 20.0)]


def test_no_loggers_no_tb_dir(tmp_path):
    run = RunDir(tmp_path)
    run.log(StepMetrics(1, {"loss/rows_total": 1.0}))
    run.close()
    assert not (tmp_path / "tb").exists()


def test_wandb_asked_for_but_missing_names_the_key(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"loggers: 'wandb' is listed but the wandb package is not installed"):
        check_loggers(["tensorboard", "wandb"])
    check_loggers(["tensorboard"])


def test_checkpoint_problems_name_what_is_missing(tmp_path):
    assert checkpoint_problem(tmp_path / "nope") == "no such checkpoint directory"
    ck = tmp_path / "step-000002"
    ck.mkdir()
    assert "no learner_state.json" in checkpoint_problem(ck)
    (ck / "learner_state.json").write_text("{}")
    assert checkpoint_problem(ck) == "learner_state.pt is missing"
    (ck / "learner_state.pt").write_bytes(b"")
    assert "no model weights" in checkpoint_problem(ck)
    (ck / "model.safetensors").write_bytes(b"")
    assert "model.safetensors is unreadable" in checkpoint_problem(ck)  # an empty file is no model
    with pytest.raises(FileNotFoundError, match=r"resume=.*nope: no such checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), RunDir(tmp_path / "run"))


def test_rng_states_survive_json():
    """The one RNG codec: Python's and numpy's generators continue identically after a JSON
    round trip of their states (as the loop's and the learner's checkpoints store them)."""
    import random

    from opd.run_io import rng_state_from_json, rng_state_to_json

    py, rs = random.Random(7), np.random.RandomState(7)
    py.random(), rs.normal()  # mid-stream, with numpy's cached Gaussian set
    py_js = json.loads(json.dumps(rng_state_to_json(py.getstate())))
    np_js = json.loads(json.dumps(rng_state_to_json(rs.get_state())))
    expected = ([py.random() for _ in range(3)], rs.normal(size=3).tolist())
    py2, rs2 = random.Random(), np.random.RandomState()
    py2.setstate(rng_state_from_json(py_js))
    rs2.set_state(rng_state_from_json(np_js))
    assert ([py2.random() for _ in range(3)], rs2.normal(size=3).tolist()) == expected
