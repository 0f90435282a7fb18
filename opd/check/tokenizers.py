"""Row 1 of opd-check: can the teacher score the student's tokens, and do both models stop
on the same token?

Vocabularies and embedding rows (padding rows named), the bos / eos / pad tokens of each
model, the end-of-turn token each chat template emits after an assistant message, the ids of
a few probe strings, and the chat template rendered for sample prompts (byte-equal, or the
first difference shown). Pure functions of the two tokenizers; `tokenizer_row` is the row.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from opd.check.report import Row, Verdict, worst
from opd.teacher import first_vocab_difference

PROBES = ("Hello, world!", "What is 12 + 30? Reply with the number only.", "  spaces\tand\nnewlines",
          "1234567890", "naïve café")
ANSWER = "42"  # the assistant turn rendered to find the end-of-turn token
SPECIALS = ("bos", "eos", "pad")
SHOWN = 60  # characters of a rendered prompt shown (its end)


def special_tokens(tok: Any) -> dict[str, tuple[Optional[int], Optional[str]]]:
    """{bos, eos, pad: (id, string)} of a tokenizer."""
    return {k: (getattr(tok, f"{k}_token_id", None), getattr(tok, f"{k}_token", None)) for k in SPECIALS}


def end_of_turn(tok: Any) -> Optional[str]:
    """The first token the chat template writes after an assistant message's content (what
    the model learned to emit when its turn ends); None without a template."""
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER}],
                                   tokenize=False)
    tail = text[text.rfind(ANSWER) + len(ANSWER):]
    ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
    return tok.convert_ids_to_tokens(ids[0]) if ids else None


def first_difference(a: str, b: str, context: int = 24) -> Optional[str]:
    """Where two strings first differ: the character position and a window of each around it
    (None when equal)."""
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - context)
    return f"at character {i}: student {a[lo: i + context]!r} vs teacher {b[lo: i + context]!r}"


def render(tok: Any, chat: Sequence[dict[str, str]]) -> str:
    """A prompt as the run renders it (the generation prompt added)."""
    return tok.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)


def _vocab(s_tok: Any, t_tok: Any, s_rows: Optional[int], t_rows: Optional[int]) -> tuple[Verdict, list[str]]:
    sv, tv = s_tok.get_vocab(), t_tok.get_vocab()
    found = [f"vocabulary {len(sv)} (student) / {len(tv)} (teacher); embedding rows {s_rows} / {t_rows}"
             + "".join(f"; {who} has {rows - len(v)} padding rows" for who, rows, v in
                       (("student", s_rows, sv), ("teacher", t_rows, tv)) if rows and rows > len(v))]
    if sv != tv:
        return Verdict.FAIL, found + [f"vocabularies differ: {first_vocab_difference(sv, tv)}"]
    short = [who for who, rows in (("student", s_rows), ("teacher", t_rows)) if rows and rows < len(sv)]
    if short:
        return Verdict.FAIL, found + [f"{' and '.join(short)}: fewer embedding rows than tokens"]
    return Verdict.OK, found


def _stops(s_tok: Any, t_tok: Any) -> tuple[Verdict, list[str], list[str]]:
    s, t = special_tokens(s_tok), special_tokens(t_tok)
    found = [f"{k}: student {s[k][1]!r} ({s[k][0]}), teacher {t[k][1]!r} ({t[k][0]})" for k in SPECIALS]
    s_eot, t_eot = end_of_turn(s_tok), end_of_turn(t_tok)
    found.append(f"end of turn in the chat template: student {s_eot!r}, teacher {t_eot!r}")
    verdict, todo = Verdict.OK, []
    differ = [k for k in SPECIALS if s[k] != t[k]]
    if differ:
        verdict = Verdict.FAIL
        found.append(f"special tokens differ: {', '.join(f'{k} {s[k][1]!r} vs {t[k][1]!r}' for k in differ)}")
        todo.append("the teacher must stop on the student's EOS: pick a pair of one tokenizer family, "
                    "or give both the same special tokens")
    if s_eot is not None and s_eot != s["eos"][1]:
        verdict = worst([verdict, Verdict.WARN])
        found.append(f"the template ends a turn with {s_eot!r}, not the EOS {s['eos'][1]!r}")
        todo.append(f"add its id to rollout.stop_token_ids, or set the EOS token to {s_eot!r}")
    return verdict, found, todo


def _probes(s_tok: Any, t_tok: Any, probes: Sequence[str]) -> tuple[Verdict, list[str]]:
    enc = [(p, s_tok(p, add_special_tokens=False)["input_ids"], t_tok(p, add_special_tokens=False)["input_ids"])
           for p in probes]
    bad = [f"{p!r}: student {a}, teacher {b}" for p, a, b in enc if a != b]
    if bad:
        return Verdict.FAIL, ["probe strings encode differently: " + "; ".join(bad[:3])]
    return Verdict.OK, [f"{len(probes)} probe strings: the same ids in both (e.g. {probes[0]!r} -> {enc[0][1]})"]


def _templates(s_tok: Any, t_tok: Any, chats: Sequence[Sequence[dict]]) -> tuple[Verdict, list[str]]:
    if not chats:
        return Verdict.OK, []
    for chat in chats:
        where = first_difference(render(s_tok, chat), render(t_tok, chat))
        if where:
            return Verdict.FAIL, [f"chat templates render {chat[-1]['content'][:40]!r} differently, {where}"]
    sample = render(s_tok, chats[0])
    return Verdict.OK, [f"chat template: {len(chats)} sample prompts render byte-equal, e.g. ending "
                        f"{sample[-SHOWN:]!r}"]


def tokenizer_row(s_tok: Any, t_tok: Any, s_rows: Optional[int], t_rows: Optional[int],
                  chats: Sequence[Sequence[dict]], probes: Sequence[str] = PROBES) -> Row:
    """Row 1: vocabularies, stop tokens, probe strings and chat templates of the pair."""
    v1, f1 = _vocab(s_tok, t_tok, s_rows, t_rows)
    v2, f2, todo = _stops(s_tok, t_tok)
    v3, f3 = _probes(s_tok, t_tok, probes)
    v4, f4 = _templates(s_tok, t_tok, chats)
    verdict = worst([v1, v2, v3, v4])
    if Verdict.FAIL in (v1, v3, v4):
        todo = todo + ["the teacher must score the student's exact token ids: pick a teacher of the same "
                       "tokenizer family, with the same chat template"]
    return Row("tokenizers", verdict, f1 + f2 + f3 + f4, todo,
               {"student": special_tokens(s_tok), "teacher": special_tokens(t_tok),
                "vocab": [len(s_tok), len(t_tok)], "embedding_rows": [s_rows, t_rows],
                "end_of_turn": [end_of_turn(s_tok), end_of_turn(t_tok)]})
