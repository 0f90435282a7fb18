"""The learner's checkpoints: a Hugging Face model directory plus the learner's own state.

    <ckpt>/model.safetensors, config.json, tokenizer files   the weights (transformers, vLLM)
    <ckpt>/learner_state.pt    optimizer, LR scheduler, torch RNG (read with weights_only=True)
    <ckpt>/learner_state.json  step, skipped-step counters, Python/numpy RNG, the loop's `extra`
    <ckpt>/adapter/            a LoRA student's adapter in peft's format (the weights above: merged)

The weights and the AdamW moments are whole tensors under the model's parameter names, so a
checkpoint does not depend on how many ranks wrote it: a run saved by N learner ranks resumes
on M. A sharded learner gathers them first (`full_weights`, `optimizer_by_name`: collectives
every rank calls) and rank 0 writes; at load every rank takes its own shard (`load`).

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
from typing import Any, Callable, Optional

import numpy as np
import torch

from opd.learner.shard import full_tensor, like
from opd.run_io import rng_state_from_json, rng_state_to_json


def full_weights(model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """{name: whole CPU tensor in `dtype`} of the model's state dict (the names `keep`s); a
    tied weight is one tensor under both names (a collective when sharded)."""
    out, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not keep(name):
            continue
        if id(t) not in seen:
            seen[id(t)] = full_tensor(t.detach()).to(dtype).contiguous().cpu()
        out[name] = seen[id(t)]
    return out


def optimizer_by_name(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state with each parameter's moments whole, under its name, and its
    param groups' settings (a collective when sharded)."""
    state = {name: {k: full_tensor(v).cpu() for k, v in opt.state[p].items()}
             for name, p in model.named_parameters() if p in opt.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    """Restore `optimizer_by_name`'s state: each parameter's moments laid out as the parameter
    is (this rank's shard when sharded)."""
    for name, p in model.named_parameters():
        if name in saved["state"]:
            opt.state[p] = {k: like(v, p) for k, v in saved["state"][name].items()}
    for g, s in zip(opt.param_groups, saved["param_groups"]):
        g.update(s)


def save(ckpt_dir: str | Path, model: Any, tokenizer: Any, weights: dict[str, torch.Tensor], optimizer: dict,
         sched: Any, counters: dict[str, int], extra: dict,
         also: Optional[Callable[[Path], None]] = None) -> str:
    """Write a checkpoint: the model's config, `weights` and the tokenizer (`save_pretrained`),
    the optimizer (`optimizer_by_name`) and scheduler, this process's RNG states, `counters`
    (step, skipped, bad_in_row) and `extra` (JSON: the loop's state); `also` writes more
    files into the directory (a LoRA student's adapter). Atomic: a crash mid-save
    leaves only a hidden `.step-*.tmp` directory behind."""
    d = Path(ckpt_dir)
    tmp = d.parent / f".{d.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    source = Path(getattr(tokenizer, "name_or_path", "")) / "tokenizer.json"
    if source.is_file():  # the student's own file: a re-save may change the tokenizer's model type
        shutil.copyfile(source, tmp / "tokenizer.json")
    torch.save({"optimizer": optimizer, "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "learner_state.pt")
    state = {**counters, "python_rng": rng_state_to_json(random.getstate()),
             "numpy_rng": rng_state_to_json(np.random.get_state()), "extra": extra}
    (tmp / "learner_state.json").write_text(json.dumps(state))
    if also is not None:
        also(tmp)
    if d.exists():  # the same step saved again (e.g. the final save after an error)
        old = d.parent / f".{d.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(d, old)
        shutil.rmtree(old)
    os.rename(tmp, d)
    return str(d)


def load(ckpt_dir: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
         sched: Any) -> tuple[dict[str, int], dict]:
    """Restore the optimizer, scheduler and RNG states saved next to the weights (which the
    learner loaded at start); returns the counters (step, skipped, bad_in_row) and `extra`."""
    d = Path(ckpt_dir)
    st = torch.load(d / "learner_state.pt", weights_only=True, map_location="cpu")
    load_optimizer(model, opt, st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    js = json.loads((d / "learner_state.json").read_text())
    random.setstate(rng_state_from_json(js["python_rng"]))
    np.random.set_state(rng_state_from_json(js["numpy_rng"]))
    counters = {"step": js["step"], "skipped": js.get("skipped", 0), "bad_in_row": js.get("bad_in_row", 0)}
    return counters, js["extra"]
