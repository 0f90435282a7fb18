"""`opd-eval`: the held-out view of a student against its teacher, as in summary.json.

    opd-eval                                            # the zoo's student and teacher
    opd-eval zoo=smollm2 task=arith_chat                # the real pair
    opd-eval experiment=smollm2_cpu student.path=runs/x/checkpoints/step-000060

Prints (in the "before" column) KL(student‖teacher) per token on the student's own samples, the student's NLL of the
teacher's greedy answers, EOS / truncation / repetition / length against the teacher's, and
extracted-answer accuracy (opd/evaluation.py). Any model directory opd wrote (checkpoints
are Hugging Face model dirs) or a hub id. Runs in one process (no Ray).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from opd.errors import ConfigError, exit_on_user_error


@exit_on_user_error("opd-eval")
def main(argv: list[str] | None = None) -> None:
    from opd.actors import Workers
    from opd.config import load_config
    from opd.evaluation import Evaluator, table, teacher_tables
    from opd.prompt_files import load_splits
    from opd.tasks import prompt_batch
    from opd.zoo import load_tokenizer, resolve_model_paths, teacher_paths

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    cfg = replace(cfg, resources=replace(cfg.resources, use_ray=False, rollout_workers=1))
    student, paths = resolve_model_paths(cfg)[0], teacher_paths(cfg)
    teacher = paths if cfg.teachers else next(iter(paths.values()))
    tok = load_tokenizer(student, cfg.student.trust_remote_code)
    _, heldout = load_splits(cfg.task, tok, cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
                             teachers=list(cfg.teachers))
    if not heldout:
        raise ConfigError("no held-out prompts with answers (task.heldout_file) to evaluate on")
    prompts = prompt_batch(tok, heldout)
    workers = Workers(cfg, student, teacher, teacher_eval_prompts=prompts)
    try:
        ev = Evaluator(cfg, workers, tok, prompts)
        views = {"teacher": ev.teacher(), "before": ev.student()}
    finally:
        workers.shutdown()
    print(f"student {student}\nteacher {teacher}\n" + table(views))
    if cfg.teachers:
        print(teacher_tables(views, list(cfg.teachers)))
    print(json.dumps(views))


if __name__ == "__main__":
    main()
