"""Tests of opd/formatting.py (each check on texts that pass and fail it), of the prompt-file
loader's format rule (warn / skip / refuse, by file and line), and of the hook into the
length monitor's plan: malformed rollouts preferred as SMPO's rejected and down-weighted in
the sequence-level term."""
import json

import numpy as np
import pytest

from opd import formatting as F
from opd import length as L
from opd.batch import build_pairs
from opd.prompt_files import DataError, FormatRule, load_prompt_file

# (check, texts that pass, texts that fail)
CASES = [
    ("quotes", ['He said "hi".', "no quotes", '```\nprint("x)\n```'], ['He said "hi.', '"a" "b']),
    ("asterisk", ["*italic* text", "3 * 4 = 12", "3*4", "* item\n* item", "**bold**"],
     ["*cut off", "an *italic* and *another"]),
    ("bold", ["**bold** text", "plain"], ["**bold text", "**a** **b"]),
    ("brackets", ["f(x) = [1, {2}]", "none", "1) add\n2) carry (the 1)", "a) yes\n b) no :)"],
     ["f(x", "a)", "[(])", "{", "x 1) y", "1) (open"]),
    ("code_fence", ["```py\nx = 1\n```", "none"], ["```py\nx = 1"]),
    ("special_tokens", ["hello", "a < b | c > d"],
     ["hi<|im_end|>", "<|im_start|>assistant", "</s>", "[INST] hi", "<unk>"]),
    ("empty", ["x"], ["", "  \n\t"]),
]


@pytest.mark.parametrize("name,good,bad", CASES, ids=[c[0] for c in CASES])
def test_each_check_passes_good_and_fails_bad_text(name, good, bad):
    for t in good:
        assert F.failed_checks(t, [name]) == [], (name, t)
    for t in bad:
        assert F.failed_checks(t, [name]) == [name], (name, t)


def test_failed_checks_lists_every_failure_in_order_and_rejects_unknown_names():
    assert F.failed_checks('"**cut (', F.CHECKS) == ["quotes", "bold", "brackets"]
    assert F.failed_checks("clean", F.CHECKS) == []
    with pytest.raises(ValueError, match="unknown format checks.*'bogus'.*allowed"):
        F.failed_checks("x", ["quotes", "bogus"])


def test_extra_tokens_count_as_leftovers():
    assert F.failed_checks("a <eot> b", ["special_tokens"]) == []
    assert F.failed_checks("a <eot> b", ["special_tokens"], extra_tokens=["<eot>"]) == ["special_tokens"]


def test_rollout_flags_metrics_and_special_token_ids():
    texts = ["fine", '"open', "", "also fine"]
    ids = [[5, 6, 0], [5, 6], [0], [5, 9, 6, 0]]  # 9: a special id in the middle; 0: final EOS
    r = F.check_rollouts(texts, ids, ["quotes", "special_tokens", "empty"], special_ids={0, 9})
    assert r.malformed == [False, True, True, True]
    m = r.metrics()
    assert m["format/bad_frac"] == 0.75
    assert m["format/quotes"] == 0.25 and m["format/empty"] == 0.25 and m["format/special_tokens"] == 0.25
    # without the ids, the special token in rollout 3 is invisible (vLLM skips it in the text)
    assert F.check_rollouts(texts, None, ["special_tokens"]).malformed == [False] * 4


def test_check_example_applies_empty_to_the_answer_and_spares_a_raw_prompt_template():
    assert F.check_example(["What is 2+2?"], "4") is None
    assert "answer: empty" in F.check_example(["What is 2+2?"], " ")
    assert "messages[0]: quotes" in F.check_example(['Say "hi'], None)
    assert F.check_example(["<|im_start|>user\nhi<|im_end|>"], None, raw_prompt=True) is None
    assert "special_tokens" in F.check_example(["<|im_start|>user hi"], None)


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


LINES = [{"messages": [{"role": "user", "content": "fine"}], "answer": "ok"},
         {"messages": [{"role": "user", "content": "cut *off"}], "answer": "ok"},
         {"prompt": "also fine", "answer": "(unbalanced"}]


def test_loader_warns_skips_or_refuses_malformed_lines_by_file_and_line(tmp_path):
    p = _write(tmp_path, LINES)
    exs, rep = load_prompt_file(p, fmt=FormatRule(F.CHECKS, "warn"))
    assert len(exs) == 3 and [n for n, _ in rep.warned] == [2, 3]
    assert "line 2: format check failed (messages[0]: asterisk)" in rep.summary()
    exs, rep = load_prompt_file(p, on_bad_line="error", fmt=FormatRule(F.CHECKS, "skip"))
    assert [e.source for e in exs] == ["data.jsonl:1"] and [n for n, _ in rep.skipped] == [2, 3]
    with pytest.raises(DataError, match=r"data.jsonl:2: format check failed .*asterisk.*refuse"):
        load_prompt_file(p, on_bad_line="skip", fmt=FormatRule(F.CHECKS, "refuse"))
    exs, rep = load_prompt_file(p, fmt=FormatRule((), "refuse"))  # no checks: nothing happens
    assert len(exs) == 3 and not rep.warned


def test_plan_downweights_malformed_rows_and_prefers_them_as_rejected():
    plan = L.PenaltyPlan(malformed_weight=0.5, prefer_malformed_rejected=True)
    reasons, malformed = ["stop"] * 4, [False, True, False, False]
    assert L.loss_weights(plan, reasons, malformed).tolist() == [1.0, 0.5, 1.0, 1.0]
    assert L.loss_weights(L.PenaltyPlan(), reasons, malformed).tolist() == [1.0] * 4
    bad = plan.rejection_preference(reasons, [False] * 4, malformed)
    assert bad.tolist() == [0, 1, 0, 0]
    assert L.PenaltyPlan().rejection_preference(reasons, [False] * 4, malformed) is None
    # with the length preference on too, the flags add up: truncated + malformed beats either
    both = L.PenaltyPlan(prefer_bad_rejected=True, prefer_malformed_rejected=True)
    assert both.rejection_preference(["length", "length", "stop", "stop"], [False] * 4,
                                     [True, False, True, False]).tolist() == [2, 1, 1, 0]
    # SMPO picks the malformed sample as rejected although another scores lower
    score = np.array([0.9, 0.5, 0.1, 0.7], np.float32)
    assert build_pairs(score, 4, 0.0, bad).rejected_rows.tolist() == [1]
    assert build_pairs(score, 4, 0.0, None).rejected_rows.tolist() == [2]


def test_monitor_auto_mode_carries_the_format_penalty_and_other_modes_do_not():
    ids, reasons = [[1, 2, 0]] * 4, ["stop"] * 4
    for mode, on in (("auto", True), ("monitor", False), ("off", False)):
        mon = L.LengthMonitor({0}, 8, L.LengthConfig(mode=mode), malformed_weight=0.25, prefer_malformed_rejected=True)
        _, _, plan = mon.observe(ids, reasons, 1)
        assert (plan.malformed_weight, plan.prefer_malformed_rejected) == ((0.25, True) if on else (1.0, False))
