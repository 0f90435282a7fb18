"""Users' prompt files, and the train / held-out splits of a task.

A loader for users' JSONL prompt files (`task=file`): one object per line with either
`prompt` (raw text, encoded as is) or `messages` (a chat list, rendered with the
tokenizer's chat template), and optionally `answer`. A bad line is reported with its file
and line number; `on_bad_line` decides whether it stops the run or is skipped and counted.
Nothing is truncated silently: a prompt that cannot fit `max_model_len - max_new_tokens`
tokens is a bad line. Format checks (`opd/formatting.py`, config group `format`) find lines
cut off mid-markup or carrying chat-template leftovers; `format.on_prompt_file` warns about
them (file and line), skips them (counted with the other skipped lines) or refuses the file.

With several teachers, a line may name the one that scores it (`"teacher": "math"`); a line
that names none gets `task.default_teacher`. A name that is not in `teachers` (or a line
with none, and no default) stops the run with the file and line, whatever `on_bad_line`
says: the file and the config disagree, the line itself is fine (`TeacherRoute`).

`load_splits` gives the (train, held-out) examples of a `task` config: a built-in task's
streams, or the prompt files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from opd.errors import UserError
from opd.formatting import ACTIONS, check_example
from opd.tasks import ON_BAD_LINE, Example, TaskConfig, builtin_task, check_extraction, encode_prompt


class DataError(UserError, ValueError):
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


@dataclass(frozen=True)
class TeacherRoute:
    """Which teachers a prompt may name (`teachers`' names; empty: the one teacher, unnamed)
    and the one it gets when it names none (`task.default_teacher`)."""

    names: tuple[str, ...] = ()
    default: Optional[str] = None

    def teacher(self, named: Optional[str]) -> str | None:
        """The teacher of a prompt that names `named` (None: no name); ValueError if there is none."""
        if not self.names:
            if named is not None:
                raise ValueError(f"names teacher {named!r}, but the config has no `teachers` (one teacher, "
                                 f"unnamed): add teachers.{named}, or drop the field")
            return None
        if named is None and self.default is None:
            raise ValueError(f"names no teacher and task.default_teacher is null; name one of {list(self.names)}")
        name = self.default if named is None else named
        if name not in self.names:
            raise ValueError(f"names teacher {name!r}, which is not one of the configured teachers "
                             f"{list(self.names)}")
        return name

    def route(self, examples: Sequence[Example], where: Callable[[Example], str]) -> list[Example]:
        """Each example with its teacher; DataError naming `where(example)` (file:line) otherwise."""
        out = []
        for ex in examples:
            try:
                out.append(replace(ex, teacher=self.teacher(ex.teacher)))
            except ValueError as e:
                raise DataError(f"{where(ex)}: {e}") from None
        return out


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
    teacher = obj.get("teacher")
    if teacher is not None and not (isinstance(teacher, str) and teacher):
        return f"field 'teacher' must be a teacher's name (a non-empty string), got {teacher!r}"
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
        return Example(messages=tuple(turns), text=None, answer=answer, source="", extract=extract,
                       teacher=teacher)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return f"field 'prompt' must be a string, got {type(obj['prompt']).__name__}"
        if not obj["prompt"].strip():
            return "empty prompt"
        return Example(messages=None, text=obj["prompt"], answer=answer, source="", extract=extract,
                       teacher=teacher)
    return "missing field: a line needs 'prompt' (string) or 'messages' (chat list)"


def load_prompt_file(path: str | Path, on_bad_line: str = "error",
                     count_tokens: Optional[Callable[[Example], int]] = None,
                     max_prompt_tokens: Optional[int] = None,
                     require_answer: bool = False,
                     extract: str = "exact",
                     fmt: Optional[FormatRule] = None,
                     route: TeacherRoute = TeacherRoute()) -> tuple[list[Example], LoadReport]:
    """Read a JSONL prompt file. `count_tokens` + `max_prompt_tokens` reject prompts that
    cannot fit the engine (`max_model_len - max_new_tokens`) instead of truncating them;
    `fmt` runs the format checks on each line; `route` gives each line its teacher."""
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
                out += route.route([replace(ex, source=f"{path.name}:{lineno}")], lambda _: f"{path}:{lineno}")
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
        return too_long(count_tokens(ex), max_prompt_tokens)
    return None


def too_long(n: int, max_prompt_tokens: int) -> Optional[str]:
    """Why a prompt of `n` tokens cannot be used (it does not fit the engine), or None."""
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


def load_splits(task_cfg: TaskConfig, tokenizer: Any = None, max_prompt_tokens: Optional[int] = None,
                fmt: Optional[FormatRule] = None,
                teachers: Sequence[str] = ()) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for a TaskConfig, each naming its teacher (one of
    `teachers`; none when that is empty); `fmt`: format checks on prompt files."""
    route = TeacherRoute(tuple(teachers), task_cfg.default_teacher if teachers else None)
    if task_cfg.name != "file":
        t, where = builtin_task(task_cfg), lambda ex: f"task {ex.source} (task.teacher_by_task)"
        return route.route(t.train(), where), route.route(t.heldout(), where)
    count = (lambda ex: len(encode_prompt(tokenizer, ex))) if tokenizer is not None else None
    train, rep = load_prompt_file(task_cfg.train_file, task_cfg.on_bad_line, count, max_prompt_tokens,
                                  extract=task_cfg.answer_extraction, fmt=fmt, route=route)
    if rep.skipped or rep.warned:
        print(rep.summary(), flush=True)
    held: list[Example] = []
    if task_cfg.heldout_file:
        held, rep = load_prompt_file(task_cfg.heldout_file, task_cfg.on_bad_line, count,
                                     max_prompt_tokens, require_answer=True,
                                     extract=task_cfg.answer_extraction, fmt=fmt, route=route)
        if rep.skipped or rep.warned:
            print(rep.summary(), flush=True)
    return train[: task_cfg.train_size], held[: task_cfg.heldout_size]
