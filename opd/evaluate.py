"""`opd-eval`: held-out exact match of a model, greedy decoding through vLLM.

    opd-eval                                            # the zoo's student and teacher
    opd-eval student.path=runs/x/checkpoints/step-000060 task=addition

Any model directory opd wrote (checkpoints are Hugging Face model dirs) or a hub id.
"""

from __future__ import annotations

import sys

import numpy as np

from opd.config import load_config


def exact_match_of(model_path: str, cfg, heldout, tokenizer) -> float:
    from opd.rollout import RolloutWorker
    from opd.tasks import encode_prompt, exact_match

    worker = RolloutWorker(model_path, cfg.rollout, 0, cfg.student.trust_remote_code)
    texts = worker.greedy([encode_prompt(tokenizer, e) for e in heldout], cfg.rollout.eval_max_new_tokens)
    del worker
    return float(np.mean([exact_match(t, e.answer) for t, e in zip(texts, heldout)]))


def main(argv: list[str] | None = None) -> None:
    from opd.tasks import load_splits
    from opd.zoo import load_tokenizer, resolve_model_paths

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    student, teacher = resolve_model_paths(cfg)
    tok = load_tokenizer(student, cfg.student.trust_remote_code)
    _, heldout = load_splits(cfg.task, tok, cfg.rollout.max_model_len - cfg.rollout.max_new_tokens)
    if not heldout:
        raise SystemExit("no held-out prompts with answers (task.heldout_file) to evaluate on")
    for name, path in (("student", student), ("teacher", teacher)):
        print(f"{name:8s} held-out exact match {exact_match_of(path, cfg, heldout, tok):.3f}  {path}",
              flush=True)


if __name__ == "__main__":
    main()
