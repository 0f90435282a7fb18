"""The on-policy distillation loop: the algorithm, top to bottom.

    for each step:
        prompts   <- the task's train prompts
        rollouts  <- the student samples G completions per prompt (vLLM rollout workers)
        scores    <- the teacher's log-probs of those exact tokens
        plan      <- the length monitor's statistics, events and penalties
        batch     <- rollouts + scores + penalties (+ SMPO pairs)
        metrics   <- one learner step (distillation + SMPO + SFT)
        sync      <- the learner's new weights into every rollout worker
        log; eval every N steps; checkpoint every M steps

With `loss.on_policy_fraction < 1` (GKD's lambda), the other steps train on off-policy
completions (the teacher's samples, or the dataset's answers) with the SFT term: at 0 this
is sequence-level KD. Nothing here knows whether the workers are Ray actors or plain objects.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from opd import length
from opd.actors import LearnerDied
from opd.batch import (RowWeights, answer_rollouts, build_train_batch, effective_weights, select_pairs,
                       teacher_kl_metrics, with_extra_rows)
from opd.evaluation import Evaluator, flatten
from opd.formatting import RolloutFormat, check_rollouts
from opd.evaluation import table as eval_table
from opd.rollout import greedy_settings
from opd.console import Console
from opd.report import STEP_PHASES
from opd.run_io import RunDir, newest_checkpoint, read_metrics, rng_state_from_json, rng_state_to_json
from opd.sweep import best_finished_run, early_stop_decision
from opd.tasks import Example, answer_correct, encode_answer, prompt_batch, sample_batch
from opd.types import (CheckpointState, PromptBatch, RolloutBatch, SamplingSettings, StepMetrics, Summary,
                       TrainBatch)

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import FormatConfig, RolloutConfig, TrainConfig


STEP_SEED_STRIDE = 100003  # rollout.seed's spacing: seeds of different runs never meet


def sampling_settings(r: RolloutConfig, max_new_tokens: int, step: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, repetition_penalty=r.repetition_penalty, stop=tuple(r.stop),
                            stop_token_ids=tuple(r.stop_token_ids), seed=r.seed * STEP_SEED_STRIDE + step,
                            n=r.samples_per_prompt)


def make_monitor(cfg: TrainConfig, eos_id: int, reference: Optional[length.ReferenceLengths]) -> length.LengthMonitor:
    """The length monitor of `cfg.length`: its detector thresholds are LengthConfig's fields
    of the same names; its penalties and remedies are the rest."""
    ln = cfg.length
    det = length.DetectorConfig(**{f.name: getattr(ln, f.name) for f in fields(length.DetectorConfig)})
    pen = length.PenaltyConfig(
        max_new_tokens=cfg.rollout.max_new_tokens, overlong_buffer=ln.overlong_buffer,
        stop_properly_mode=ln.stop_properly_mode, stop_properly_weight=ln.stop_properly_weight,
        length_ratio_coef=ln.length_ratio_coef, length_ratio_tolerance=ln.length_ratio_tolerance,
        adaptive_max_new_tokens=ln.adaptive_max_new_tokens and reference is not None,
        adaptive_shrink=ln.adaptive_shrink, adaptive_grow=ln.adaptive_grow, reference=reference,
        topk_kl_coef=ln.topk_kl_coef, mixture_fraction=ln.mixture_fraction,
        mixture_sft_coef=ln.mixture_sft_coef, anchor_coef=ln.anchor_coef, loop_tail=ln.loop_tail_rule,
        tail_window=ln.tail_window,
        # the guard protects the policy-gradient term, the one stop-properly weights act on
        min_effective_weight=ln.min_effective_weight if cfg.loss.distill == "reverse_kl_pg" else 0.0,
        **format_penalty(cfg.format))
    return length.LengthMonitor({eos_id} | set(cfg.rollout.stop_token_ids), pen, det, mode=ln.mode,
                           min_length=ln.min_length, ngram=ln.ngram, tail_window=ln.tail_window,
                           repeat_threshold=ln.repeat_threshold)


def format_penalty(f: FormatConfig) -> dict:
    """The PenaltyConfig fields of the format checks: they act only when rollouts are checked."""
    on = bool(f.rollouts and f.checks)
    return {"malformed_weight": f.seq_weight if on else 1.0,
            "prefer_malformed_rejected": bool(on and f.prefer_rejected)}


def rollout_format(f: FormatConfig, rollouts: RolloutBatch, special_ids: set) -> Optional[RolloutFormat]:
    """Format checks of a step's rollouts (None when format.rollouts is off or no check is on)."""
    if not (f.rollouts and f.checks):
        return None
    return check_rollouts(rollouts.texts, rollouts.completion_ids, f.checks, f.extra_tokens, special_ids)


@dataclass(frozen=True)
class Pending:
    """rollout.overlap: the next step's prompts and the rollouts generated for them."""

    prompts: PromptBatch
    rollouts: RolloutBatch

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Pending"]:
        """From `asdict` (a checkpoint's JSON); None stays None."""
        return None if d is None else cls(PromptBatch(**d["prompts"]), RolloutBatch(**d["rollouts"]))


@dataclass(frozen=True)
class StepResult:
    """A step's batch, its metrics so far (the loop adds training, sync and timing) and the
    length monitor's events."""

    batch: TrainBatch
    metrics: dict[str, float]
    events: list[length.LengthEvent] = field(default_factory=list)


def row_weights(plan: length.PenaltyPlan, stats: length.LengthStats, rollouts: RolloutBatch,
                malformed: Optional[list[bool]]) -> RowWeights:
    """The plan's per-row weights for a step's student rollouts."""
    reasons = rollouts.finish_reasons
    return RowWeights(on_policy=np.ones(len(reasons), bool), seq_weight_N=length.loss_weights(plan, reasons, malformed),
                      seq_advantage_N=length.apply_sequence_penalty(plan, rollouts.lengths, reasons),
                      remedy_weight_N=plan.remedy_weights(stats, reasons), no_reward_tail_N=plan.no_reward_tails(stats))


class PhaseTimer:
    """Seconds per named phase of one step: `with timer("learn"): ...`."""

    def __init__(self):
        self.t0, self.seconds = time.time(), {}

    @contextmanager
    def __call__(self, phase: str):
        t = time.time()
        yield
        self.seconds[f"time/{phase}"] = time.time() - t

    def metrics(self, reported: dict[str, float]) -> dict[str, float]:
        """Measured phases, the workers' own (generate, teacher) and the rest as time/other."""
        out = {**self.seconds, "time/step": time.time() - self.t0}
        known = sum(v for k, v in {**reported, **self.seconds}.items() if k in STEP_PHASES)
        out["time/other"] = out["time/step"] - known
        return out


class Distillation:
    """State of one run; `run()` is the loop. `checkpoint()` can be called from outside
    (Ctrl-C, actor error) to save the last completed step."""

    def __init__(self, cfg: TrainConfig, workers: Any, tokenizer: Any, train: list[Example],
                 heldout: list[Example], run_dir: RunDir):
        self.cfg, self.workers, self.tok, self.run_dir = cfg, workers, tokenizer, run_dir
        self.train_set, self.heldout = train, prompt_batch(tokenizer, heldout) if heldout else None
        self.evaluator = Evaluator(cfg, workers, tokenizer, self.heldout)
        self.rng = random.Random(cfg.seed)
        self.step, self.summary = 0, Summary()
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.monitor: Optional[length.LengthMonitor] = None
        self.starved = 0  # steps whose batch trained on (almost) nothing
        self.reference: Optional[length.ReferenceLengths] = None
        self.pending: Optional[Pending] = None  # rollout.overlap: the next step's rollouts, ready
        self.in_flight: Optional[Callable[[], Pending]] = None  # ... or still being generated

    # ------------------------------------------------------------------ the loop
    def run(self, resume: Optional[CheckpointState] = None) -> Summary:
        t_start = time.time()
        self.start(resume)
        while self.step < self.cfg.steps:
            step, timer = self.step + 1, PhaseTimer()
            prompts = self.pending.prompts if self.pending else self.next_prompts()
            on_policy = self.rng.random() < self.cfg.loss.on_policy_fraction  # GKD's lambda
            result = self.on_policy_batch(prompts, step) if on_policy else self.off_policy_batch(prompts, step)
            try:
                self.train_and_sync(result, timer)
            except LearnerDied as e:
                self.recover_learner(e)  # back to the newest checkpoint: its later steps are redone
                continue
            self.step = step
            self.log_step(step, result, timer)
            if self.early_stop(step):
                break
            self.periodic(step)
        return self.finish(t_start)

    def train_and_sync(self, result: StepResult, timer: PhaseTimer) -> None:
        """One learner step on the batch, then its weights into every rollout worker (first
        waiting for the next step's rollouts, with rollout.overlap)."""
        with timer("learn"):
            result.metrics.update(self.workers.train(result.batch))
        with timer("generate_wait"):
            self.pending = self.in_flight() if self.in_flight else None
        with timer("sync"):
            update, versions = self.workers.sync()
        result.metrics.update({"sync/version": float(min(versions)), "sync/mb": update.nbytes / 2**20,
                               "fault/restarts": float(self.workers.restarts)})

    def start(self, resume: Optional[CheckpointState]) -> None:
        """Fresh: reference lengths, the teacher's and the student's held-out view, a monitor.
        Resumed: all of it from the checkpoint. Then the console and the state to fall back to."""
        if resume:
            self.restore(resume)
        else:
            self.reference = self.reference_lengths()
            before = self.evaluator.student()
            teacher = self.evaluator.teacher()
            self.summary = Summary(eval={"teacher": teacher, "before": before},
                                   teacher=teacher.get("accuracy/greedy", math.nan),
                                   student_before=before.get("accuracy/greedy", math.nan))
            self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        self.console = Console(self.cfg.steps, self.cfg.log_every, start_step=self.step)
        if self.heldout is not None:
            self.console.note("held-out before training:\n" + eval_table(self.summary.eval))
        self.start_state = self.loop_state()  # for a learner lost before the first checkpoint

    def finish(self, t_start: float) -> Summary:
        """The held-out view after training, the summary, and a final checkpoint."""
        self.console.close()
        after = self.evaluator.student()
        s = self.summary
        s.eval["after"], s.student_after = after, after.get("accuracy/greedy", math.nan)
        s.starved_steps, s.wall_seconds, s.steps_done = self.starved, time.time() - t_start, self.step
        self.checkpoint()
        return s

    def gradient_share(self, batch, step: int) -> dict[str, float]:
        """length/effective_weight*: the share of the batch's tokens that carry gradient, per
        term; a step under length.min_effective_weight, or with none at all, is counted and
        said, never silent."""
        loss = self.cfg.loss
        terms = {"pg": loss.distill == "reverse_kl_pg" and loss.distill_coef > 0,
                 "jsd": loss.distill == "jsd" and loss.distill_coef > 0, "sft": True,
                 "smpo": loss.smpo_coef > 0, "remedy": batch.remedy_weight_B is not None,
                 "anchor": batch.anchor_coef > 0}
        share, floor = effective_weights(batch, terms), self.cfg.length.min_effective_weight
        w = share["length/effective_weight"]
        if w < floor or w == 0.0:  # a batch with no gradient at all is said even with the floor at 0
            self.starved += 1
            self.console.note(f"warning: step {step} trains on {w:.1%} of its tokens (length/effective_weight"
                              f" {'= 0' if w == 0 else '<'} length.min_effective_weight={floor:g}); "
                              f"{self.starved} such steps so far")
        return {**share, "length/starved_steps": float(self.starved)}

    def early_stop(self, step: int) -> bool:
        """The early-stop rule (`early_stop.*`, opd/sweep.py) at step `after_steps`: its
        verdict goes to summary.json; a stopped run is evaluated and checkpointed as usual."""
        es = self.cfg.early_stop
        if not es.enabled or step != es.after_steps:
            return False
        best = None
        if es.sweep_dir:
            sweep_dir = self.run_dir.path.parent if es.sweep_dir == "auto" else es.sweep_dir
            best = best_finished_run(sweep_dir, es.quality, es.after_steps, exclude=self.run_dir.path)
        rows = read_metrics(self.run_dir.path)
        d = early_stop_decision(rows, es.after_steps, es.signal, es.better, es.threshold,
                                best.early[es.signal] if best else None, es.tolerance,
                                best.path if best else None)
        if d is None:  # fewer step lines than steps (a resumed run lost some): no verdict
            return False
        self.summary.early_stop = d.as_dict()
        self.console.note(("EARLY STOP at step {}: {}; evaluating and saving a final checkpoint"
                           if d.stop else "early-stop check at step {}: {}").format(step, d.reason))
        return d.stop

    def log_step(self, step: int, result: StepResult, timer: PhaseTimer) -> None:
        """The step's metrics line (with its gradient share and phase times) and console line."""
        values = {**result.metrics, **self.gradient_share(result.batch, step), **timer.metrics(result.metrics)}
        events = [e.as_dict() for e in result.events] + self.workers.take_events()
        self.run_dir.log(StepMetrics(step, values, events))
        for e in events:
            if "condition" in e:  # restart events are printed where they happen
                self.console.note(f"length monitor: step {e['step']} {e['condition']} -> {e['state']} "
                                  f"({e['reason']})")
        self.console.step(step, values)

    def periodic(self, step: int) -> None:
        """Evaluation and checkpoint cadence (the last step's are done after the loop)."""
        if step >= self.cfg.steps:
            return
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            view = self.evaluator.student()
            self.run_dir.log(StepMetrics(step, flatten("eval/", view)))
            self.console.note(f"step {step}: held-out KL {view.get('kl', math.nan):.3f}, accuracy (greedy) "
                              f"{view.get('accuracy/greedy', math.nan):.3f}")
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0:
            self.checkpoint()

    # ------------------------------------------------------------------ a step's batch
    def on_policy_batch(self, prompts: PromptBatch, step: int) -> StepResult:
        """The student's rollouts, scored by the teacher, shaped by the length monitor's plan
        (penalties, the top-k KL remedy, the loop-tail rule, teacher mixture rows)."""
        rollouts = self.student_rollouts(prompts, step)
        scores = self.workers.score(rollouts)
        stats, events, plan = self.monitor.observe(rollouts.completion_ids, rollouts.finish_reasons, step)
        fmt = rollout_format(self.cfg.format, rollouts, self.special_ids)
        malformed = fmt.malformed if fmt is not None else None
        pairs = (select_pairs(rollouts, scores, prompts, self.cfg.rollout.samples_per_prompt, self.cfg.loss.smpo,
                              plan, stats.repetitive, malformed) if self.cfg.loss.smpo_coef else None)
        metrics = self.step_metrics(prompts, rollouts, scores, stats, plan, fmt, pairs)
        rows = row_weights(plan, stats, rollouts, malformed)
        t_mix = time.time()
        mix = self.teacher_mixture(prompts, plan, step)
        metrics["time/teacher_generate"] = time.time() - t_mix  # the mixture rows' teacher samples
        if mix is not None:  # StableOPD's rollout mixture: teacher rows, trained by SFT
            rollouts, scores = with_extra_rows(rollouts, scores, mix)
            rows = rows.with_sft_rows(len(mix.completion_ids), plan.mixture_sft_coef)
            metrics["length/mixture_rows"] = float(len(mix.completion_ids))
        batch = build_train_batch(rollouts, scores, self.pad, self.eos, temperature=self.cfg.rollout.temperature,
                                  pairs=pairs, anchor_coef=plan.anchor_coef, **rows.as_kwargs())
        r = self.cfg.rollout
        if metrics["rollout/staleness"] > 0 and r.overlap_correction == "tis":
            batch = replace(batch, is_cap=r.overlap_tis_cap)
        return StepResult(batch, metrics, events)

    def step_metrics(self, prompts, rollouts, scores, stats, plan, fmt, pairs) -> dict[str, float]:
        """An on-policy step's metrics before training: lengths, the plan, the detector, the
        rollouts against the teacher, their format and SMPO's pairs."""
        out = {**stats.as_metrics(), **plan.as_metrics(), **self.monitor.detector.metrics(),
               **self.rollout_metrics(prompts, rollouts, scores), **(fmt.metrics() if fmt else {})}
        if pairs is not None:
            out.update({"smpo/pairs": float(len(pairs.chosen_rows)), "smpo/pairs_skipped": float(pairs.skipped)})
        return out

    def student_rollouts(self, prompts: PromptBatch, step: int) -> RolloutBatch:
        """This step's rollouts: generated now, or (rollout.overlap) the ones generated while
        the previous step trained. With overlap the next step's generation starts here, from
        the weights of this step's start, and runs while this step is scored and trained."""
        settings = lambda s: sampling_settings(self.cfg.rollout, self.monitor.max_new_tokens, s)  # noqa: E731
        rollouts = self.pending.rollouts if self.pending else self.workers.generate(prompts, settings(step))
        self.pending = self.in_flight = None
        if self.cfg.rollout.overlap and step < self.cfg.steps:
            nxt = self.next_prompts()
            done = self.workers.generate_async(nxt, settings(step + 1))
            self.in_flight = lambda: Pending(nxt, done())
        return rollouts

    def rollout_metrics(self, prompts: PromptBatch, rollouts, scores) -> dict[str, float]:
        G, n_tok = self.cfg.rollout.samples_per_prompt, sum(rollouts.lengths)
        hits = [answer_correct(t, prompts.answers[n // G], prompts.extraction(n // G))
                for n, t in enumerate(rollouts.texts)]
        return {**teacher_kl_metrics(rollouts, scores), "rollout/train_accuracy": float(np.mean(hits)),
                "rollout/tokens": float(n_tok), "rollout/tokens_per_s": n_tok / max(1e-9, rollouts.seconds),
                "rollout/weight_version": float(rollouts.weight_version), "rollout/on_policy": 1.0,
                "rollout/staleness": float(self.step - rollouts.weight_version),
                # a generation that overlapped the previous step is not part of this one's time
                "time/generate" if not self.cfg.rollout.overlap else "time/generate_overlapped":
                    rollouts.seconds, "time/teacher": scores.seconds}

    def teacher_mixture(self, prompts: PromptBatch, plan, step: int):
        """Teacher completions for a share of this step's prompts, the ones that end in EOS
        (None when the remedy is off or none stopped)."""
        k = math.ceil(plan.mixture_fraction * len(prompts.prompt_ids))
        if k == 0:
            return None
        settings = replace(sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step), n=1)
        out = self.workers.teacher_generate(prompts.rows(slice(0, k)), settings)
        keep = [i for i, r in enumerate(out.finish_reasons) if r == "stop"]
        if not keep:
            return None
        return RolloutBatch(*([getattr(out, f)[i] for i in keep] for f in
                              ("prompt_ids", "completion_ids", "sampler_logprobs", "finish_reasons", "texts")),
                            weight_version=-1)

    def off_policy_batch(self, prompts: PromptBatch, step: int):
        """Teacher samples (sequence-level KD) or dataset answers, trained with SFT."""
        G, t0 = self.cfg.rollout.samples_per_prompt, time.time()
        if self.cfg.loss.off_policy_source == "teacher":
            rollouts = self.workers.teacher_generate(prompts, sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step))
        else:
            rollouts = answer_rollouts([p for p in prompts.prompt_ids for _ in range(G)],
                                       [encode_answer(self.tok, a) for a in prompts.answers for _ in range(G)])
        batch = build_train_batch(rollouts, None, self.pad, self.eos, on_policy=False, temperature=1.0,
                                  sft_weight_N=np.full(len(rollouts.completion_ids), self.cfg.loss.sft_coef))
        stats = length.rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, {self.eos},
                                self.cfg.rollout.max_new_tokens)
        return StepResult(batch, {**stats.as_metrics("offpolicy/"), "rollout/on_policy": 0.0,
                                  "rollout/tokens": float(sum(rollouts.lengths)), "time/generate": time.time() - t0})

    # ------------------------------------------------------------------ data, eval, state
    def next_prompts(self) -> PromptBatch:
        exs = sample_batch(self.train_set, self.cfg.rollout.prompts_per_step, self.rng)
        return prompt_batch(self.tok, exs)

    def reference_lengths(self) -> Optional[length.ReferenceLengths]:
        """Teacher greedy generations on a sample of train prompts (or the dataset's answers)."""
        n = self.cfg.length.reference_prompts
        if n > 0:
            exs = random.Random(self.cfg.seed + 1).sample(self.train_set, min(n, len(self.train_set)))
            out = self.workers.teacher_generate(prompt_batch(self.tok, exs), greedy_settings(self.cfg.rollout.max_new_tokens))
            return length.reference_lengths(out.completion_ids)
        answers = [encode_answer(self.tok, e.answer) for e in self.train_set[:256] if e.answer]
        return length.reference_lengths(answers) if answers else None

    def checkpoint(self) -> Optional[str]:
        if self.step == 0:
            return None
        path = self.workers.save_checkpoint(str(self.run_dir.checkpoint_dir(self.step)), self.loop_state())
        self.run_dir.prune(self.cfg.keep_checkpoints)
        return path

    def loop_state(self) -> CheckpointState:
        """What a checkpoint keeps of the loop: step, data cursor, monitor, summary, pending rollouts."""
        return CheckpointState(
            step=self.step, rng_state=rng_state_to_json(self.rng.getstate()),
            summary=json.loads(json.dumps(self.summary.as_dict())),
            monitor=self.monitor.state_dict() if self.monitor else None, starved=self.starved,
            reference=None if self.reference is None else [self.reference.mean, self.reference.p95],
            pending=asdict(self.pending) if self.pending else None)

    def recover_learner(self, err: Exception) -> None:
        """The learner died: rebuild it from the newest whole checkpoint (or the start of this
        run) and rewind the loop to that step; the steps since are replayed."""
        ckpt = newest_checkpoint(self.run_dir, "learner restart", upto=self.step)
        self.restore(self.workers.restart_learner(ckpt, str(err)) or self.start_state)

    def restore(self, state: CheckpointState) -> None:
        self.step = state.step
        self.rng.setstate(rng_state_from_json(state.rng_state))
        self.summary = Summary.from_dict(json.loads(json.dumps(state.summary)))
        self.starved = state.starved
        self.pending, self.in_flight = Pending.from_dict(state.pending), None
        self.reference = length.ReferenceLengths(*state.reference) if state.reference else None
        self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        if state.monitor:
            self.monitor.load_state_dict(state.monitor)
        self.run_dir.truncate_metrics(self.step)
