"""`opd-check`: a pre-flight report of a run's config, before any training.

    opd-check experiment=smollm2_cpu zoo_dir=/tmp/zoo     # the same config and overrides as opd-train
    opd-check check.prompts=32 check.out=/tmp/check.json

It prints one table with a verdict per row (ok / warn / fail) and what to do, writes
check.json (`check.out`, default `<run_dir>/check.json`), and exits with status 2 when a row
fails. The rows, one module each:

    1 tokenizers.py   vocabularies, stop tokens, probe strings, chat templates of the pair
    2 parity.py       teacher backend vs transformers; student engine vs the learner
    3 selfdistill.py  the student as its own teacher: 0 loss, 0 KL, 0 gradient per loss.distill
    4 lengths.py      student and teacher sampled on held-out prompts: EOS, truncation, loops
    5 memory.py       bytes of the learner, teacher and engines against the machine's memory
    6 data.py         prompt files, prompts too long, answer extraction on the teacher's answers

`opd-train` runs the cheap rows (1, 5 and 6 without generation: `check_at_start`) itself and
stops on a fail with the same message; `check.enabled=false` turns that off.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from opd.check.report import Row, Verdict, raise_on_fail, table, write_json

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig


def cheap_rows(cfg: TrainConfig, student: str, teachers: Mapping[str, Optional[str]]) -> list[Row]:
    """Rows 1 (one per teacher), 5 and 6 without loading weights or generating; `teachers`: each
    teacher's path by name, as `opd.zoo.teacher_paths` gives them (a served teacher's
    tokenizer is checked against its server by opd-train's start-up instead)."""
    from opd.check import data, memory
    from opd.zoo import load_tokenizer

    s_tok = load_tokenizer(student, cfg.student.trust_remote_code)
    t_cfgs = cfg.teacher_configs()
    local = {n: p for n, p in teachers.items() if t_cfgs[n].backend != "server"}
    chats = [ex.chat() for ex in data.task_examples(cfg)[0][:3] if ex.messages is not None] if local else []
    rows = [_tokenizer_row(cfg, s_tok, student, name, path, chats) for name, path in local.items()]
    d = memory.devices()
    s_params = memory.param_counts(student, cfg.student.trust_remote_code, cfg.student.lora)
    t_params = {n: memory.param_counts(p, t_cfgs[n].trust_remote_code) if n in local else None
                for n, p in teachers.items()}
    rows.append(memory.memory_row(cfg, memory.forecast(cfg, s_params, t_params, bool(d.gpu)), d))
    rows.append(data.data_row(cfg, s_tok))
    return rows


def _tokenizer_row(cfg: TrainConfig, s_tok: Any, student: str, name: str, teacher: str,
                   chats: list[list[dict[str, str]]]) -> Row:
    """Row 1 for teacher `name` on the sample `chats`: "tokenizers", or "tokenizers: <name>"
    with several teachers."""
    from opd.check import tokenizers
    from opd.teacher import embedding_rows
    from opd.zoo import load_tokenizer

    trust = cfg.teacher_configs()[name].trust_remote_code
    row = tokenizers.tokenizer_row(s_tok, load_tokenizer(teacher, trust),
                                   embedding_rows(student, cfg.student.trust_remote_code),
                                   embedding_rows(teacher, trust), chats)
    return replace(row, name=row_name(cfg, "tokenizers", name))


def row_name(cfg: TrainConfig, row: str, teacher: str) -> str:
    """A per-teacher row's name: `row`, or "<row>: <teacher>" when there are several."""
    return f"{row}: {teacher}" if cfg.teachers else row


def generation_rows(cfg: TrainConfig, student: str, teachers: Mapping[str, Optional[str]],
                    make_engine: Optional[Callable[..., Any]] = None) -> list[Row]:
    """Rows 2, 3, 4 and the answer extraction of 6: the student's engine, each teacher's
    scorer (on the prompts routed to it) and the learner, on held-out prompts.
    `make_engine(path, rollout_cfg)`: the student's rollout engine (default a new `RolloutWorker`)."""
    from opd.evaluation import eval_settings
    from opd.rollout import RolloutWorker, shutdown_engine
    from opd.zoo import load_tokenizer

    r = cfg.rollout
    tok = load_tokenizer(student, cfg.student.trust_remote_code)
    prompts = heldout_prompts(cfg, tok)
    engine = (make_engine or (lambda p, rc: RolloutWorker(p, rc, 0, cfg.student.trust_remote_code)))(student, r)
    try:
        plain = engine.generate(prompts.rows(slice(0, cfg.check.sequences)),
                                eval_settings(r.max_new_tokens, greedy=False, seed=r.seed))
        rows = learner_rows(cfg, student, plain, tok)
        for name, path in teachers.items():
            mine = prompts.select([i for i, t in enumerate(prompts.teachers) if t == name]) if cfg.teachers else prompts
            rows += [replace(row, name=row_name(cfg, row.name, name))
                     for row in teacher_rows(one_teacher(cfg, name), engine, path, mine, tok)]
        return rows
    finally:
        if make_engine is None:  # an engine of our own: stopped here
            shutdown_engine(engine.llm)


def one_teacher(cfg: TrainConfig, name: str) -> TrainConfig:
    """`cfg` with teacher `name` as its one teacher (rows that check one teacher at a time)."""
    return replace(cfg, teacher=cfg.teacher_configs()[name], teachers={})


def teacher_rows(cfg: TrainConfig, engine: Any, teacher: Optional[str], prompts: Any, tok: Any) -> list[Row]:
    """Row 2's teacher half, row 4 and row 6's answer extraction for cfg's one teacher."""
    from opd.actors import teacher_class
    from opd.evaluation import eval_settings
    from opd.rollout import shutdown_engine

    r = cfg.rollout
    scorer = teacher_class(cfg.teacher.backend == "server")(teacher, replace(cfg.teacher, temperature=1.0), r,
                                                               cfg.optim.device)
    try:
        plain = engine.generate(prompts.rows(slice(0, cfg.check.sequences)),
                                eval_settings(r.max_new_tokens, greedy=False, seed=r.seed))
        return [teacher_parity(cfg, scorer, teacher, plain), *sampled_rows(cfg, engine, scorer, prompts, tok)]
    finally:
        shutdown_engine(getattr(scorer, "llm", None))


def sampled_rows(cfg: TrainConfig, engine: Any, scorer: Any, prompts: Any, tok: Any) -> list[Row]:
    """Row 4 (both sides sampled as the run samples) and row 6's answer extraction (the
    teacher's greedy answers)."""
    from opd.check import data, lengths
    from opd.rollout import greedy_settings
    from opd.steps import sampling_settings

    r = cfg.rollout
    sampling = replace(sampling_settings(r, r.max_new_tokens, 0), n=1)
    eos_ids = {tok.eos_token_id} | set(r.stop_token_ids)
    s_out, t_out = engine.generate(prompts, sampling), scorer.generate(prompts, sampling)
    stats = [lengths.side_stats(o, eos_ids, r.max_new_tokens, cfg.length.stats) for o in (s_out, t_out)]
    greedy = scorer.generate(prompts, greedy_settings(r.eval_max_new_tokens))
    return [lengths.length_row(cfg, *stats), data.extraction_row(prompts, greedy.texts)]


def heldout_prompts(cfg: TrainConfig, tok: Any) -> Any:
    """`check.prompts` held-out prompts (train prompts when the task has none held out)."""
    from opd.prompt_files import load_splits
    from opd.tasks import prompt_batch

    train, heldout = load_splits(cfg.task, tok, cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
                                 teachers=list(cfg.teachers))
    return prompt_batch(tok, (heldout or train)[: cfg.check.prompts])


def teacher_parity(cfg: TrainConfig, scorer: Any, teacher: Optional[str], rollouts: Any) -> Row:
    """Row 2's teacher half; a served teacher without a local copy to compare with is a warning."""
    from opd.check import parity

    if not (teacher and (Path(teacher).is_dir() or cfg.teacher.backend != "server")):
        return Row("engine parity: teacher", Verdict.WARN,
                   ["the served teacher has no local copy (teacher.path) to compare its log-probs with"],
                   ["set teacher.path to the served model's directory or hub id"])
    reference = parity.reference_teacher(teacher, cfg)
    try:
        return parity.teacher_parity_row(cfg, scorer, reference, rollouts)
    finally:
        del reference
        gc.collect()


def learner_rows(cfg: TrainConfig, student: str, rollouts: Any, tok: Any) -> list[Row]:
    """Row 2's student half and row 3, on one learner (without the anchor's frozen copy)."""
    from opd.check import parity, selfdistill
    from opd.learner import Learner

    learner = Learner(student, replace(cfg, length=replace(cfg.length, mode="monitor")))
    try:
        return [parity.student_parity_row(cfg, learner, rollouts, tok),
                selfdistill.self_distill_row(cfg, learner, rollouts, tok)]
    finally:
        del learner
        gc.collect()


def run_check(cfg: TrainConfig, full: bool = True, make_engine: Optional[Callable[..., Any]] = None) -> list[Row]:
    """Every row (`full`), or the cheap ones; the models are the zoo's when the config names none."""
    from opd.zoo import resolve_model_paths, teacher_paths

    student, teachers = resolve_model_paths(cfg)[0], teacher_paths(cfg)
    rows = cheap_rows(cfg, student, teachers)
    if full and all(r.verdict is not Verdict.FAIL for r in rows if r.name.startswith("tokenizers")):
        rows += generation_rows(cfg, student, teachers, make_engine)
    return rows


def check_at_start(cfg: TrainConfig, student: str, teachers: Mapping[str, Optional[str]]) -> None:
    """opd-train's start: the cheap rows; a line per row that is not ok, CheckFailed on a fail."""
    if not cfg.check.enabled:
        return
    rows = cheap_rows(cfg, student, teachers)
    for r in rows:
        if r.verdict is Verdict.WARN:
            print(f"check {r.name}: warn: " + "; ".join(r.found[-1:] + r.todo), flush=True)
    raise_on_fail(rows)


def report(cfg: TrainConfig, rows: list[Row], seconds: float) -> Path:
    """Print the table, write check.json; returns its path."""
    from opd.config import as_dict

    print(table(rows), flush=True)
    out = write_json(cfg.check.out or Path(cfg.run_dir) / "check.json", rows, seconds, as_dict(cfg))
    print(f"check.json: {out} ({seconds:.0f}s)", flush=True)
    return out


def _main(node: Any) -> None:
    from opd.config import to_dataclass
    from opd.console import quiet_libraries

    cfg = to_dataclass(node)
    quiet_libraries(cfg.log_level == "debug")
    # both engines in this process, as in opd's actors: no engine-core process each to start
    # (on 2 loaded cores this takes the real pair's check from ~170 s to ~105 s)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t0 = time.time()
    rows = run_check(cfg)
    report(cfg, rows, time.time() - t0)
    raise_on_fail(rows)


def main() -> None:
    import hydra

    from opd.config import CONF_DIR, register_configs
    from opd.errors import exit_on_user_error

    register_configs()
    entry = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(
        exit_on_user_error("opd-check")(_main))
    try:
        entry()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
