"""`loggers=[tensorboard,wandb]`: a short toy run with W&B offline, read back from its
`.wandb` file: the same scalars as metrics.jsonl, the config recorded, nothing sent."""

import json
import math

import pytest

from opd.config import load_config
from opd.train import run_training

wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.slow

BLOCK, HEADER, RECORD_HEADER = 32768, 7, 7  # the .wandb file: LevelDB's log format after a 7-byte header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    """The protobuf Records of an offline run's .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), HEADER, b"", []
    assert data[:4] == b":W&B"
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        buf += data[pos + RECORD_HEADER: pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_has_the_metrics_and_config(tiny_overrides, tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: a request would fail
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = load_config(tiny_overrides + [f"run_dir={run_dir}", "resources.use_ray=false", "steps=2", "eval_every=0",
                                        "checkpoint_every=0", "length.reference_prompts=8",
                                        "loggers=[tensorboard,wandb]"])
    run_training(cfg)
    wandb.teardown()  # what a process's exit does: the W&B service writes out all it holds, then stops
    [wandb_file] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = wandb_records(wandb_file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history[int(items["_step"])] = items
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and {m["step"] for m in lines} <= set(history), [r.WhichOneof("record_type") for r in records]
    for m in lines:
        numbers = {k: v for k, v in m.items() if k not in ("step", "events") and isinstance(v, (int, float))}
        got = history[m["step"]]
        assert set(numbers) <= set(got), set(numbers) - set(got)
        for k, v in numbers.items():
            assert math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(v) and math.isnan(got[k])), k
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.config.update})
        if r.WhichOneof("record_type") == "run":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.run.config.update})
    assert config["steps"] == 2 and config["loss"]["distill"] == cfg.loss.distill
    logs = "".join(p.read_text(errors="replace") for p in run_dir.glob("wandb/**/*.log"))
    assert "127.0.0.1:9" not in logs  # no request was made to the (unreachable) server
