"""Checks at start, before anything slow: every path the config names exists, and the
machine has what the config asks for. Each problem names its config key, in our words
(instead of the hub's "Repo id must be in the form ..." minutes later).

    check_start(cfg)   # raises ConfigError listing every problem
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from opd.config import ConfigError
from opd.run_io import check_loggers, checkpoint_problem

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as the hub spells repo ids


def check_start(cfg: TrainConfig) -> None:
    # a served teacher's path names the served model, not a local one
    keys = [("student.path", cfg.student.path)] + [(f"{cfg.teacher_key(n)}.path", t.path) for n, t in
                                                   cfg.teacher_configs().items() if t.backend != "server"]
    errs = [e for e in (_model_problem(key, path) for key, path in keys) if e]
    errs += _prompt_file_problems(cfg.task)
    if cfg.resume and cfg.resume != "auto" and (why := checkpoint_problem(Path(cfg.resume))):
        errs.append(f"resume={cfg.resume}: {why}")
    errs += _gpu_problems(cfg)
    if errs:
        raise ConfigError("cannot start:\n  " + "\n  ".join(errs))
    check_loggers(cfg.loggers)


def _model_problem(key: str, path: Optional[str]) -> Optional[str]:
    """None (the zoo model), an existing directory, or a reachable hub id."""
    if path is None or Path(path).expanduser().is_dir():
        return None
    if not HUB_ID.match(path) or ".." in path:
        return f"{key}: {path} is not a directory (and not a Hugging Face hub id)"
    why = _hub_problem(path)
    return f"{key}: {path} is not a directory, and as a Hugging Face hub id: {why}" if why else None


def _hub_problem(repo: str) -> Optional[str]:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    try:
        model_info(repo, timeout=10)
    except GatedRepoError:
        return None  # exists; the loader will ask for a token
    except RepositoryNotFoundError:
        return "no such model on the hub"
    except Exception as e:  # noqa: BLE001 - any network failure means the same here
        return f"not in the local cache and the hub is unreachable ({type(e).__name__})"
    return None


def _prompt_file_problems(task: Any) -> list[str]:
    if task.name != "file":
        return []
    return [f"task.{key}: {path} does not exist (a JSONL prompt file)"
            for key, path in (("train_file", task.train_file), ("heldout_file", task.heldout_file))
            if path and not Path(path).expanduser().is_file()]


def _gpu_problems(cfg: TrainConfig) -> list[str]:
    """A GPU config on a machine without one. On a Ray cluster (RAY_ADDRESS) the GPUs may be
    on other nodes: `opd.actors.check_resources` checks the cluster instead."""
    import torch

    if torch.cuda.is_available() or os.environ.get("RAY_ADDRESS"):
        return []
    r = cfg.resources
    keys = [f"resources.{k}={getattr(r, k):g}" for k in
            ("rollout_num_gpus", "teacher_num_gpus", "learner_num_gpus") if getattr(r, k) > 0]
    if cfg.optim.device == "cuda":
        keys.append("optim.device=cuda")
    if not keys:
        return []
    return [f"{', '.join(keys)}: this machine has no GPU (torch.cuda.is_available() is False); "
            f"on CPU use resources=local optim.device=auto"]
