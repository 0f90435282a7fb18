"""Held-out evaluation that sees real quality: numbers that mean something on real models.

On a real pair, exact match alone reads 0/0 (a 135M instruct model answers in sentences), so
every evaluation reports, on the held-out prompts:

- `kl`: per-token KL(student‖teacher) of the student's *sampled* completions (T=1, no
  filters), scored by the teacher: mean over tokens of log p_student(y_t) - log p_teacher(y_t).
  This is the objective itself and the headline "gap" of a real pair (the teacher's is 0);
- `nll_teacher_greedy`: the student's per-token NLL of the teacher's greedy completions (the
  forward direction: can the student say what the teacher says?);
- `sampled/*` and `greedy/*`: EOS rate, truncation, repetition and mean length of sampled and
  greedy completions (they can disagree: a student can loop greedily and not when sampling);
- `accuracy/greedy`, `accuracy/sampled`: the share of completions whose *extracted* answer
  is right (opd/tasks.py: exact, last_number, regex).

`Evaluator.probe` is the length controller's greedy probe: the same greedy generation on a
few held-out prompts, under the rollouts' cap, as length statistics.

The teacher gets the same view (its own greedy and sampled completions) once, at start.
With several teachers every view is also given per teacher, over the prompts that name it
(keys `<name>/kl`, `<name>/accuracy/greedy`, ...): the teacher's own view on its prompts,
and the student's against that teacher.
Pure functions over typed batches: no Ray, no I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Collection, Optional, Sequence

import numpy as np

from opd.batch import build_train_batch, teacher_kl_metrics
from opd.data_parallel import by_teacher
from opd.length import LengthStats, StatsConfig, rollout_stats
from opd.tasks import answer_correct
from opd.types import PromptBatch, RolloutBatch, SamplingSettings, TeacherScores

if TYPE_CHECKING:
    from opd.config import RolloutConfig

LENGTH_KEYS = ("eos_frac", "truncated_frac", "repetition_frac", "mean")


def eval_settings(max_new_tokens: int, greedy: bool, seed: int = 0) -> SamplingSettings:
    """Greedy, or plain sampling at T=1 (no top-p/top-k/penalty: the model's own distribution,
    so that sampled KL is KL(student‖teacher) at temperature 1)."""
    from dataclasses import replace

    from opd.rollout import greedy_settings

    plain = greedy_settings(max_new_tokens)
    return plain if greedy else replace(plain, temperature=1.0, seed=seed)


def configured_settings(r: "RolloutConfig", max_new_tokens: int, seed: int = 0) -> Optional[SamplingSettings]:
    """One sample per prompt with the rollouts' own temperature / top-p / top-k / repetition
    penalty (what a user deploying with them would see); None where they are plain T=1
    sampling, which the `sampled` view already is."""
    from dataclasses import replace

    plain = eval_settings(max_new_tokens, greedy=False, seed=seed)
    tuned = replace(plain, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    repetition_penalty=r.repetition_penalty)
    return None if tuned == plain else tuned


def accuracy(rollouts: RolloutBatch, prompts: PromptBatch) -> float:
    """Share of completions whose extracted answer equals the prompt's answer (one per prompt)."""
    hits = [answer_correct(t, prompts.answers[i], prompts.extraction(i)) for i, t in enumerate(rollouts.texts)]
    return float(np.mean(hits)) if hits else math.nan


def length_view(rollouts: RolloutBatch, eos_ids: Collection[int], max_new_tokens: int,
                prefix: str, stats_cfg: StatsConfig) -> dict[str, float]:
    """EOS rate, truncation, repetition and mean length of some completions."""
    stats = rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, eos_ids, max_new_tokens, stats_cfg)
    return {f"{prefix}/{k}": float(getattr(stats, k)) for k in LENGTH_KEYS}


def model_view(prompts: PromptBatch, sampled: RolloutBatch, greedy: RolloutBatch,
               eos_ids: Collection[int], max_new_tokens: int, stats_cfg: StatsConfig) -> dict[str, float]:
    """The metrics every model gets: lengths and accuracy of its sampled and greedy completions."""
    return {**length_view(sampled, eos_ids, max_new_tokens, "sampled", stats_cfg),
            **length_view(greedy, eos_ids, max_new_tokens, "greedy", stats_cfg),
            "accuracy/greedy": accuracy(greedy, prompts), "accuracy/sampled": accuracy(sampled, prompts)}


def student_view(prompts: PromptBatch, sampled: RolloutBatch, greedy: RolloutBatch,
                 scores: TeacherScores, nll_teacher_greedy: float, eos_ids: Collection[int],
                 max_new_tokens: int, stats_cfg: StatsConfig) -> dict[str, float]:
    """model_view plus the divergences from the teacher (`kl`, `nll_teacher_greedy`)."""
    return {"kl": teacher_kl_metrics(sampled, scores)["teacher/kl"],
            "nll_teacher_greedy": float(nll_teacher_greedy),
            **model_view(prompts, sampled, greedy, eos_ids, max_new_tokens, stats_cfg)}


def per_teacher(teachers: Sequence[str], view: Callable[[list[int]], dict[str, float]]) -> dict[str, float]:
    """`view(rows)` of each teacher's prompts (prompt p: `teachers[p]`), its keys prefixed
    `<name>/` ({} for the one teacher)."""
    return {f"{name}/{k}": v for name, rows in by_teacher(teachers).items() for k, v in view(rows).items()}


def mean_nll(logprobs_BS: np.ndarray, mask_BS: np.ndarray) -> float:
    """Per-token NLL: -sum(log p * mask) / sum(mask) (nan for an empty mask)."""
    n = float(mask_BS.sum())
    return float(-(logprobs_BS * mask_BS).sum() / n) if n else math.nan


class Evaluator:
    """Runs the held-out views through the workers (Ray actors or in-process objects)."""

    def __init__(self, cfg, workers, tokenizer, heldout: Optional[PromptBatch]):
        self.cfg, self.workers, self.heldout = cfg, workers, heldout
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.eos_ids = {self.eos} | set(cfg.rollout.stop_token_ids)
        self.n, self.stats_cfg = cfg.rollout.eval_max_new_tokens, cfg.length.stats  # what counts as a loop

    def student(self) -> dict[str, float]:
        """The student's held-out view: KL to the teacher on its own samples, NLL of the
        teacher's greedy answers, lengths and answer accuracy ({} without held-out prompts)."""
        if self.heldout is None:
            return {}
        sampled = self.workers.generate(self.heldout, eval_settings(self.n, greedy=False, seed=self.cfg.seed))
        greedy = self.workers.generate(self.heldout, eval_settings(self.n, greedy=True))
        batch = build_train_batch(self.workers.teacher_eval[0], None, self.pad, self.eos, on_policy=False,
                                  temperature=1.0)
        logprobs, mask, h = self.workers.student_logprobs(batch), batch.loss_mask_BS, self.heldout
        scores = self.workers.score(sampled, h.teachers)

        def view(rows: list[int]) -> dict[str, float]:  # one row per held-out prompt throughout
            return student_view(h.select(rows), sampled.select(rows), greedy.select(rows), scores.select(rows),
                                mean_nll(logprobs[rows], mask[rows]), self.eos_ids, self.n, self.stats_cfg)

        return {**view(list(range(len(h.prompt_ids)))), **self._configured(), **per_teacher(h.teachers, view)}

    def probe(self, n_prompts: int, max_new_tokens: int) -> LengthStats:
        """Length statistics of the student's greedy completions of the first `n_prompts`
        held-out prompts (the length controller's greedy probe)."""
        prompts = self.heldout.rows(slice(0, n_prompts))
        greedy = self.workers.generate(prompts, eval_settings(max_new_tokens, greedy=True))
        return rollout_stats(greedy.completion_ids, greedy.finish_reasons, self.eos_ids, max_new_tokens, self.stats_cfg)

    def _configured(self) -> dict[str, float]:
        """Lengths of one sample per held-out prompt under the rollouts' sampling settings
        (`configured/...`; {} when those are plain T=1 sampling)."""
        settings = configured_settings(self.cfg.rollout, self.n, seed=self.cfg.seed)
        if settings is None:
            return {}
        return length_view(self.workers.generate(self.heldout, settings), self.eos_ids, self.n, "configured",
                           self.stats_cfg)

    def teacher(self) -> dict[str, float]:
        """The teacher's own view, from its greedy and sampled completions made at start; its
        NLL of its own greedy answers is the floor of the student's."""
        if self.heldout is None:
            return {}
        (greedy, sampled), h = self.workers.teacher_eval, self.heldout
        own = self.workers.score(greedy, h.teachers)

        def view(rows: list[int]) -> dict[str, float]:
            nll = float(-np.mean(np.concatenate([own.logprobs_NT[i, :greedy.lengths[i]] for i in rows])))
            return {"nll_teacher_greedy": nll, **model_view(h.select(rows), sampled.select(rows),
                                                            greedy.select(rows), self.eos_ids, self.n, self.stats_cfg)}

        return {**view(list(range(len(h.prompt_ids)))), **per_teacher(h.teachers, view)}


# ---------------------------------------------------------------------------- reporting
ROWS = (  # (key, label) of the end-of-run table
    ("kl", "KL(student||teacher) per token, sampled"),
    ("nll_teacher_greedy", "student NLL of teacher's greedy answers"),
    ("accuracy/greedy", "answer accuracy, greedy"),
    ("accuracy/sampled", "answer accuracy, sampled"),
    ("sampled/eos_frac", "EOS rate, sampled"),
    ("sampled/truncated_frac", "truncated, sampled"),
    ("sampled/repetition_frac", "repetitive, sampled"),
    ("sampled/mean", "mean length, sampled"),
    ("greedy/eos_frac", "EOS rate, greedy"),
    ("greedy/truncated_frac", "truncated, greedy"),
    ("greedy/repetition_frac", "repetitive, greedy"),
    ("configured/eos_frac", "EOS rate, rollout sampling settings"),
    ("configured/truncated_frac", "truncated, rollout sampling settings"),
    ("configured/repetition_frac", "repetitive, rollout sampling settings"),
)


GAP_FLOOR = 0.01  # the smallest teacher-student gap, relative to its scale, that gap_closed reports


def gap_closed(teacher: Optional[float], before: Optional[float], after: Optional[float]) -> Optional[float]:
    """(after - before) / (teacher - before); None where it is undefined: a nan, or no gap to
    speak of (under 1% of the quantity's scale, max(1, |teacher|, |before|): a rate 0.995 against
    1.0, or a mean length 3.535 against 3.525, where the ratio would only magnify noise)."""
    vals = (teacher, before, after)
    if any(v is None or not math.isfinite(v) for v in vals):
        return None
    if abs(teacher - before) < GAP_FLOOR * max(1.0, abs(teacher), abs(before)):
        return None
    return (after - before) / (teacher - before)


def _cell(v: Optional[float]) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def table(evals: dict[str, dict[str, float]]) -> str:
    """The end-of-run table: teacher / before / after (/ gap closed, once there is an 'after')
    for every held-out metric. The teacher's KL to itself is 0 by definition; a gap that is 0
    or undefined prints '-', never a 0/0."""
    t, b, a = (evals.get(k, {}) for k in ("teacher", "before", "after"))
    t = {**t, "kl": 0.0}
    cols = ["teacher", "before"] + (["after", "gap closed"] if a else [])
    lines = [f"  {'held-out metric':42s}" + "".join(f" {c:>10s}" for c in cols)]
    for key, label in ROWS:
        if key not in b and key not in a:
            continue
        cells = [_cell(t.get(key)), _cell(b.get(key))]
        if a:
            g = gap_closed(t.get(key), b.get(key), a.get(key))
            cells += [_cell(a.get(key)), "-" if g is None else f"{g:.0%}"]
        lines.append(f"  {label:42s}" + "".join(f" {c:>10s}" for c in cells))
    return "\n".join(lines)


def teacher_tables(evals: dict[str, dict[str, float]], teachers: Sequence[str]) -> str:
    """`table` for each teacher's prompts (their `<name>/` keys), one after the other."""
    def mine(view: dict[str, float], name: str) -> dict[str, float]:
        return {k[len(name) + 1:]: v for k, v in view.items() if k.startswith(f"{name}/")}

    return "\n".join(f"teacher {name}'s prompts:\n" + table({k: mine(v, name) for k, v in evals.items()})
                     for name in teachers)


def flatten(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()}
