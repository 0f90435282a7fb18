"""Start-up checks in our own words: each problem names its config key."""

import pytest

from opd.config import ConfigError, load_config
from opd.preflight import check_start


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _problems(overrides):
    with pytest.raises(ConfigError) as e:
        check_start(load_config(overrides))
    return str(e.value)


def test_model_path_neither_dir_nor_hub_id(tmp_path):
    msg = _problems([f"student.path={tmp_path}/x/y", "teacher.path=./not/a/../hub"])
    assert f"student.path: {tmp_path}/x/y is not a directory (and not a Hugging Face hub id)" in msg
    assert "teacher.path: ./not/a/../hub is not a directory (and not a Hugging Face hub id)" in msg


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    msg = _problems(["teacher.path=some-org/no-such-model-xyz"])
    assert ("teacher.path: some-org/no-such-model-xyz is not a directory, and as a Hugging Face hub id: "
            "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set") in msg
    assert "student.path" not in msg  # null: the zoo's model


def test_existing_dirs_pass(tmp_path):
    check_start(load_config([f"student.path={tmp_path}", f"teacher.path={tmp_path}"]))


def test_missing_prompt_files_are_named(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "hi"}\n')
    msg = _problems(["task=file", f"task.train_file={tmp_path}/nope.jsonl", f"task.heldout_file={tmp_path}/held.jsonl",
                     f"student.path={tmp_path}", f"teacher.path={tmp_path}"])
    assert f"task.train_file: {tmp_path}/nope.jsonl does not exist" in msg
    assert f"task.heldout_file: {tmp_path}/held.jsonl does not exist" in msg
    check_start(load_config(["task=file", f"task.train_file={train}", f"student.path={tmp_path}",
                             f"teacher.path={tmp_path}"]))


def test_missing_or_incomplete_checkpoint_names_resume(tmp_path):
    assert f"resume={tmp_path}/gone: no such checkpoint directory" in _problems([f"resume={tmp_path}/gone"])
    (tmp_path / "learner_state.json").write_text("{}")
    assert f"resume={tmp_path}: learner_state.pt is missing" in _problems([f"resume={tmp_path}"])
    (tmp_path / "learner_state.pt").write_bytes(b"")
    assert f"resume={tmp_path}: model.safetensors is missing (incomplete checkpoint: no model weights)" in _problems(
        [f"resume={tmp_path}"])


def test_gpu_config_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _problems(["resources=gpu"])
    assert ("resources.rollout_num_gpus=1, resources.teacher_num_gpus=1, resources.learner_num_gpus=1: "
            "this machine has no GPU") in msg
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # the GPUs may be on the cluster's other nodes
    check_start(load_config(["resources=gpu"]))
