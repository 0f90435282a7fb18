"""The on-policy distillation loop: the algorithm, top to bottom.

    for each step:
        prompts   <- the task's train prompts
        rollouts  <- the student samples G completions per prompt (vLLM rollout workers)
        scores    <- the teacher's log-probs of those exact tokens (each prompt's own teacher)
        plan      <- the length monitor's statistics, events and penalties
        batch     <- rollouts + scores + penalties (+ SMPO pairs)
        metrics   <- one learner step (distillation + SMPO + SFT)
        sync      <- the learner's new weights into every rollout worker
        probe     <- every length.probe_every steps: the student's greedy view, for the controller
        log; eval every N steps; checkpoint every M steps

With `loss.on_policy_fraction < 1` (GKD's lambda), the other steps train on off-policy
completions (the teacher's samples, or the dataset's answers) with the SFT term: at 0 this
is sequence-level KD. How a step's batch is put together is opd/steps.py; what the run
writes and says, opd/record.py. The loop is typed against `LoopWorkers` (opd/types.py):
nothing here knows whether the workers are Ray actors, plain objects or a test's fakes.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from opd import length
from opd.evaluation import Evaluator
from opd.record import PhaseTimer, RunRecord
from opd.rollout import greedy_settings
from opd.run_io import RunDir, newest_checkpoint, rng_state_from_json, rng_state_to_json
from opd.steps import REFERENCE_STEP, StepBatches, StepResult, sampling_settings
from opd.tasks import Example, encode_answer, prompt_batch, sample_batch
from opd.types import (CheckpointState, LearnerDied, LoopWorkers, Pending, PromptBatch, RolloutBatch,
                       SamplingSettings, Summary)

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import FormatConfig, TrainConfig


def make_monitor(cfg: TrainConfig, eos_id: int, reference: Optional[length.ReferenceLengths]) -> length.LengthMonitor:
    """The length monitor of `cfg.length`, under the configured cap, with the format checks'
    penalty; its gradient guard is on when the loss has a policy-gradient term."""
    return length.LengthMonitor({eos_id} | set(cfg.rollout.stop_token_ids), cfg.rollout.max_new_tokens,
                                cfg.length, reference, policy_gradient=cfg.loss.distill == "reverse_kl_pg",
                                **format_penalty(cfg.format))


def format_penalty(f: FormatConfig) -> dict:
    """The LengthMonitor arguments of the format checks: they act only when rollouts are checked."""
    on = bool(f.rollouts and f.checks)
    return {"malformed_weight": f.seq_weight if on else 1.0,
            "prefer_malformed_rejected": bool(on and f.prefer_rejected)}


class Distillation:
    """State of one run; `run()` is the loop. `checkpoint()` can be called from outside
    (Ctrl-C, actor error) to save the last completed step."""

    def __init__(self, cfg: TrainConfig, workers: LoopWorkers, tokenizer: Any, train: list[Example],
                 heldout: list[Example], run_dir: RunDir):
        self.cfg, self.workers, self.tok, self.run_dir = cfg, workers, tokenizer, run_dir
        self.train_set, self.heldout = train, prompt_batch(tokenizer, heldout) if heldout else None
        self.evaluator = Evaluator(cfg, workers, tokenizer, self.heldout)
        self.batches, self.record = StepBatches(cfg, workers, tokenizer), RunRecord(cfg, run_dir)
        self.rng, self.step, self.eos = random.Random(cfg.seed), 0, tokenizer.eos_token_id
        self.monitor: Optional[length.LengthMonitor] = None
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
            result = self.on_policy_step(prompts, step) if on_policy else self.batches.off_policy(prompts, step)
            try:
                self.train_and_sync(result, timer)
            except LearnerDied as e:
                self.recover_learner(e)  # back to the newest checkpoint: its later steps are redone
                continue
            self.step = step
            self.greedy_probe(step, result, timer)
            self.record.log_step(step, result, timer, self.workers.take_events())
            if self.record.early_stop(step):
                break
            self.periodic(step)
        return self.finish(t_start)

    def on_policy_step(self, prompts: PromptBatch, step: int) -> StepResult:
        """The student's rollouts, scored by the teacher and observed by the length monitor,
        as a batch shaped by the monitor's plan."""
        rollouts = self.student_rollouts(prompts, step)
        scores = self.workers.score(rollouts, prompts.rollout_teachers(self.cfg.rollout.samples_per_prompt))
        stats, events, plan = self.monitor.observe(rollouts.completion_ids, rollouts.finish_reasons, step)
        observed = {**stats.as_metrics(), **plan.as_metrics(), **self.monitor.metrics()}
        batch, metrics = self.batches.on_policy(prompts, rollouts, scores, stats, plan, step)
        return StepResult(batch, {**observed, **metrics}, events)

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

    def train_and_sync(self, result: StepResult, timer: PhaseTimer) -> None:
        """One learner step on the batch, then its weights into every rollout worker (first
        waiting for the next step's rollouts, with rollout.overlap)."""
        with timer("learn"):
            result.metrics.update(self.workers.train(result.batch))
        with timer("generate_wait"):
            self.pending = self.in_flight() if self.in_flight else None
        with timer("sync"):
            parts, versions = self.workers.sync()
        result.metrics.update({"sync/version": float(min(versions)), "sync/mb": sum(p.nbytes for p in parts) / 2**20,
                               "fault/restarts": float(self.workers.restarts)})

    def greedy_probe(self, step: int, result: StepResult, timer: PhaseTimer) -> None:
        """Every length.probe_every steps, the student's greedy completions of a few held-out
        prompts (time/probe): a signal of the length controller's own, and the step's
        length/probe/* metrics."""
        every = self.cfg.length.probe_every
        if not every or step % every or self.heldout is None:
            return
        with timer("probe"):
            greedy = self.evaluator.probe(self.cfg.length.probe_prompts, self.cfg.rollout.max_new_tokens)
        self.monitor.observe_probe(greedy)
        result.metrics.update(self.monitor.controller.probe_metrics())

    def periodic(self, step: int) -> None:
        """Evaluation and checkpoint cadence (the last step's are done after the loop)."""
        if step >= self.cfg.steps:
            return
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self.record.log_eval(step, self.evaluator.student())
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0:
            self.checkpoint()

    def next_prompts(self) -> PromptBatch:
        exs = sample_batch(self.train_set, self.cfg.rollout.prompts_per_step, self.rng)
        return prompt_batch(self.tok, exs)

    # ------------------------------------------------------------------ start, finish, state
    def start(self, resume: Optional[CheckpointState]) -> None:
        """Fresh: reference lengths, the teacher's and the student's held-out view, a monitor.
        Resumed: all of it from the checkpoint. Then the console and the state to fall back to."""
        if resume:
            self.restore(resume)
        else:
            self.reference = self.reference_lengths()
            before = self.evaluator.student()
            self.record.begin(teacher=self.evaluator.teacher(), before=before)
            self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        self.record.open_console(self.step, heldout=self.heldout is not None)
        if self.cfg.length.probe_every and self.heldout is None:
            self.record.console.note("length.probe_every: no held-out prompts, so no greedy probe")
        self.start_state = self.loop_state()  # for a learner lost before the first checkpoint

    def finish(self, t_start: float) -> Summary:
        """The held-out view after training, the summary, and a final checkpoint."""
        self.record.console.close()
        summary = self.record.finish(self.evaluator.student(), self.step, time.time() - t_start)
        self.checkpoint()
        return summary

    def reference_lengths(self) -> Optional[length.ReferenceLengths]:
        """The teacher's completions of a sample of train prompts, sampled as the rollouts are
        (lengths, truncation, EOS and repetition rates) and greedy (the probe's rates); or the
        dataset's answers."""
        n, r = self.cfg.length.reference_prompts, self.cfg.rollout
        if n > 0:
            exs = random.Random(self.cfg.seed + 1).sample(self.train_set, min(n, len(self.train_set)))
            prompts = prompt_batch(self.tok, exs)
            sampled = self.teacher_lengths(prompts, sampling_settings(r, r.max_new_tokens, REFERENCE_STEP))
            return sampled.with_greedy(self.teacher_lengths(prompts, greedy_settings(r.max_new_tokens)))
        answers = [encode_answer(self.tok, e.answer) for e in self.train_set[:256] if e.answer]
        return length.reference_lengths(answers) if answers else None

    def teacher_lengths(self, prompts: PromptBatch, settings: SamplingSettings) -> length.ReferenceLengths:
        """The teacher's completions of `prompts` under `settings`, as reference lengths and rates;
        generated `rollout.prompts_per_step` prompts at a time, the batch the engines run every
        step (vLLM on CPU fails on a seeded request whose prefill is split over engine steps,
        which a larger batch of long prompts causes)."""
        k = self.cfg.rollout.prompts_per_step
        outs = [self.workers.teacher_generate(prompts.rows(slice(i, i + k)),  # each prompt seeded as in one call
                                              settings.for_rows(i))
                for i in range(0, len(prompts.prompt_ids), k)]
        return length.reference_lengths([c for o in outs for c in o.completion_ids],
                                        [r for o in outs for r in o.finish_reasons],
                                        self.evaluator.eos_ids, self.cfg.length.stats)

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
            summary=copy.deepcopy(self.record.summary),
            monitor=self.monitor.state_dict() if self.monitor else None, starved=self.record.starved,
            reference=None if self.reference is None else list(dataclasses.astuple(self.reference)),
            pending=self.pending)

    def recover_learner(self, err: Exception) -> None:
        """The learner died: rebuild it from the newest whole checkpoint (or the start of this
        run) and rewind the loop to that step; the steps since are replayed."""
        ckpt = newest_checkpoint(self.run_dir, "learner restart", upto=self.step)
        self.restore(self.workers.restart_learner(ckpt, str(err)) or self.start_state)

    def restore(self, state: CheckpointState) -> None:
        self.step = state.step
        self.rng.setstate(rng_state_from_json(state.rng_state))
        self.record.summary = copy.deepcopy(state.summary)
        self.record.starved = state.starved
        self.pending, self.in_flight = state.pending, None
        self.reference = length.ReferenceLengths(*state.reference) if state.reference else None
        self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        if state.monitor:
            self.monitor.load_state_dict(state.monitor)
        self.run_dir.truncate_metrics(self.step)
