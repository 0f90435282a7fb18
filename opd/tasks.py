"""Tasks: where prompts come from and how answers are checked.

Built-in synthetic tasks with verifiable answers, deterministic from a seed:
- `addition`: "37+58" -> "95" (operands of up to `max_digits` digits), for the toy zoo;
- `reversal`: "abcde" -> "edcba" (lowercase strings of `min_chars`..`max_chars`), toy zoo;
- `arith_chat`: "What is 22 - 11? Reply with the number only." -> "11", a chat question
  that a small real instruct model (SmolLM2-135M-Instruct) can attempt;
- `mixed`: the built-in tasks of `task.mix` at once, their prompts interleaved (each gives
  `train_size` train and `heldout_size` held-out prompts, the same ones it gives alone).
Held-out prompts are drawn first and excluded from the train stream, so accuracy on
them measures generalisation, not memorisation.

Answers are checked after *extraction* from the free-text completion (`task.answer_extraction`,
or an `extract` field on a prompt-file line): `exact` (the whole completion, whitespace
normalised), `last_number` (the last number in the text, compared as a number), or
`regex:<pattern>` (the first match; its first group if it has one). A real model's answer is
rarely the bare string.

Users' JSONL prompt files (`task=file`) are read by `opd/prompt_files.py`.

With several teachers (the config's `teachers`), each prompt names the one that scores it
(`Example.teacher`): a prompt file's `teacher` field, or for built-in tasks
`task.teacher_by_task` (a mixed task's addition prompts to one teacher, its reversal prompts
to another); `task.default_teacher` where a prompt names none.

The config's `task` section (TaskConfig, nested by opd/config.py) is defined here, next to
the tasks and choices its fields allow.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from omegaconf import MISSING

from opd.constraints import Rule, between, ge, knob, one_of, subset
from opd.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One prompt. Exactly one of `messages` / `text` is set."""

    messages: Optional[tuple[tuple[str, str], ...]]  # ((role, content), ...) chat turns
    text: Optional[str]  # a raw prompt, encoded without a chat template
    answer: Optional[str]  # reference answer (None: unchecked)
    source: str  # where it came from: "addition:heldout:3" or "data.jsonl:12"
    extract: str = "exact"  # how the answer is extracted from a completion (see module doc)
    teacher: Optional[str] = None  # the teacher that scores it (a name in `teachers`); None: the one teacher

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in (self.messages or ())]


def user_example(content: str, answer: Optional[str], source: str, extract: str = "exact",
                 teacher: Optional[str] = None) -> Example:
    return Example(messages=(("user", content),), text=None, answer=answer, source=source,
                   extract=extract, teacher=teacher)


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

    teacher: Optional[str] = None  # the teacher its prompts name (task.teacher_by_task)

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
                raise ConfigError(f"task.heldout_size={self.heldout_size}: only {len(held)} "
                                 f"distinct {self.name} questions found")
            self._heldout = held
        return [user_example(q, a, f"{self.name}:heldout:{i}", self.extract, self.teacher) for i, (q, a) in
                enumerate(self._heldout)]

    def train(self) -> list[Example]:
        held = {ex.chat()[0]["content"] for ex in self.heldout()}
        rng, out, tries = random.Random(f"{self.seed}:train"), [], 0
        while len(out) < self.train_size and tries < self.train_size * 50:
            tries += 1
            q, a = self.make(rng)
            if q not in held:
                out.append(user_example(q, a, f"{self.name}:train:{len(out)}", self.extract, self.teacher))
        if len(out) < self.train_size:
            raise ConfigError(f"task.train_size={self.train_size}: only {len(out)} train prompts "
                             f"in {tries} draws (are all {self.name} questions held out?)")
        return out


@dataclass
class MixedTask:
    """Several synthetic tasks at once: their train and held-out prompts, interleaved
    (a1, r1, a2, r2, ...), so that any prefix of either split holds every task."""

    parts: list[SyntheticTask]

    def train(self) -> list[Example]:
        return _interleave([t.train() for t in self.parts])

    def heldout(self) -> list[Example]:
        return _interleave([t.heldout() for t in self.parts])


def _interleave(lists: list[list[Example]]) -> list[Example]:
    return [ex for row in zip(*lists) for ex in row] + [ex for xs in lists for ex in xs[min(map(len, lists)):]]


BUILTIN_TASKS = ("addition", "reversal", "arith_chat")


def builtin_task(task_cfg: "TaskConfig") -> SyntheticTask | MixedTask:
    """The built-in task of a `task` config (task.mix for `mixed`), each part's prompts naming
    the teacher `task.teacher_by_task` gives it."""
    def one(name: str) -> SyntheticTask:
        t = build_task(name, task_cfg.seed, task_cfg.train_size, task_cfg.heldout_size, task_cfg.max_digits,
                       task_cfg.min_chars, task_cfg.max_chars, task_cfg.answer_extraction)
        t.teacher = task_cfg.teacher_by_task.get(name)
        return t

    return MixedTask([one(n) for n in task_cfg.mix]) if task_cfg.name == "mixed" else one(task_cfg.name)


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

    named = [e.teacher for e in examples if e.teacher is not None]
    if named and len(named) < len(examples):  # load_splits names a teacher for every prompt or none
        raise ValueError("a prompt batch mixes prompts that name a teacher and prompts that do not")
    return PromptBatch([encode_prompt(tokenizer, e) for e in examples], [e.answer for e in examples],
                       [e.source for e in examples], [e.extract for e in examples], named)


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of a reference completion, ending with EOS (a trained token)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@dataclass
class TaskConfig:
    """The `task` section of the config (values in conf/task/)."""

    name: str = knob(MISSING, one_of(*BUILTIN_TASKS, "mixed", "file"))  # a built-in task | "mixed"
    #                                                    (the tasks of task.mix) | "file" (prompt files)
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
    mix: list[str] = knob(rule=subset(*BUILTIN_TASKS), factory=list)  # task=mixed: the built-in tasks mixed
    default_teacher: Optional[str] = None  # the teacher of a prompt that names none (a name in `teachers`)
    teacher_by_task: dict[str, str] = field(default_factory=dict)  # built-in tasks: the teacher of
    #                                   each task's prompts, e.g. {addition: math, reversal: strings}

    def tasks(self) -> list[str]:
        """The built-in tasks whose prompts this task holds ([] for task=file)."""
        return list(self.mix) if self.name == "mixed" else [] if self.name == "file" else [self.name]

    def cross_checks(self, prefix: str = "") -> list[str]:
        """The string lengths' order, a prompt file for task=file, two tasks for task=mixed,
        and a teacher rule only for tasks it holds."""
        errs = []
        if self.name == "mixed" and len(set(self.mix)) < 2:
            errs.append(f"{prefix}mix must list at least two different built-in tasks when {prefix}name "
                        f"is 'mixed', got {self.mix}")
        if stray := sorted(set(self.teacher_by_task) - set(self.tasks())):
            errs.append(f"{prefix}teacher_by_task names tasks that {prefix}name={self.name} does not hold: "
                        f"{stray} (it holds {self.tasks()})")
        if self.min_chars > self.max_chars:
            errs.append(f"{prefix}min_chars must be <= {prefix}max_chars ({self.max_chars}), got {self.min_chars}")
        if self.name == "file" and not self.train_file:
            errs.append(f"{prefix}train_file must be set when {prefix}name is 'file', got null")
        return errs


def sample_batch(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    return [examples[rng.randrange(len(examples))] for _ in range(n)]
