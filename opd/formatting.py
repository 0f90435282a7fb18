"""Format checks: text that was cut off mid-markup, or carries leftovers of a chat template.

Practitioners who train small chat models found replies cut off mid-markup (an unbalanced
`*` or `"`) and pruned such lines from their data. In distillation this matters twice: in the
prompt files a user brings (`opd/tasks.py` reports a bad line by file and line and warns,
skips or refuses it), and in the student's own rollouts, where broken formatting is an early
sign of degeneration (`opd/loop.py` logs `format/bad_frac` and `format/<check>` per step and,
under `length.mode=auto`, prefers a malformed rollout as SMPO's rejected and down-weights it
in the sequence-level term through the length monitor's PenaltyPlan).

Checks (each a pure function of the text; True means the text FAILS the check):
    quotes          an odd number of straight double quotes `"`
    asterisk        an odd number of emphasis `*` (not part of `**`; a `*` with a space or a
                    digit on both sides, `3 * 4`, `3*4`, or a `* ` bullet is arithmetic/list)
    bold            an odd number of `**`
    brackets        (), [] and {} not balanced and properly nested (a list enumerator
                    "1) " at a line's start and a smiley ":)" are not brackets)
    code_fence      an odd number of ``` fences
    special_tokens  a leftover special or chat-template token: `<|...|>`, `<s>`, `</s>`,
                    `[INST]`, `<unk>`, `<pad>`, or any string in `extra_tokens`; for rollouts
                    also a special token *id* before the final position (vLLM's text drops them)
    empty           nothing but whitespace

Pure module: the standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Iterable, Optional, Sequence

CHECKS = ("quotes", "asterisk", "bold", "brackets", "code_fence", "special_tokens", "empty")
ACTIONS = ("warn", "skip", "refuse")  # what a prompt file's malformed line gets

_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<unk>|<pad>")
_PAIRS = {")": "(", "]": "[", "}": "{"}
# a closing paren that opens nothing: a list enumerator at a line's start ("1) ", "b) ") or a
# smiley (":)", ":-)")
_LONE_CLOSERS = re.compile(r"(?m)^(\s*)(?:\d{1,3}|[A-Za-z])\)(?=[ \t])|:-?\)")


def _strip_fences(text: str) -> str:
    """The text without the inside of ``` code blocks (markup inside code is not prose)."""
    parts = text.split("```")
    return "".join(parts[0::2])


def unbalanced_quotes(text: str) -> bool:
    return _strip_fences(text).count('"') % 2 == 1


def unbalanced_bold(text: str) -> bool:
    return _strip_fences(text).count("**") % 2 == 1


def _is_emphasis(text: str, i: int) -> bool:
    """Whether the single `*` at i is emphasis markup: not with a space, a digit or a line
    edge on both sides (`3 * 4`, `3*4`, a `* ` bullet at a line start)."""
    left = text[i - 1] if i > 0 else " "
    right = text[i + 1] if i + 1 < len(text) else " "
    return not ((left.isspace() or left.isdigit()) and (right.isspace() or right.isdigit()))


def unbalanced_asterisk(text: str) -> bool:
    t = _strip_fences(text).replace("**", "  ")
    return sum(_is_emphasis(t, i) for i, c in enumerate(t) if c == "*") % 2 == 1


def unbalanced_brackets(text: str) -> bool:
    stack: list[str] = []
    for c in _LONE_CLOSERS.sub(r"\1", _strip_fences(text)):
        if c in "([{":
            stack.append(c)
        elif c in _PAIRS:
            if not stack or stack.pop() != _PAIRS[c]:
                return True
    return bool(stack)


def open_code_fence(text: str) -> bool:
    return text.count("```") % 2 == 1


def leftover_special(text: str, extra_tokens: Sequence[str] = ()) -> bool:
    return bool(_SPECIAL.search(text)) or any(t and t in text for t in extra_tokens)


def empty(text: str) -> bool:
    return not text.strip()


_TEXT_CHECKS = {"quotes": unbalanced_quotes, "asterisk": unbalanced_asterisk, "bold": unbalanced_bold,
                "brackets": unbalanced_brackets, "code_fence": open_code_fence, "empty": empty}


def check_names(checks: Iterable[str]) -> tuple[str, ...]:
    """`checks` as a tuple, or ValueError naming the unknown ones and the allowed names."""
    checks = tuple(checks)
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise ValueError(f"unknown format checks {bad}; allowed: {list(CHECKS)}")
    return checks


def failed_checks(text: str, checks: Sequence[str] = CHECKS, extra_tokens: Sequence[str] = ()) -> list[str]:
    """Names of the checks `text` fails, in the order of `checks`."""
    out = []
    for name in check_names(checks):
        bad = leftover_special(text, extra_tokens) if name == "special_tokens" else _TEXT_CHECKS[name](text)
        if bad:
            out.append(name)
    return out


def special_id_inside(token_ids: Sequence[int], special_ids: Collection[int]) -> bool:
    """A special token id before a completion's last position (its final EOS is fine)."""
    return any(t in special_ids for t in list(token_ids)[:-1])


@dataclass(frozen=True)
class RolloutFormat:
    """Per-rollout verdicts of one batch: `flags[name][n]` is True when rollout n fails `name`."""

    flags: dict[str, list[bool]]
    n: int

    @property
    def malformed(self) -> list[bool]:
        """Rollout n fails at least one check."""
        return [any(f[i] for f in self.flags.values()) for i in range(self.n)]

    def metrics(self, prefix: str = "format/") -> dict[str, float]:
        """`format/bad_frac` (share of rollouts failing any check) and `format/<check>` each."""
        share = lambda xs: float(sum(xs)) / max(1, self.n)  # noqa: E731
        return {f"{prefix}bad_frac": share(self.malformed),
                **{f"{prefix}{k}": share(v) for k, v in self.flags.items()}}


def check_rollouts(texts: Sequence[str], token_ids: Optional[Sequence[Sequence[int]]] = None,
                   checks: Sequence[str] = CHECKS, extra_tokens: Sequence[str] = (),
                   special_ids: Collection[int] = ()) -> RolloutFormat:
    """Every check on every rollout text; `special_tokens` also looks at token ids when given
    (vLLM detokenizes with skip_special_tokens, so a generated `<|im_start|>` is invisible in
    the text)."""
    checks = check_names(checks)
    failed = [set(failed_checks(t, checks, extra_tokens)) for t in texts]
    flags = {name: [name in f for f in failed] for name in checks}
    if "special_tokens" in checks and token_ids is not None and special_ids:
        ids = frozenset(int(i) for i in special_ids)
        flags["special_tokens"] = [a or special_id_inside(t, ids)
                                   for a, t in zip(flags["special_tokens"], token_ids)]
    return RolloutFormat(flags, len(texts))


def check_example(texts: Sequence[str], answer: Optional[str], checks: Sequence[str] = CHECKS,
                  extra_tokens: Sequence[str] = (), raw_prompt: bool = False) -> Optional[str]:
    """Why a prompt-file line is malformed, or None. `texts`: its message contents (or its raw
    prompt); `answer`: its reference answer, if any. The `empty` check applies to the answer
    (the loader refuses an empty prompt already); a raw `prompt` may hold a pre-rendered chat
    template on purpose, so `special_tokens` is not applied to it (`raw_prompt=True`)."""
    checks = check_names(checks)
    prompt_checks = [c for c in checks if c != "empty" and not (raw_prompt and c == "special_tokens")]
    problems = []
    for i, t in enumerate(texts):
        where = "prompt" if raw_prompt else f"messages[{i}]"
        problems += [f"{where}: {c}" for c in failed_checks(t, prompt_checks, extra_tokens)]
    if answer is not None:
        problems += [f"answer: {c}" for c in failed_checks(answer, checks, extra_tokens)]
    return ("format check failed (" + ", ".join(problems) + ")") if problems else None
