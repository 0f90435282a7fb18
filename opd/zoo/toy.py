"""The toy zoo: the tokenizer, teacher and student that opd builds for itself, per task.

Nothing can be downloaded on our machines, so `opd-prepare` builds, on a CPU and in a few
minutes, everything the default experiment and the tests need, in Hugging Face format
(`save_pretrained`, safetensors) so that transformers and vLLM load them like any hub model:

- a character-level tokenizer (trained with `tokenizers` as a WordLevel model over the task
  alphabet) with distinct <bos>/<eos>/<pad> tokens and a chat template;
- a teacher (Qwen2 architecture) trained by SFT until its held-out exact match reaches
  `teacher.zoo.stop_at_exact_match`;
- a student that SFT trains only until it reaches a weak start
  (`student.zoo.stop_at_exact_match`), so that distillation has a gap to close: student.zoo's
  own smaller architecture at random (`zoo.student_init=scratch`), or the teacher with only
  some layers kept (`teacher`: `zoo.keep_layers` / `zoo.keep_every`), as the real pair's
  student is, healed by that SFT (docs/results.md §0 compares the two).
  For `task=mixed` (with `zoo.student_init=scratch`) it is one student for all the mixed
  tasks (SFT on their interleaved prompts, stopped once every task has reached the weak
  start), and each teacher is the one of its own task.

Artefacts are keyed by a hash of everything that shapes them (format version, task,
architecture, recipe, `zoo.seed`): reused when present, rebuilt when the config changes,
written atomically, and built reproducibly (`opd/zoo/cache.py`). `zoo.seed` changes a build
(initialisation and data order) without changing the recipe: the default experiment is
measured over several zoo seeds (benchmarks/exp_default.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from opd.tasks import TASK_ALPHABET, Example, TaskConfig, encode_answer, encode_prompt, exact_match
from opd.zoo.cache import MARKER, ZOO_FORMAT, atomic_build, reproducible, spec_hash, weights_sha256
from opd.zoo.layers import drop_layers

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import ZooModelConfig


SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Version of the toy models' build recipe, part of their cache key: bumped when the same
# spec would build other weights (2: fixed build threads, deterministic algorithms, zoo.seed).
TOY_BUILD = 2


# ------------------------------------------------------------------ tokenizer
def build_tokenizer(out_dir: Path, alphabet: str = TASK_ALPHABET) -> None:
    """Train a character-level tokenizer and save it in Hugging Face format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator([alphabet + "\n"] * 2, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=SPECIALS[4:], padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    fast.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps({"kind": "tokenizer", "alphabet": alphabet}))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------ models
def qwen2_config(tokenizer: Any, z: ZooModelConfig, max_positions: int = 256):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=z.hidden, intermediate_size=z.intermediate,
        num_hidden_layers=z.layers, num_attention_heads=z.heads, num_key_value_heads=z.kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")


def encode_sft(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) per example."""
    return [(encode_prompt(tokenizer, ex), encode_answer(tokenizer, ex.answer)) for ex in examples]


def sft_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask, and labels (-100 outside the answer)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(a)
        attn[i, : len(seq)] = 1
    return ids, attn, labels


@torch.no_grad()
def greedy_exact_match(model: Any, tokenizer: Any, examples: Sequence[Example],
                       max_new_tokens: int = 16, batch_size: int = 256) -> float:
    """Held-out exact match with greedy decoding in transformers (left padding)."""
    model.eval()
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        prompts = [encode_prompt(tokenizer, ex) for ex in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        hits += sum(exact_match(t, ex.answer) for t, ex in zip(texts, chunk))
    model.train()
    return hits / max(1, len(examples))


def build_seed(z: ZooModelConfig, zoo_seed: int) -> int:
    """The seed of one model's build: its recipe's seed, moved by `zoo.seed`."""
    return z.seed + 7919 * zoo_seed


def sft_train(tokenizer: Any, z: ZooModelConfig, train: Sequence[Example], heldout: Sequence[Sequence[Example]],
              log_prefix: str, seed: int, model: Any = None) -> tuple[Any, dict]:
    """SFT `model` (default: a new Qwen2 model of `z`'s architecture) with `z`'s recipe until
    the held-out exact match of every task (`heldout`: each task's held-out prompts; one list
    for one task) reaches `z.stop_at_exact_match`, or `z.sft_steps` run out. `seed` sets a new
    model's initialisation (through the caller's `reproducible`) and the data order."""
    from transformers import Qwen2ForCausalLM

    if model is None:
        model = Qwen2ForCausalLM(qwen2_config(tokenizer, z)).float()
    pairs = encode_sft(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=z.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    rng, t0, each, step = random.Random(seed), time.time(), [0.0] * len(heldout), 0
    draw = _weighted_draw(tokenizer, train, z.task_weights, rng) if z.task_weights else None
    model.train()
    for step in range(1, z.sft_steps + 1):
        picked = [draw() if draw else pairs[rng.randrange(len(pairs))] for _ in range(z.batch_size)]
        ids, attn, labels = sft_batch(picked, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % z.eval_every == 0 or step == z.sft_steps:
            each = [greedy_exact_match(model, tokenizer, part) for part in heldout]
            print(f"[{log_prefix}] step {step:5d}  loss {loss.item():.4f}  held-out exact match "
                  f"{' / '.join(f'{e:.3f}' for e in each)}  ({time.time() - t0:.0f}s)", flush=True)
            if min(each) >= z.stop_at_exact_match:
                break
    em = sum(e * len(part) for e, part in zip(each, heldout)) / max(1, sum(map(len, heldout)))
    per_task = {"heldout_exact_match_per_task": each} if len(heldout) > 1 else {}
    return model, {"heldout_exact_match": em, **per_task, "sft_steps": step, "seconds": time.time() - t0}


def _weighted_draw(tokenizer: Any, train: Sequence[Example], weights: Sequence[float], rng: random.Random):
    """A function drawing one SFT pair: a task by `weights` (in the order the tasks' prompts
    first appear), then one of its prompts."""
    by_task: dict[str, list] = {}
    for ex, pair in zip(train, encode_sft(tokenizer, train)):
        by_task.setdefault(ex.source.split(":")[0], []).append(pair)
    if len(weights) != len(by_task):
        raise ValueError(f"zoo task_weights: {len(weights)} weights for {len(by_task)} tasks ({list(by_task)})")
    parts = list(by_task.values())
    return lambda: (lambda part: part[rng.randrange(len(part))])(rng.choices(parts, weights)[0])


# ------------------------------------------------------------------ the zoo
def _task_spec(task_cfg: TaskConfig) -> dict:
    keys = ("name", "seed", "train_size", "heldout_size", "max_digits", "min_chars", "max_chars")
    # a mixed task's models stop SFT once every task reaches the mark; other tasks' keys stay as they were
    mixed = {"mix": list(task_cfg.mix), "stop": "every task"} if task_cfg.name == "mixed" else {}
    return {**{k: getattr(task_cfg, k) for k in keys}, **mixed}


@dataclasses.dataclass(frozen=True)
class LayerDrop:
    """A student that starts as `teacher` (a built zoo model) with only `layers` kept."""

    teacher: Path
    layers: tuple[int, ...]

    def spec(self) -> dict:
        return {"teacher": self.teacher.name, "layers": list(self.layers)}

    def model(self) -> Any:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(self.teacher, dtype=torch.float32)
        return drop_layers(teacher, self.layers)


def model_spec(role: str, task_cfg: TaskConfig, z: ZooModelConfig, tokenizer_dir: Path,
               zoo_seed: int = 0, init: Optional[LayerDrop] = None) -> dict:
    recipe = {k: v for k, v in dataclasses.asdict(z).items() if k != "task_weights" or v}  # [] keeps old keys
    spec = {"format": ZOO_FORMAT, "build": TOY_BUILD, "role": role, "task": _task_spec(task_cfg),
            "zoo": recipe, "zoo_seed": zoo_seed, "tokenizer": tokenizer_dir.name}
    return spec if init is None else {**spec, "init": init.spec()}


def ensure_tokenizer(zoo_dir: str | Path) -> Path:
    spec = {"format": ZOO_FORMAT, "alphabet": TASK_ALPHABET, "specials": SPECIALS,
            "template": CHAT_TEMPLATE}
    final = Path(zoo_dir).expanduser() / f"tokenizer-{spec_hash(spec)}"
    return atomic_build(final, build_tokenizer)


def ensure_model(role: str, zoo_dir: str | Path, task_cfg: TaskConfig, z: ZooModelConfig,
                 tokenizer_dir: Path, zoo_seed: int = 0, init: Optional[LayerDrop] = None) -> Path:
    """Path of the zoo model for (role, task, recipe, zoo seed, starting point); built
    (atomically and reproducibly) if missing: from `init`'s layer-dropped teacher when given,
    else from scratch. Its marker records the SFT result and a weights checksum."""
    from opd.tasks import MixedTask, builtin_task

    spec = model_spec(role, task_cfg, z, tokenizer_dir, zoo_seed, init)
    final = Path(zoo_dir).expanduser() / f"{task_cfg.name}-{role}-{spec_hash(spec)}"

    def build(tmp: Path) -> None:
        tok = load_tokenizer(tokenizer_dir)
        task = builtin_task(dataclasses.replace(task_cfg, answer_extraction="exact"))
        seed = build_seed(z, zoo_seed)
        with reproducible(seed):
            parts = [t.heldout() for t in task.parts] if isinstance(task, MixedTask) else [task.heldout()]
            start = None if init is None else init.model()
            model, stats = sft_train(tok, z, task.train(), parts, f"prepare {role}", seed, start)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        stats["weights_sha256"] = weights_sha256(tmp)
        (tmp / MARKER).write_text(json.dumps({"spec": spec, **stats}, indent=2))

    return atomic_build(final, build)
