"""The zoo's cache: artefacts keyed by a hash of their spec, built atomically, reproducibly,
and marked with a checksum of their weights.

- `atomic_build` builds into a temporary directory and renames it into place, so a prepare
  killed halfway never leaves a model that a later run would load; a finished artefact
  (one whose marker file exists) is reused.
- `reproducible` is the context every model build runs in: a fixed thread count
  (`BUILD_THREADS`, whatever the machine's core count), deterministic algorithms and a seeded
  torch RNG. On CPUs of one instruction set this makes two builds of one spec bit-identical;
  across CPU types (another vector width, another BLAS kernel) float rounding can differ, and
  the builds then differ by rounding that the SFT steps accumulate.
- `weights_sha256` is recorded in each model's marker, so two machines can tell whether they
  built the same models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

ZOO_FORMAT = 1
MARKER = "opd_zoo.json"  # written last inside a finished artefact
BUILD_THREADS = 2  # torch threads of every build: part of what makes a build repeatable


@dataclass(frozen=True)
class ZooPaths:
    tokenizer: Path
    teacher: Optional[Path]  # None with several teachers (`teachers`): each is built by name
    student: Path


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def atomic_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result into place; reuse a finished artefact."""
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # a half-written leftover from an old layout, or a lost race
            if (final / MARKER).is_file():
                return final
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Fixed threads, deterministic algorithms and a seeded torch RNG for one build; the
    caller's settings are restored afterwards."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over every tensor of the directory's safetensors files (name, dtype, shape and
    bytes, in name order): equal for equal weights, whatever the file layout."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def zoo_info(model_dir: str | Path) -> Optional[dict]:
    p = Path(model_dir) / MARKER
    return json.loads(p.read_text()) if p.is_file() else None
