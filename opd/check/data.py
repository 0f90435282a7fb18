"""Row 6 of opd-check: the prompts and the answers.

`data_row`: the prompt files' checks (each bad line named `file:line: why`, as the run
reports it; format checks, `format.*`), and the share of prompts too long for the engine
(`rollout.max_model_len`, and its room for a prompt: `max_model_len - max_new_tokens`).
`extraction_row`: the task's answer-extraction rule applied to the teacher's greedy answers;
a rule that extracts nothing from them is a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from opd.check.report import Row, Verdict
from opd.prompt_files import DataError, FormatRule, load_prompt_file, too_long
from opd.tasks import Example, answer_correct, builtin_task, encode_prompt, extract_answer

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig
    from opd.types import PromptBatch


def task_examples(cfg: TrainConfig) -> tuple[list[Example], list[str], list[str]]:
    """Every prompt of the task (train and held out), each bad line (`file:line: why`) and the
    lines kept with a format warning. Bad lines are collected, not raised."""
    t, f = cfg.task, cfg.format
    if t.name != "file":
        task = builtin_task(t)
        return task.train() + task.heldout(), [], []
    rule = FormatRule(tuple(f.checks), f.on_prompt_file, tuple(f.extra_tokens))
    out, bad, warned = [], [], []
    for path, held in ((t.train_file, False), (t.heldout_file, True)):
        if not path:
            continue
        try:
            exs, rep = load_prompt_file(path, "skip", require_answer=held, extract=t.answer_extraction, fmt=rule)
        except DataError as e:
            bad.append(str(e))
            continue
        out += exs
        bad += [f"{path}:{n}: {why}" for n, why in rep.skipped]
        warned += [f"{path}:{n}: {why}" for n, why in rep.warned]
    return out, bad, warned


def data_row(cfg: TrainConfig, tok: Any) -> Row:
    """Row 6 without generation: bad lines, format warnings, prompts too long."""
    exs, bad, warned = task_examples(cfg)
    r = cfg.rollout
    room = r.max_model_len - r.max_new_tokens
    lens = np.array([len(encode_prompt(tok, ex)) for ex in exs] or [0])
    long_ = [f"{ex.source}: {too_long(int(n), room)}" for ex, n in zip(exs, lens) if too_long(int(n), room)]
    where = "prompt files" if cfg.task.name == "file" else f"built-in task {cfg.task.name}"
    found = [f"{where}: {len(exs)} prompts, {len(bad)} bad lines, {len(warned)} format warnings",
             f"prompt tokens: median {np.median(lens):.0f}, max {lens.max()}; longer than rollout.max_model_len "
             f"({r.max_model_len}): {np.mean(lens > r.max_model_len):.1%}; without room for max_new_tokens "
             f"({room} tokens): {len(long_) / max(1, len(exs)):.1%}"]
    found += bad[:3] + long_[:3] + warned[:3]
    todo, verdict = [], Verdict.OK
    stops = cfg.task.on_bad_line == "error" and (bad or long_)
    if stops or (cfg.task.name == "file" and not exs):
        verdict = Verdict.FAIL
        todo.append("fix the lines named (or task.on_bad_line=skip to skip and count them); prompts too long: "
                    "raise rollout.max_model_len or shorten them")
    elif bad or long_ or warned:
        verdict = Verdict.WARN
        todo.append("the lines named are skipped or kept with a warning (task.on_bad_line, format.on_prompt_file)")
    return Row("data", verdict, found, todo,
               {"prompts": len(exs), "bad_lines": bad, "too_long": long_, "format_warnings": warned,
                "prompt_tokens_max": int(lens.max()), "share_over_max_model_len": float(np.mean(lens > r.max_model_len))})


def extraction_row(prompts: PromptBatch, teacher_texts: Sequence[str]) -> Row:
    """Row 6 with generation: what each prompt's extraction rule finds in the teacher's greedy
    answers, and how often that equals the reference answer."""
    got = [extract_answer(t, prompts.extraction(i)) for i, t in enumerate(teacher_texts)]
    hits = [answer_correct(t, prompts.answers[i], prompts.extraction(i)) for i, t in enumerate(teacher_texts)]
    rules = sorted(set(prompts.extraction(i) for i in range(len(teacher_texts))))
    share = float(np.mean([g is not None for g in got])) if got else 0.0
    found = [f"rule {', '.join(rules)}: extracts an answer from {share:.0%} of {len(got)} teacher greedy answers, "
             f"{float(np.mean(hits)) if hits else 0.0:.0%} equal the reference",
             *(f"{t[:60]!r} -> {g!r} (reference {a!r})" for t, g, a in
               list(zip(teacher_texts, got, prompts.answers))[:2])]
    if share == 0:
        return Row("answer extraction", Verdict.WARN, found,
                   ["the rule finds nothing in the teacher's answers: accuracy will read 0; set "
                    "task.answer_extraction (exact, last_number, regex:<pattern>) to match how it answers"],
                   {"extracted": share})
    return Row("answer extraction", Verdict.OK, found, [], {"extracted": share, "accuracy": float(np.mean(hits))})
