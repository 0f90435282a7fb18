"""Tasks: where prompts come from and how answers are checked.

Built-in synthetic tasks with verifiable answers, deterministic from a seed:
- `addition`: "37+58" -> "95" (operands of up to `max_digits` digits), for the toy zoo;
- `reversal`: "abcde" -> "edcba" (lowercase strings of `min_chars`..`max_chars`), toy zoo;
- `arith_chat`: "What is 22 - 11? Reply with the number only." -> "11", a chat question
  that a small real instruct model (SmolLM2-135M-Instruct) can attempt.
Held-out prompts are drawn first and excluded from the train stream, so accuracy on
them measures generalisation, not memorisation.

Answers are checked after *extraction* from the free-text completion (`task.answer_extraction`,
or an `extract` field on a prompt-file line): `exact` (the whole completion, whitespace
normalised), `last_number` (the last number in the text, compared as a number), or
`regex:<pattern>` (the first match; its first group if it has one). A real model's answer is
rarely the bare string.

And a loader for users' JSONL prompt files (`task=file`): one object per line with either
`prompt` (raw text, encoded as is) or `messages` (a chat list, rendered with the
tokenizer's chat template), and optionally `answer`. A bad line is reported with its file
and line number; `on_bad_line` decides whether it stops the run or is skipped and counted.
Nothing is truncated silently: a prompt that cannot fit `max_model_len - max_new_tokens`
tokens is a bad line. Format checks (`opd/formatting.py`, config group `format`) find lines
cut off mid-markup or carrying chat-template leftovers; `format.on_prompt_file` warns about
them (file and line), skips them (counted with the other skipped lines) or refuses the file.

The config's `task` section (TaskConfig, nested by opd/config.py) is defined here, next to
the tasks and choices its fields allow.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import MISSING

from opd.constraints import Rule, between, ge, knob, one_of
from opd.formatting import ACTIONS, check_example


@dataclass(frozen=True)
class Example:
    """One prompt. Exactly one of `messages` / `text` is set."""

    messages: Optional[tuple[tuple[str, str], ...]]  # ((role, content), ...) chat turns
    text: Optional[str]  # a raw prompt, encoded without a chat template
    answer: Optional[str]  # reference answer (None: unchecked)
    source: str  # where it came from: "addition:heldout:3" or "data.jsonl:12"
    extract: str = "exact"  # how the answer is extracted from a completion (see module doc)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in (self.messages or ())]


def user_example(content: str, answer: Optional[str], source: str, extract: str = "exact") -> Example:
    return Example(messages=(("user", content),), text=None, answer=answer, source=source,
                   extract=extract)


def normalize_answer(s: str) -> str:
    return " ".join(s.strip().split())


def exact_match(completion: str, answer: Optional[str]) -> bool:
    """True when the completion equals the answer up to surrounding/duplicate whitespace."""
    return answer is not None and normalize_answer(completion) == normalize_answer(answer)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(s: str) -> Optional[float]:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def check_extraction(how: str) -> str:
    """Return `how` if it names an extraction (`exact`, `last_number`, `regex:<pattern>`
    with a pattern that compiles); else raise ValueError saying what is allowed."""
    if how in ("exact", "last_number"):
        return how
    if how.startswith("regex:"):
        try:
            re.compile(how[len("regex:"):])
        except re.error as e:
            raise ValueError(f"bad regex in {how!r}: {e}") from e
        return how
    raise ValueError(f"must be 'exact', 'last_number' or 'regex:<pattern>', got {how!r}")


def extract_answer(completion: str, how: str) -> Optional[str]:
    """The answer a completion gives, by extraction mode `how` (None: no answer found)."""
    if how == "exact":
        return normalize_answer(completion)
    if how == "last_number":
        found = _NUMBER.findall(completion)
        return found[-1] if found else None
    m = re.search(how[len("regex:"):], completion)
    if m is None:
        return None
    return normalize_answer(m.group(1) if m.groups() else m.group(0))


def answer_correct(completion: str, answer: Optional[str], how: str = "exact") -> bool:
    """True when the answer extracted from `completion` equals the reference `answer`
    (numerically for `last_number`: "11.0" == "11", "1,200" == "1200")."""
    if answer is None:
        return False
    got = extract_answer(completion, how)
    if got is None:
        return False
    if how == "last_number":
        a, b = _as_number(got), _as_number(answer)
        return a is not None and b is not None and a == b
    return got == normalize_answer(answer)


# ------------------------------------------------------------------ built-in tasks
def _addition(rng: random.Random, max_digits: int) -> tuple[str, str]:
    hi = 10**max_digits
    a, b = rng.randrange(hi), rng.randrange(hi)
    return f"{a}+{b}", str(a + b)


def _reversal(rng: random.Random, min_chars: int, max_chars: int) -> tuple[str, str]:
    n = rng.randint(min_chars, max_chars)
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return s, s[::-1]


def _arith_chat(rng: random.Random, max_digits: int) -> tuple[str, str]:
    """A chat arithmetic question; subtraction keeps the result non-negative."""
    hi = 10**max_digits
    a, b = rng.randrange(hi), rng.randrange(hi)
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Reply with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}? Reply with the number only.", str(a - b)


@dataclass
class SyntheticTask:
    """A generator of (question, answer) pairs with disjoint train and held-out splits."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    seed: int
    train_size: int
    heldout_size: int
    extract: str = "exact"
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
        return [user_example(q, a, f"{self.name}:heldout:{i}", self.extract) for i, (q, a) in
                enumerate(self._heldout)]

    def train(self) -> list[Example]:
        held = {ex.chat()[0]["content"] for ex in self.heldout()}
        rng, out, tries = random.Random(f"{self.seed}:train"), [], 0
        while len(out) < self.train_size and tries < self.train_size * 50:
            tries += 1
            q, a = self.make(rng)
            if q not in held:
                out.append(user_example(q, a, f"{self.name}:train:{len(out)}", self.extract))
        if len(out) < self.train_size:
            raise ValueError(f"task.train_size={self.train_size}: only {len(out)} train prompts "
                             f"in {tries} draws (are all {self.name} questions held out?)")
        return out


BUILTIN_TASKS = ("addition", "reversal", "arith_chat")


def build_task(name: str, seed: int, train_size: int, heldout_size: int, max_digits: int = 2,
               min_chars: int = 3, max_chars: int = 6, extract: str = "exact") -> SyntheticTask:
    makers = {
        "addition": lambda rng: _addition(rng, max_digits),
        "reversal": lambda rng: _reversal(rng, min_chars, max_chars),
        "arith_chat": lambda rng: _arith_chat(rng, max_digits),
    }
    if name not in makers:
        raise ValueError(f"task.name must be one of {sorted(makers)} for a built-in task, got {name!r}")
    return SyntheticTask(name, makers[name], seed, train_size, heldout_size, extract)


# Characters the zoo's tokenizer must cover for the built-in tasks (and simple prompts).
TASK_ALPHABET = string.digits + string.ascii_lowercase + "+-*/=?.,:;!'\"()[] "


# ------------------------------------------------------------------ prompt files
ON_BAD_LINE = ("error", "skip")  # a bad prompt-file line stops the run, or is skipped and counted


class DataError(ValueError):
    """A bad line in a prompt file: the message starts with `file:line:`."""


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    warned: list[tuple[int, str]] = field(default_factory=list)  # kept, but malformed (format)

    def summary(self) -> str:
        s = f"{self.path}: {self.loaded} prompts loaded, {len(self.skipped)} lines skipped"
        s += "".join(f"\n  line {n}: {why}" for n, why in self.skipped[:10])
        if self.warned:
            s += f"\n{self.path}: {len(self.warned)} loaded lines fail a format check (format.on_prompt_file=warn)"
            s += "".join(f"\n  line {n}: {why}" for n, why in self.warned[:10])
        return s


@dataclass(frozen=True)
class FormatRule:
    """Format checks on prompt-file lines (`opd/formatting.py`) and what a failing line gets:
    `warn` (kept, reported), `skip` (skipped, reported) or `refuse` (the run stops)."""

    checks: tuple[str, ...] = ()
    action: str = "warn"
    extra_tokens: tuple[str, ...] = ()

    def problem(self, ex: Example) -> Optional[str]:
        if not self.checks:
            return None
        texts = [c for _, c in ex.messages] if ex.messages is not None else [ex.text or ""]
        return check_example(texts, ex.answer, self.checks, self.extra_tokens,
                             raw_prompt=ex.messages is None)


def _parse_line(raw: str, default_extract: str = "exact") -> Example | str:
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
    extract = obj.get("extract", default_extract)
    try:
        check_extraction(extract if isinstance(extract, str) else repr(extract))
    except ValueError as e:
        return f"field 'extract' {e}"
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
        return Example(messages=tuple(turns), text=None, answer=answer, source="", extract=extract)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return f"field 'prompt' must be a string, got {type(obj['prompt']).__name__}"
        if not obj["prompt"].strip():
            return "empty prompt"
        return Example(messages=None, text=obj["prompt"], answer=answer, source="", extract=extract)
    return "missing field: a line needs 'prompt' (string) or 'messages' (chat list)"


def load_prompt_file(path: str | Path, on_bad_line: str = "error",
                     count_tokens: Optional[Callable[[Example], int]] = None,
                     max_prompt_tokens: Optional[int] = None,
                     require_answer: bool = False,
                     extract: str = "exact",
                     fmt: Optional[FormatRule] = None) -> tuple[list[Example], LoadReport]:
    """Read a JSONL prompt file. `count_tokens` + `max_prompt_tokens` reject prompts that
    cannot fit the engine (`max_model_len - max_new_tokens`) instead of truncating them;
    `fmt` runs the format checks on each line."""
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"task.on_bad_line must be one of {list(ON_BAD_LINE)}, got {on_bad_line!r}")
    if fmt is not None and fmt.action not in ACTIONS:
        raise ValueError(f"format.on_prompt_file must be one of {list(ACTIONS)}, got {fmt.action!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    report, out = LoadReport(str(path)), []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            ex = _parse_line(raw, extract)  # an Example, or why the line is bad
            why = ex if isinstance(ex, str) else _unusable(ex, require_answer, count_tokens,
                                                           max_prompt_tokens)
            if why is not None:
                if on_bad_line == "error":
                    raise DataError(f"{path}:{lineno}: {why}")
                report.skipped.append((lineno, why))
            elif fmt is None or _passes_format(fmt, ex, path, lineno, report):
                out.append(replace(ex, source=f"{path.name}:{lineno}"))
    report.loaded = len(out)
    if not out:
        raise DataError(f"{path}: no usable prompt ({len(report.skipped)} lines skipped)")
    return out, report


def _unusable(ex: Example, require_answer: bool, count_tokens: Optional[Callable[[Example], int]],
              max_prompt_tokens: Optional[int]) -> Optional[str]:
    """Why a well-formed line still cannot be used (no answer where one is needed, a prompt
    too long for the engine), or None."""
    if require_answer and ex.answer is None:
        return "missing field 'answer' (held-out prompts need a reference answer)"
    if count_tokens and max_prompt_tokens is not None:
        n = count_tokens(ex)
        if n > max_prompt_tokens:
            return (f"prompt is {n} tokens, more than the {max_prompt_tokens} that fit "
                    f"(rollout.max_model_len - rollout.max_new_tokens); not truncated")
    return None


def _passes_format(fmt: FormatRule, ex: Example, path: Path, lineno: int, report: LoadReport) -> bool:
    """Whether a usable line is kept after the format checks: a failing line is refused
    (DataError), skipped or kept with a warning, as `fmt.action` says; the report counts it."""
    why = fmt.problem(ex)
    if not why:
        return True
    if fmt.action == "refuse":
        raise DataError(f"{path}:{lineno}: {why} (format.on_prompt_file=refuse)")
    (report.skipped if fmt.action == "skip" else report.warned).append((lineno, why))
    return fmt.action != "skip"


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
                       [e.source for e in examples], [e.extract for e in examples])


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of a reference completion, ending with EOS (a trained token)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@dataclass
class TaskConfig:
    """The `task` section of the config (values in conf/task/)."""

    name: str = knob(MISSING, one_of(*BUILTIN_TASKS, "file"))  # a built-in task | "file" (prompt files)
    seed: int = knob(MISSING, ge(0))  # seed of the train/held-out prompt streams
    train_size: int = knob(MISSING, ge(1))  # number of train prompts (built-in tasks)
    heldout_size: int = knob(MISSING, ge(1))  # number of held-out prompts used for exact match
    max_digits: int = knob(MISSING, between(1, 9))  # addition: operands have 1..max_digits digits
    min_chars: int = knob(MISSING, ge(1))  # reversal: shortest string
    max_chars: int = knob(MISSING, ge(1))  # reversal: longest string
    train_file: Optional[str] = None  # task=file: JSONL with `prompt` or `messages`, optional `answer`
    heldout_file: Optional[str] = None  # task=file: held-out JSONL (needs `answer` for exact match)
    on_bad_line: str = knob(MISSING, one_of(*ON_BAD_LINE))  # "error": stop at the first bad line |
    #                                                         "skip": skip and count
    answer_extraction: str = knob("exact", Rule(check_extraction, "must be 'exact', 'last_number' or "
                                                "'regex:<pattern>' (a valid regex)"))  # how answers are read

    def cross_checks(self, prefix: str = "") -> list[str]:
        """The string lengths' order, and a prompt file for task=file."""
        errs = []
        if self.min_chars > self.max_chars:
            errs.append(f"{prefix}min_chars must be <= {prefix}max_chars ({self.max_chars}), got {self.min_chars}")
        if self.name == "file" and not self.train_file:
            errs.append(f"{prefix}train_file must be set when {prefix}name is 'file', got null")
        return errs


def load_splits(task_cfg: TaskConfig, tokenizer: Any = None, max_prompt_tokens: Optional[int] = None,
                fmt: Optional[FormatRule] = None) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for a TaskConfig; `fmt`: format checks on prompt files."""
    if task_cfg.name != "file":
        t = build_task(task_cfg.name, task_cfg.seed, task_cfg.train_size, task_cfg.heldout_size,
                       task_cfg.max_digits, task_cfg.min_chars, task_cfg.max_chars,
                       task_cfg.answer_extraction)
        return t.train(), t.heldout()
    count = (lambda ex: len(encode_prompt(tokenizer, ex))) if tokenizer is not None else None
    train, rep = load_prompt_file(task_cfg.train_file, task_cfg.on_bad_line, count, max_prompt_tokens,
                                  extract=task_cfg.answer_extraction, fmt=fmt)
    if rep.skipped or rep.warned:
        print(rep.summary(), flush=True)
    held: list[Example] = []
    if task_cfg.heldout_file:
        held, rep = load_prompt_file(task_cfg.heldout_file, task_cfg.on_bad_line, count,
                                     max_prompt_tokens, require_answer=True,
                                     extract=task_cfg.answer_extraction, fmt=fmt)
        if rep.skipped or rep.warned:
            print(rep.summary(), flush=True)
    return train[: task_cfg.train_size], held[: task_cfg.heldout_size]


def sample_batch(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    return [examples[rng.randrange(len(examples))] for _ in range(n)]
