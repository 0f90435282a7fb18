"""The learner's checkpoints: a Hugging Face model directory plus the learner's own state.

    <ckpt>/model.safetensors, config.json, tokenizer files   the weights (transformers, vLLM)
    <ckpt>/learner_state.pt    optimizer, LR scheduler, torch RNG (read with weights_only=True)
    <ckpt>/learner_state.json  step, skipped-step counters, Python/numpy RNG, the loop's `extra`

Each checkpoint is written into a hidden sibling directory that is renamed into place once
complete. The Python/numpy RNG states go through the run's one RNG codec
(`opd.run_io.rng_state_to_json`), which the driver loop uses for its own RNG too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd.run_io import rng_state_from_json, rng_state_to_json


def save(ckpt_dir: str | Path, model: Any, tokenizer: Any, opt: torch.optim.Optimizer,
         sched: Any, counters: dict[str, int], extra: dict) -> str:
    """Write a checkpoint: the model and tokenizer (`save_pretrained`), the optimizer and
    scheduler, this process's RNG states, `counters` (step, skipped, bad_in_row) and `extra`
    (JSON: the loop's state). Atomic: a crash mid-save leaves only a hidden `.step-*.tmp`
    directory behind."""
    d = Path(ckpt_dir)
    tmp = d.parent / f".{d.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "learner_state.pt")
    state = {**counters, "python_rng": rng_state_to_json(random.getstate()),
             "numpy_rng": rng_state_to_json(np.random.get_state()), "extra": extra}
    (tmp / "learner_state.json").write_text(json.dumps(state))
    if d.exists():  # the same step saved again (e.g. the final save after an error)
        old = d.parent / f".{d.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(d, old)
        shutil.rmtree(old)
    os.rename(tmp, d)
    return str(d)


def load(ckpt_dir: str | Path, opt: torch.optim.Optimizer, sched: Any) -> tuple[dict[str, int], dict]:
    """Restore the optimizer, scheduler and RNG states saved next to the weights (which the
    learner loaded at start); returns the counters (step, skipped, bad_in_row) and `extra`."""
    d = Path(ckpt_dir)
    st = torch.load(d / "learner_state.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    js = json.loads((d / "learner_state.json").read_text())
    random.setstate(rng_state_from_json(js["python_rng"]))
    np.random.set_state(rng_state_from_json(js["numpy_rng"]))
    counters = {"step": js["step"], "skipped": js.get("skipped", 0), "bad_in_row": js.get("bad_in_row", 0)}
    return counters, js["extra"]
