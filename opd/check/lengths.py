"""Row 4 of opd-check: the length forecast.

The student and the teacher each complete `check.prompts` held-out prompts with the run's
`rollout.max_new_tokens` and sampling settings; their EOS rate, truncation, repetition and
lengths (opd/length's `rollout_stats`) are set side by side. A student truncated far more
often than the teacher, or one that never emits the teacher's stop token, is flagged, with
the settings that counter it: `length=auto`, a loss that carries the teacher's EOS mass
(forward KL over its top-k with a tail bucket), and `max_new_tokens` against the teacher's
p95 length. A teacher whose own answers mostly do not fit `max_new_tokens` is flagged too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

from opd.check.report import Row, Verdict
from opd.length import LengthStats, StatsConfig, rollout_stats
from opd.types import RolloutBatch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig

TRUNC_GAP = 0.3  # the student's truncation this far above the teacher's is flagged
TEACHER_TRUNC = 0.5  # a teacher truncated more often than this needs a larger max_new_tokens
COLUMNS = (("EOS", "eos_frac"), ("truncated", "truncated_frac"), ("looping", "repetition_frac"),
           ("mean len", "mean"), ("p95 len", "p95"))


def side_stats(rollouts: RolloutBatch, eos_ids: Collection[int], max_new_tokens: int,
               stats: StatsConfig) -> LengthStats:
    return rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, eos_ids, max_new_tokens, stats)


def student_flags(student: LengthStats, teacher: LengthStats) -> list[str]:
    """Why the student's lengths are a problem against the teacher's ([]: they are not)."""
    out = []
    if student.truncated_frac - teacher.truncated_frac > TRUNC_GAP:
        out.append(f"the student is truncated on {student.truncated_frac:.0%} of its completions, "
                   f"the teacher on {teacher.truncated_frac:.0%}")
    if student.eos_frac == 0 and teacher.eos_frac > 0:
        out.append(f"the student never emits the teacher's stop token (the teacher ends {teacher.eos_frac:.0%} "
                   f"of its completions with it)")
    return out


def teacher_flags(teacher: LengthStats) -> list[str]:
    if teacher.truncated_frac > TEACHER_TRUNC:
        return [f"the teacher itself is truncated on {teacher.truncated_frac:.0%} of its completions"]
    return []


def advice(cfg: TrainConfig, teacher: LengthStats) -> list[str]:
    """The settings that counter a student that does not stop, given the config."""
    out = []
    if cfg.length.mode != "auto":
        out.append(f"length=auto (now length.mode={cfg.length.mode}): remedies that teach the student to stop")
    if cfg.loss.distill != "jsd" or cfg.teacher.logprobs == "sampled":
        out.append("a loss that carries the teacher's EOS mass: loss=gkd loss.jsd_beta=0 teacher.logprobs=topk "
                   "loss.tail_bucket=true (a sampled-token loss cannot teach EOS while EOS is never sampled)")
    cap = cfg.rollout.max_new_tokens
    if teacher.p95 >= cap:
        out.append(f"rollout.max_new_tokens={cap} is at or below the teacher's p95 length ({teacher.p95:.0f}, "
                   f"truncated {teacher.truncated_frac:.0%}): raise it so the teacher's answers fit")
    else:
        out.append(f"rollout.max_new_tokens={cap} is above the teacher's p95 length ({teacher.p95:.0f}): "
                   f"enough room to stop")
    return out


def length_row(cfg: TrainConfig, student: LengthStats, teacher: LengthStats) -> Row:
    """Row 4: the two sides' length statistics, and the verdict on each."""
    head = f"{'':9s}" + "".join(f"{name:>11s}" for name, _ in COLUMNS)
    found = [f"{student.n} held-out prompts, max_new_tokens={student.max_new_tokens}", head]
    for side, s in (("teacher", teacher), ("student", student)):
        found.append(f"{side:9s}" + "".join(f"{getattr(s, key):>11.2f}" for _, key in COLUMNS))
    flags = {"student": student_flags(student, teacher), "teacher": teacher_flags(teacher)}
    found += flags["teacher"] + flags["student"]
    bad = bool(flags["student"] or flags["teacher"])
    todo = advice(cfg, teacher) if bad else []
    data = {side: s.as_metrics("") for side, s in (("student", student), ("teacher", teacher))}
    return Row("length forecast", Verdict.WARN if bad else Verdict.OK, found, todo,
               {**data, "flagged": {k: bool(v) for k, v in flags.items()}})
