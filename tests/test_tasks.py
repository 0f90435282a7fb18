"""Tests of opd/tasks.py: built-in tasks are deterministic with disjoint splits and right
answers; exact match; JSONL prompt files report every bad line with file and line number
(or skip and count it); nothing is truncated; prompts and answers encode with the zoo's
special tokens."""
import dataclasses
import json
import random

import pytest

from opd.prompt_files import DataError, load_prompt_file, load_splits
from opd.tasks import (Example, answer_correct, build_task, check_extraction, encode_answer,
                       encode_prompt, exact_match, extract_answer, normalize_answer, sample_batch,
                       user_example)

TASKS = {
    "addition": dict(max_digits=2),
    "reversal": dict(min_chars=3, max_chars=6),
    "arith_chat": dict(max_digits=2),
}


def _question(ex: Example) -> str:
    (role, content), = ex.messages
    assert role == "user" and ex.text is None
    return content


# ------------------------------------------------------------------ built-in tasks
@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_task_is_deterministic_with_disjoint_splits(name):
    kw = TASKS[name]
    a = build_task(name, seed=3, train_size=500, heldout_size=40, **kw)
    b = build_task(name, seed=3, train_size=500, heldout_size=40, **kw)
    c = build_task(name, seed=4, train_size=500, heldout_size=40, **kw)
    train, held = a.train(), a.heldout()
    assert train == b.train() and held == b.heldout()
    assert a.train() == train and a.heldout() == held  # repeated calls agree too
    assert [_question(e) for e in c.heldout()] != [_question(e) for e in held]
    assert [_question(e) for e in c.train()] != [_question(e) for e in train]
    assert len(train) == 500 and len(held) == 40
    held_q = [_question(e) for e in held]
    assert len(set(held_q)) == 40  # distinct held-out questions
    assert not set(held_q) & {_question(e) for e in train}
    assert len({_question(e) for e in train}) > 100  # a stream, not one prompt repeated
    assert held[3].source == f"{name}:heldout:3" and train[7].source == f"{name}:train:7"


def test_arith_chat_questions_and_answers_are_right():
    t = build_task("arith_chat", seed=0, train_size=300, heldout_size=50, max_digits=2, extract="last_number")
    ops = set()
    for ex in t.train() + t.heldout():
        q = _question(ex)
        assert q.startswith("What is ") and q.endswith("? Reply with the number only.")
        a, op, b = q[len("What is "):-len("? Reply with the number only.")].split()
        ops.add(op)
        assert int(ex.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert ex.extract == "last_number"
    assert ops == {"+", "-"}


EXTRACTIONS = [  # (completion, answer, how, extracted, correct)
    ("12 + 7 = 19.", "19", "last_number", "19", True),
    ("12 + 7 = 9 ...", "19", "last_number", "9", False),
    ("The answer is 1,200.", "1200", "last_number", "1,200", True),
    ("It is 4.0", "4", "last_number", "4.0", True),
    ("-3 is the result", "-3", "last_number", "-3", True),
    ("no digits here", "3", "last_number", None, False),
    ("  19 ", "19", "exact", "19", True),
    ("19.", "19", "exact", "19.", False),
    ("Answer: 42 (sure)", "42", "regex:Answer: (\\d+)", "42", True),
    ("Answer: 41", "42", "regex:Answer: (\\d+)", "41", False),
    ("the word cat", "cat", "regex:c.t", "cat", True),
    ("nothing", "x", "regex:Answer: (\\d+)", None, False),
]


@pytest.mark.parametrize("text,answer,how,extracted,correct", EXTRACTIONS)
def test_answer_extraction(text, answer, how, extracted, correct):
    assert extract_answer(text, how) == extracted
    assert answer_correct(text, answer, how) is correct
    assert answer_correct(text, None, how) is False


def test_bad_extraction_is_refused_by_name():
    assert check_extraction("regex:a(b)") == "regex:a(b)"
    with pytest.raises(ValueError, match="must be 'exact', 'last_number' or 'regex:<pattern>'"):
        check_extraction("number")
    with pytest.raises(ValueError, match="bad regex"):
        check_extraction("regex:(")


def test_prompt_file_lines_carry_their_extraction(tmp_path):
    lines = [json.dumps({"prompt": "q", "answer": "1"}),
             json.dumps({"prompt": "q", "answer": "1", "extract": "regex:=(\\d)"})]
    exs, _ = load_prompt_file(_write(tmp_path / "x.jsonl", lines), extract="last_number")
    assert [e.extract for e in exs] == ["last_number", "regex:=(\\d)"]


def test_addition_answers_are_right():
    t = build_task("addition", seed=0, train_size=300, heldout_size=50, max_digits=3)
    for ex in t.train() + t.heldout():
        a, b = _question(ex).split("+")
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert int(a) + int(b) == int(ex.answer)
    assert max(len(_question(e).split("+")[0]) for e in t.train()) == 3


def test_reversal_answers_are_right():
    t = build_task("reversal", seed=0, train_size=300, heldout_size=50, min_chars=2, max_chars=5)
    lengths = set()
    for ex in t.train() + t.heldout():
        q = _question(ex)
        assert ex.answer == q[::-1] and q.isalpha() and q.islower()
        lengths.add(len(q))
    assert lengths == {2, 3, 4, 5}


def test_builtin_task_refuses_impossible_sizes():
    # One-digit addition has 100 distinct questions: asking for more held-out ones, or
    # holding out all of them, must not silently return fewer prompts.
    with pytest.raises(ValueError, match="task.heldout_size=150"):
        build_task("addition", seed=0, train_size=10, heldout_size=150, max_digits=1).heldout()
    with pytest.raises(ValueError, match="task.train_size=10"):
        build_task("addition", seed=0, train_size=10, heldout_size=100, max_digits=1).train()
    with pytest.raises(ValueError, match="task.name"):
        build_task("multiplication", seed=0, train_size=10, heldout_size=10)


def test_exact_match():
    assert exact_match("95", "95")
    assert exact_match("  95\n", "95") and exact_match("95", " 95 ")
    assert exact_match("a  b\t c", "a b c")
    assert normalize_answer("  a \n b ") == "a b"
    assert not exact_match("96", "95")
    assert not exact_match("9 5", "95")
    assert not exact_match("950", "95")
    assert not exact_match("", "95")
    assert not exact_match("95", None)


def test_sample_batch_draws_from_the_examples():
    exs = [user_example(str(i), str(i), f"x:{i}") for i in range(5)]
    batch = sample_batch(exs, 50, random.Random(0))
    assert len(batch) == 50 and set(batch) <= set(exs) and len(set(batch)) > 1
    assert batch == sample_batch(exs, 50, random.Random(0))


# ------------------------------------------------------------------ prompt files
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "2+2", "answer": "4"})
BAD_LINES = [
    ('{"prompt": "2+2", ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"question": "2+2"}', "missing field"),
    ('{"prompt": "   "}', "empty prompt"),
    ('{"prompt": 7}', "field 'prompt' must be a string, got int"),
    ('{"messages": "hi"}', "field 'messages' must be a non-empty list"),
    ('{"messages": []}', "field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with string 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "messages[1] must be"),
    ('{"messages": [{"role": "user", "content": " "}]}', "empty prompt"),
    ('{"prompt": "2+2", "answer": 4}', "field 'answer' must be a string, got int"),
    ('{"prompt": "2+2", "extract": "first_word"}', "field 'extract' must be 'exact', 'last_number'"),
    ('{"prompt": "2+2", "extract": "regex:(unclosed"}', "field 'extract' bad regex"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_is_reported_with_file_and_line(tmp_path, line, reason):
    # Line 1 good, line 2 blank (ignored but counted), line 3 bad, line 4 good.
    path = _write(tmp_path / "data.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as e:
        load_prompt_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ")
    assert reason in msg


def test_too_long_prompt_is_a_bad_line_not_truncated(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "x" * 10}),
                                         json.dumps({"prompt": "y" * 11})])
    count = lambda ex: len(ex.text or "")  # noqa: E731
    with pytest.raises(DataError) as e:
        load_prompt_file(path, count_tokens=count, max_prompt_tokens=10)
    assert str(e.value).startswith(f"{path}:2: prompt is 11 tokens, more than the 10 that fit")
    assert "not truncated" in str(e.value)
    exs, rep = load_prompt_file(path, on_bad_line="skip", count_tokens=count,
                                max_prompt_tokens=10)
    assert [ex.text for ex in exs] == ["x" * 10]  # exactly at the limit: kept whole
    assert [n for n, _ in rep.skipped] == [2]


def test_heldout_line_without_answer(tmp_path):
    path = _write(tmp_path / "held.jsonl", [GOOD, json.dumps({"prompt": "3+3"})])
    assert len(load_prompt_file(path)[0]) == 2  # fine for training prompts
    with pytest.raises(DataError, match=r":2: missing field 'answer'"):
        load_prompt_file(path, require_answer=True)


def test_good_lines_load_with_their_fields_and_sources(tmp_path):
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "1+1"}], "answer": "2"}
    path = _write(tmp_path / "good.jsonl", ["", GOOD, "   ", json.dumps(chat),
                                            json.dumps({"prompt": "no answer"})])
    exs, rep = load_prompt_file(path)
    assert rep.loaded == 3 and rep.skipped == []
    assert exs[0] == Example(None, "2+2", "4", "good.jsonl:2")
    assert exs[1].messages == (("system", "be brief"), ("user", "1+1"))
    assert exs[1].text is None and exs[1].answer == "2" and exs[1].source == "good.jsonl:4"
    assert exs[1].chat() == chat["messages"]
    assert exs[2].answer is None and exs[2].source == "good.jsonl:5"


def test_skip_mode_loads_good_lines_and_reports_skipped(tmp_path):
    lines = [GOOD, "[1]", "", '{"prompt": ""}', GOOD.replace("2+2", "5+5"), "{bad", GOOD]
    path = _write(tmp_path / "mixed.jsonl", lines)
    exs, rep = load_prompt_file(path, on_bad_line="skip")
    assert [ex.source for ex in exs] == ["mixed.jsonl:1", "mixed.jsonl:5", "mixed.jsonl:7"]
    assert [ex.text for ex in exs] == ["2+2", "5+5", "2+2"]
    assert rep.loaded == 3
    assert [n for n, _ in rep.skipped] == [2, 4, 6]
    reasons = [why for _, why in rep.skipped]
    assert "expected a JSON object" in reasons[0]
    assert reasons[1] == "empty prompt"
    assert reasons[2].startswith("malformed JSON")
    summary = rep.summary()
    assert "3 prompts loaded, 3 lines skipped" in summary and "line 6: malformed JSON" in summary
    with pytest.raises(DataError, match=":2: expected a JSON object"):
        load_prompt_file(path)  # the default stops at the first bad line


def test_file_without_usable_lines_raises(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["[1]", "{bad", ""])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable prompt \(2 lines skipped\)"):
        load_prompt_file(path, on_bad_line="skip")
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable prompt"):
        load_prompt_file(empty)


def test_missing_file_and_bad_mode(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        load_prompt_file(missing)
    with pytest.raises(ValueError, match="task.on_bad_line"):
        load_prompt_file(_write(tmp_path / "x.jsonl", [GOOD]), on_bad_line="ignore")


# ------------------------------------------------------------------ with the zoo tokenizer
@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    """The tiny zoo's tokenizer. `ensure_zoo` builds it with exactly this call (same path as
    `tiny_zoo.tokenizer`), without needing the models."""
    from opd.zoo import ensure_tokenizer, load_tokenizer

    return load_tokenizer(ensure_tokenizer(tiny_cfg.zoo_dir))


def test_load_splits_for_prompt_files(tmp_path, tokenizer, tiny_cfg):
    long_text = "1+1=" * 10  # 40 characters: 41 tokens with BOS
    chat15 = {"messages": [{"role": "user", "content": "a" * 15}], "answer": "x"}
    train = _write(tmp_path / "train.jsonl", [
        json.dumps({"prompt": "2+2"}), json.dumps({"prompt": long_text}), json.dumps(chat15),
        json.dumps({"prompt": "9" * 16})])
    held = _write(tmp_path / "held.jsonl", [json.dumps({"prompt": "3+4", "answer": "7"}),
                                            json.dumps({"prompt": "1+2", "answer": "3"})])
    task = dataclasses.replace(tiny_cfg.task, name="file", train_file=str(train),
                               heldout_file=str(held), on_bad_line="error")
    with pytest.raises(DataError) as e:
        load_splits(task, tokenizer, max_prompt_tokens=17)
    assert str(e.value).startswith(f"{train}:2: prompt is 41 tokens, more than the 17")

    # The chat line counts its template tokens: <bos><|user|> + 15 + <|assistant|> = 18 > 17.
    skip = dataclasses.replace(task, on_bad_line="skip")
    tr, he = load_splits(skip, tokenizer, max_prompt_tokens=17)
    assert [ex.source for ex in tr] == ["train.jsonl:1", "train.jsonl:4"]
    for ex in tr + he:  # nothing truncated: the loaded prompt encodes to its full raw length
        assert len(encode_prompt(tokenizer, ex)) == len(tokenizer(ex.text)["input_ids"])
        assert len(encode_prompt(tokenizer, ex)) == len(ex.text) + 1
    assert [ex.answer for ex in he] == ["7", "3"]
    tr, he = load_splits(skip, tokenizer, max_prompt_tokens=18)
    assert [ex.source for ex in tr] == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:4"]

    # Sizes cap what is used.
    small = dataclasses.replace(skip, train_size=1, heldout_size=1)
    tr, he = load_splits(small, tokenizer, max_prompt_tokens=18)
    assert [ex.source for ex in tr] == ["train.jsonl:1"] and [ex.answer for ex in he] == ["7"]

    # Held-out lines need answers.
    _write(held, [json.dumps({"prompt": "3+4"})])
    with pytest.raises(DataError, match=rf"{held}:1: missing field 'answer'"):
        load_splits(task, tokenizer, max_prompt_tokens=64)


def test_load_splits_builtin_matches_build_task(tiny_cfg):
    t = tiny_cfg.task
    tr, he = load_splits(t)
    ref = build_task(t.name, t.seed, t.train_size, t.heldout_size, t.max_digits, t.min_chars,
                     t.max_chars)
    assert tr == ref.train() and he == ref.heldout()


def test_encode_prompt_and_answer(tokenizer):
    tok = tokenizer
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    user = tok.convert_tokens_to_ids("<|user|>")
    assert assistant != tok.unk_token_id and user != tok.unk_token_id
    ex = user_example("37+58", "95", "t:0")
    ids = encode_prompt(tok, ex)
    assert ids[0] == tok.bos_token_id and ids[1] == user and ids[-1] == assistant
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS is not doubled
    assert tok.decode(ids[2:-1]) == "37+58"  # one token per character, nothing lost
    assert len(ids) == 3 + len("37+58")
    raw = encode_prompt(tok, Example(None, "ab c", None, "f:1"))
    assert raw[0] == tok.bos_token_id and len(raw) == 5 and assistant not in raw
    ans = encode_answer(tok, "95")
    assert ans[-1] == tok.eos_token_id and ans.count(tok.eos_token_id) == 1
    assert tok.bos_token_id not in ans and tok.decode(ans[:-1]) == "95"
    system = Example((("system", "s"), ("user", "q")), None, None, "f:2")
    sys_ids = encode_prompt(tok, system)
    assert sys_ids[0] == tok.bos_token_id and sys_ids[-1] == assistant
    assert tok.convert_tokens_to_ids("<|system|>") in sys_ids
