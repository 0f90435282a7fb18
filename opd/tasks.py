"""Tasks: where prompts come from and how answers are checked.

Two built-in synthetic tasks with verifiable answers, deterministic from a seed:
- `addition`: "37+58" -> "95" (operands of up to `max_digits` digits);
- `reversal`: "abcde" -> "edcba" (lowercase strings of `min_chars`..`max_chars`).
Held-out prompts are drawn first and excluded from the train stream, so exact match on
them measures generalisation, not memorisation.

And a loader for users' JSONL prompt files (`task=file`): one object per line with either
`prompt` (raw text, encoded as is) or `messages` (a chat list, rendered with the
tokenizer's chat template), and optionally `answer`. A bad line is reported with its file
and line number; `on_bad_line` decides whether it stops the run or is skipped and counted.
Nothing is truncated silently: a prompt that cannot fit `max_model_len - max_new_tokens`
tokens is a bad line.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Example:
    """One prompt. Exactly one of `messages` / `text` is set."""

    messages: Optional[tuple[tuple[str, str], ...]]  # ((role, content), ...) chat turns
    text: Optional[str]  # a raw prompt, encoded without a chat template
    answer: Optional[str]  # reference answer for exact match (None: unchecked)
    source: str  # where it came from: "addition:heldout:3" or "data.jsonl:12"

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in (self.messages or ())]


def user_example(content: str, answer: Optional[str], source: str) -> Example:
    return Example(messages=(("user", content),), text=None, answer=answer, source=source)


def normalize_answer(s: str) -> str:
    return " ".join(s.strip().split())


def exact_match(completion: str, answer: Optional[str]) -> bool:
    """True when the completion equals the answer up to surrounding/duplicate whitespace."""
    return answer is not None and normalize_answer(completion) == normalize_answer(answer)


# ------------------------------------------------------------------ built-in tasks
def _addition(rng: random.Random, max_digits: int) -> tuple[str, str]:
    hi = 10**max_digits
    a, b = rng.randrange(hi), rng.randrange(hi)
    return f"{a}+{b}", str(a + b)


def _reversal(rng: random.Random, min_chars: int, max_chars: int) -> tuple[str, str]:
    n = rng.randint(min_chars, max_chars)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return s, s[::-1]


@dataclass
class SyntheticTask:
    """A generator of (question, answer) pairs with disjoint train and held-out splits."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    seed: int
    train_size: int
    heldout_size: int
    _heldout: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def heldout(self) -> list[Example]:
        if not self._heldout:
            rng, seen, held = random.Random(f"{self.seed}:heldout"), set(), []
            for _ in range(self.heldout_size * 50):
                q, a = self.make(rng)
                if q not in seen:
                    seen.add(q)
                    held.append((q, a))
                if len(held) == self.heldout_size:
                    break
            if len(held) < self.heldout_size:  # never return fewer than asked for silently
                raise ValueError(f"task.heldout_size={self.heldout_size}: only {len(held)} "
                                 f"distinct {self.name} questions found")
            self._heldout = held
        return [user_example(q, a, f"{self.name}:heldout:{i}") for i, (q, a) in
                enumerate(self._heldout)]

    def train(self) -> list[Example]:
        held = {ex.chat()[0]["content"] for ex in self.heldout()}
        rng, out, tries = random.Random(f"{self.seed}:train"), [], 0
        while len(out) < self.train_size and tries < self.train_size * 50:
            tries += 1
            q, a = self.make(rng)
            if q not in held:
                out.append(user_example(q, a, f"{self.name}:train:{len(out)}"))
        if len(out) < self.train_size:
            raise ValueError(f"task.train_size={self.train_size}: only {len(out)} train prompts "
                             f"in {tries} draws (are all {self.name} questions held out?)")
        return out


def build_task(name: str, seed: int, train_size: int, heldout_size: int, max_digits: int = 2,
               min_chars: int = 3, max_chars: int = 6) -> SyntheticTask:
    makers = {
        "addition": lambda rng: _addition(rng, max_digits),
        "reversal": lambda rng: _reversal(rng, min_chars, max_chars),
    }
    if name not in makers:
        raise ValueError(f"task.name must be one of {sorted(makers)} for a built-in task, got {name!r}")
    return SyntheticTask(name, makers[name], seed, train_size, heldout_size)


# Characters the zoo's tokenizer must cover for the built-in tasks (and simple prompts).
TASK_ALPHABET = string.digits + string.ascii_lowercase + "+-*/=?.,:;!'\"()[] "


# ------------------------------------------------------------------ prompt files
class DataError(ValueError):
    """A bad line in a prompt file: the message starts with `file:line:`."""


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def summary(self) -> str:
        s = f"{self.path}: {self.loaded} prompts loaded, {len(self.skipped)} lines skipped"
        return s + "".join(f"\n  line {n}: {why}" for n, why in self.skipped[:10])


def _parse_line(raw: str) -> Example | str:
    """Parse one JSONL line; returns an Example (source unset) or the reason it is bad."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        return f"field 'answer' must be a string, got {type(answer).__name__}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' must be a non-empty list of {role, content} objects"
        turns = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
            turns.append((m["role"], m["content"]))
        if not any(c.strip() for _, c in turns):
            return "empty prompt: every message content is blank"
        return Example(messages=tuple(turns), text=None, answer=answer, source="")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return f"field 'prompt' must be a string, got {type(obj['prompt']).__name__}"
        if not obj["prompt"].strip():
            return "empty prompt"
        return Example(messages=None, text=obj["prompt"], answer=answer, source="")
    return "missing field: a line needs 'prompt' (string) or 'messages' (chat list)"


def load_prompt_file(path: str | Path, on_bad_line: str = "error",
                     count_tokens: Optional[Callable[[Example], int]] = None,
                     max_prompt_tokens: Optional[int] = None,
                     require_answer: bool = False) -> tuple[list[Example], LoadReport]:
    """Read a JSONL prompt file. `count_tokens` + `max_prompt_tokens` reject prompts that
    cannot fit the engine (`max_model_len - max_new_tokens`) instead of truncating them."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"task.on_bad_line must be one of ['error', 'skip'], got {on_bad_line!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    report, out = LoadReport(str(path)), []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            ex = _parse_line(raw)
            if isinstance(ex, Example) and require_answer and ex.answer is None:
                ex = "missing field 'answer' (held-out prompts need a reference answer)"
            if isinstance(ex, Example) and count_tokens and max_prompt_tokens is not None:
                n = count_tokens(ex)
                if n > max_prompt_tokens:
                    ex = (f"prompt is {n} tokens, more than the {max_prompt_tokens} that fit "
                          f"(rollout.max_model_len - rollout.max_new_tokens); not truncated")
            if isinstance(ex, str):
                if on_bad_line == "error":
                    raise DataError(f"{path}:{lineno}: {ex}")
                report.skipped.append((lineno, ex))
                continue
            out.append(Example(ex.messages, ex.text, ex.answer, f"{path.name}:{lineno}"))
    report.loaded = len(out)
    if not out:
        raise DataError(f"{path}: no usable prompt ({len(report.skipped)} lines skipped)")
    return out, report


# ------------------------------------------------------------------ encoding
def encode_prompt(tokenizer: Any, ex: Example) -> list[int]:
    """Token ids of a prompt: chat turns through the chat template (with the generation
    prompt), raw text through the tokenizer with its usual special tokens."""
    if ex.messages is not None:
        text = tokenizer.apply_chat_template(ex.chat(), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(ex.text)["input_ids"])


def prompt_batch(tokenizer: Any, examples: Sequence[Example]):
    """The typed PromptBatch of some examples (chat template applied)."""
    from opd.types import PromptBatch

    return PromptBatch([encode_prompt(tokenizer, e) for e in examples], [e.answer for e in examples],
                       [e.source for e in examples])


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of a reference completion, ending with EOS (a trained token)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def load_splits(task_cfg: Any, tokenizer: Any = None,
                max_prompt_tokens: Optional[int] = None) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for a TaskConfig."""
    if task_cfg.name != "file":
        t = build_task(task_cfg.name, task_cfg.seed, task_cfg.train_size, task_cfg.heldout_size,
                       task_cfg.max_digits, task_cfg.min_chars, task_cfg.max_chars)
        return t.train(), t.heldout()
    count = (lambda ex: len(encode_prompt(tokenizer, ex))) if tokenizer is not None else None
    train, rep = load_prompt_file(task_cfg.train_file, task_cfg.on_bad_line, count, max_prompt_tokens)
    if rep.skipped:
        print(rep.summary(), flush=True)
    held: list[Example] = []
    if task_cfg.heldout_file:
        held, rep = load_prompt_file(task_cfg.heldout_file, task_cfg.on_bad_line, count,
                                     max_prompt_tokens, require_answer=True)
        if rep.skipped:
            print(rep.summary(), flush=True)
    return train[: task_cfg.train_size], held[: task_cfg.heldout_size]


def sample_batch(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    return [examples[rng.randrange(len(examples))] for _ in range(n)]
