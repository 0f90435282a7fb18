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
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from opd import length as L
from opd.actors import LearnerDied
from opd.batch import (answer_rollouts, build_pairs, build_train_batch, effective_weights,
                       rollout_scores, teacher_kl_metrics, with_extra_rows)
from opd.evaluation import Evaluator, flatten
from opd.formatting import RolloutFormat, check_rollouts
from opd.evaluation import table as eval_table
from opd.rollout import greedy_settings
from opd.console import Console
from opd.run_io import RunDir, newest_checkpoint, read_metrics
from opd.sweep import best_finished_run, early_stop_decision
from opd.tasks import Example, answer_correct, encode_answer, prompt_batch, sample_batch
from opd.types import PromptBatch, RolloutBatch, SamplingSettings, StepMetrics

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import FormatConfig, RolloutConfig, TrainConfig


STEP_SEED_STRIDE = 100003  # rollout.seed's spacing: seeds of different runs never meet


def sampling_settings(r: RolloutConfig, max_new_tokens: int, step: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, repetition_penalty=r.repetition_penalty, stop=tuple(r.stop),
                            stop_token_ids=tuple(r.stop_token_ids), seed=r.seed * STEP_SEED_STRIDE + step,
                            n=r.samples_per_prompt)


def make_monitor(cfg: TrainConfig, eos_id: int, reference: Optional[L.ReferenceLengths]) -> L.LengthMonitor:
    """The length monitor of `cfg.length`: its detector thresholds are LengthConfig's fields
    of the same names; its penalties and remedies are the rest."""
    ln = cfg.length
    det = L.DetectorConfig(**{f.name: getattr(ln, f.name) for f in fields(L.DetectorConfig)})
    pen = L.PenaltyConfig(
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
    return L.LengthMonitor({eos_id} | set(cfg.rollout.stop_token_ids), pen, det, mode=ln.mode,
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
        known = sum(v for k, v in {**reported, **self.seconds}.items()
                    if k in ("time/generate", "time/teacher", "time/teacher_generate", "time/learn",
                             "time/generate_wait", "time/sync"))
        out["time/other"] = out["time/step"] - known
        return out


class Distillation:
    """State of one run; `run()` is the loop. `checkpoint()` can be called from outside
    (Ctrl-C, actor error) to save the last completed step."""

    def __init__(self, cfg: TrainConfig, workers: Any, tokenizer: Any, train: list[Example],
                 heldout: list[Example], run_dir: RunDir):
        self.cfg, self.w, self.tok, self.run_dir = cfg, workers, tokenizer, run_dir
        self.train_set, self.heldout = train, prompt_batch(tokenizer, heldout) if heldout else None
        self.evaluator = Evaluator(cfg, workers, tokenizer, self.heldout)
        self.rng = random.Random(cfg.seed)
        self.step, self.summary = 0, {}
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.monitor: Optional[L.LengthMonitor] = None
        self.starved = 0  # steps whose batch trained on (almost) nothing
        self.reference: Optional[L.ReferenceLengths] = None
        self.pending: Optional[Pending] = None  # rollout.overlap: the next step's rollouts, ready
        self.in_flight: Optional[Callable[[], Pending]] = None  # ... or still being generated

    # ------------------------------------------------------------------ the loop
    def run(self, resume_extra: Optional[dict] = None) -> dict:
        t_start = time.time()
        self.start(resume_extra)
        self.console = Console(self.cfg.steps, self.cfg.log_every, start_step=self.step)
        if self.heldout is not None:
            self.console.note("held-out before training:\n" + eval_table(self.summary["eval"]))
        self.start_state = json.loads(json.dumps(self.loop_state()))  # a copy, for a lost learner
        while self.step < self.cfg.steps:
            step, timer = self.step + 1, PhaseTimer()
            prompts = self.pending.prompts if self.pending else self.next_prompts()
            if self.rng.random() < self.cfg.loss.on_policy_fraction:  # GKD's lambda
                batch, values, events = self.on_policy_batch(prompts, step)
            else:
                batch, values, events = self.off_policy_batch(prompts, step)
            try:
                with timer("learn"):
                    values.update(self.w.train(batch))
                with timer("generate_wait"):  # rollout.overlap: the next step's rollouts
                    self.pending = self.in_flight() if self.in_flight else None
                with timer("sync"):
                    update, versions = self.w.sync()
            except LearnerDied as e:
                self.recover_learner(e)  # back to the newest checkpoint: its later steps are redone
                continue
            self.step = step
            values.update(self.gradient_share(batch, step), **timer.metrics(values),
                          **{"sync/version": float(min(versions)), "sync/mb": update.nbytes / 2**20,
                             "fault/restarts": float(self.w.restarts)})
            self.log_step(step, values, [e.as_dict() for e in events] + self.w.take_events())
            if self.early_stop(step):
                break
            self.periodic(step)
        self.console.close()
        self.summary["eval"]["after"] = self.evaluator.student()
        self.summary["starved_steps"] = self.starved
        self.summary.update(student_after=self.summary["eval"]["after"].get("accuracy/greedy", math.nan),
                            wall_seconds=time.time() - t_start, steps_done=self.step)
        self.checkpoint()
        return self.summary

    def start(self, resume_extra: Optional[dict]) -> None:
        """Fresh: reference lengths, the teacher's and the student's held-out view, a monitor.
        Resumed: all of it from the checkpoint."""
        if resume_extra:
            self.restore(resume_extra)
        else:
            self.reference = self.reference_lengths()
            before = self.evaluator.student()
            self.summary["eval"] = {"teacher": self.evaluator.teacher(), "before": before}
            self.summary.update(teacher=self.summary["eval"]["teacher"].get("accuracy/greedy", math.nan),
                                student_before=before.get("accuracy/greedy", math.nan))
            self.monitor = make_monitor(self.cfg, self.eos, self.reference)

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
        self.summary["early_stop"] = d.as_dict()
        self.console.note(("EARLY STOP at step {}: {}; evaluating and saving a final checkpoint"
                           if d.stop else "early-stop check at step {}: {}").format(step, d.reason))
        return d.stop

    def log_step(self, step: int, values: dict, events: list[dict]) -> None:
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
    def on_policy_batch(self, prompts: PromptBatch, step: int):
        """The student's rollouts, scored by the teacher, shaped by the length monitor's plan
        (penalties, the top-k KL remedy, the loop-tail rule, teacher mixture rows)."""
        rollouts = self.student_rollouts(prompts, step)
        scores = self.w.score(rollouts)
        stats, events, plan = self.monitor.observe(rollouts.completion_ids, rollouts.finish_reasons, step)
        lengths, reasons = rollouts.lengths, rollouts.finish_reasons
        fmt = rollout_format(self.cfg.format, rollouts, self.special_ids)
        malformed = fmt.malformed if fmt is not None else None
        pairs = self.smpo_pairs(prompts, rollouts, scores, stats, plan, malformed)
        values = {**stats.as_metrics(), **plan.as_metrics(), **self.monitor.detector.metrics(),
                  **self.rollout_metrics(prompts, rollouts, scores), **(fmt.metrics() if fmt else {})}
        if pairs is not None:
            values.update({"smpo/pairs": float(len(pairs.chosen_rows)), "smpo/pairs_skipped": float(pairs.skipped)})
        seq_w, adv, sft_w = (L.loss_weights(plan, reasons, malformed),
                             L.apply_sequence_penalty(plan, lengths, reasons), None)
        remedy, tails, on = plan.remedy_weights(stats, reasons), plan.no_reward_tails(stats), True
        t_mix = time.time()
        mix = self.teacher_mixture(prompts, plan, step)
        values["time/teacher_generate"] = time.time() - t_mix  # the mixture rows' teacher samples
        if mix is not None:  # StableOPD's rollout mixture: teacher rows, trained by SFT
            k = len(mix.completion_ids)
            rollouts, scores = with_extra_rows(rollouts, scores, mix)
            on = np.r_[np.ones(len(seq_w), bool), np.zeros(k, bool)]
            seq_w, adv = np.r_[seq_w, np.zeros(k)], np.r_[adv, np.zeros(k)]
            sft_w = np.r_[np.zeros(len(lengths)), np.full(k, plan.mixture_sft_coef)]
            remedy = None if remedy is None else np.r_[remedy, np.zeros(k)]
            tails = None if tails is None else tails + [0] * k
            values["length/mixture_rows"] = float(k)
        batch = build_train_batch(rollouts, scores, self.pad, self.eos, on_policy=on,
                                  temperature=self.cfg.rollout.temperature, seq_weight_N=seq_w,
                                  seq_advantage_N=adv, pairs=pairs, sft_weight_N=sft_w,
                                  remedy_weight_N=remedy, no_reward_tail_N=tails,
                                  anchor_coef=plan.anchor_coef)
        r = self.cfg.rollout
        if values["rollout/staleness"] > 0 and r.overlap_correction == "tis":
            batch = replace(batch, is_cap=r.overlap_tis_cap)
        return batch, values, events

    def student_rollouts(self, prompts: PromptBatch, step: int) -> RolloutBatch:
        """This step's rollouts: generated now, or (rollout.overlap) the ones generated while
        the previous step trained. With overlap the next step's generation starts here, from
        the weights of this step's start, and runs while this step is scored and trained."""
        settings = lambda s: sampling_settings(self.cfg.rollout, self.monitor.max_new_tokens, s)  # noqa: E731
        rollouts = self.pending.rollouts if self.pending else self.w.generate(prompts, settings(step))
        self.pending = self.in_flight = None
        if self.cfg.rollout.overlap and step < self.cfg.steps:
            nxt = self.next_prompts()
            done = self.w.generate_async(nxt, settings(step + 1))
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

    def smpo_pairs(self, prompts, rollouts, scores, stats, plan, malformed=None):
        """Best vs worst sample of each prompt; a bad one (truncated, looping) as rejected when
        loss.smpo.prefer_bad_rejected says so ("auto": when the length monitor asks), and a
        malformed one when the format checks ask."""
        if not self.cfg.loss.smpo_coef:
            return None
        s, G = self.cfg.loss.smpo, self.cfg.rollout.samples_per_prompt
        prefer = {"auto": plan.prefer_bad_rejected, "always": True, "never": False}[s.prefer_bad_rejected]
        bad = replace(plan, prefer_bad_rejected=prefer).rejection_preference(
            rollouts.finish_reasons, stats.repetitive, malformed)
        return build_pairs(rollout_scores(rollouts, scores, prompts, G, s.pair_score), G, s.min_score_gap, bad)

    def teacher_mixture(self, prompts: PromptBatch, plan, step: int):
        """Teacher completions for a share of this step's prompts, the ones that end in EOS
        (None when the remedy is off or none stopped)."""
        k = math.ceil(plan.mixture_fraction * len(prompts.prompt_ids))
        if k == 0:
            return None
        settings = replace(sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step), n=1)
        out = self.w.teacher_generate(prompts.rows(slice(0, k)), settings)
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
            rollouts = self.w.teacher_generate(prompts, sampling_settings(self.cfg.rollout, self.cfg.rollout.max_new_tokens, step))
        else:
            rollouts = answer_rollouts([p for p in prompts.prompt_ids for _ in range(G)],
                                       [encode_answer(self.tok, a) for a in prompts.answers for _ in range(G)])
        batch = build_train_batch(rollouts, None, self.pad, self.eos, on_policy=False, temperature=1.0,
                                  sft_weight_N=np.full(len(rollouts.completion_ids), self.cfg.loss.sft_coef))
        stats = L.rollout_stats(rollouts.completion_ids, rollouts.finish_reasons, {self.eos},
                                self.cfg.rollout.max_new_tokens)
        return batch, {**stats.as_metrics("offpolicy/"), "rollout/on_policy": 0.0,
                       "rollout/tokens": float(sum(rollouts.lengths)), "time/generate": time.time() - t0}, []

    # ------------------------------------------------------------------ data, eval, state
    def next_prompts(self) -> PromptBatch:
        exs = sample_batch(self.train_set, self.cfg.rollout.prompts_per_step, self.rng)
        return prompt_batch(self.tok, exs)

    def reference_lengths(self) -> Optional[L.ReferenceLengths]:
        """Teacher greedy generations on a sample of train prompts (or the dataset's answers)."""
        n = self.cfg.length.reference_prompts
        if n > 0:
            exs = random.Random(self.cfg.seed + 1).sample(self.train_set, min(n, len(self.train_set)))
            out = self.w.teacher_generate(prompt_batch(self.tok, exs), greedy_settings(self.cfg.rollout.max_new_tokens))
            return L.reference_lengths(out.completion_ids)
        answers = [encode_answer(self.tok, e.answer) for e in self.train_set[:256] if e.answer]
        return L.reference_lengths(answers) if answers else None

    def checkpoint(self) -> Optional[str]:
        if self.step == 0:
            return None
        path = self.w.call(self.w.learner, "save_checkpoint", str(self.run_dir.checkpoint_dir(self.step)),
                           self.loop_state())
        self.run_dir.prune(self.cfg.keep_checkpoints)
        return path

    def loop_state(self) -> dict:
        """What a checkpoint keeps of the loop (JSON): step, data cursor, monitor, summary."""
        return {"step": self.step, "rng": list(self.rng.getstate()[1]), "rng_gauss": self.rng.getstate()[2],
                "monitor": self.monitor.state_dict() if self.monitor else None, "summary": self.summary,
                "starved": self.starved, "pending": asdict(self.pending) if self.pending else None,
                "reference": None if self.reference is None else [self.reference.mean, self.reference.p95]}

    def recover_learner(self, err: Exception) -> None:
        """The learner died: rebuild it from the newest whole checkpoint (or the start of this
        run) and rewind the loop to that step; the steps since are replayed."""
        ckpt = newest_checkpoint(self.run_dir, "learner restart", upto=self.step)
        self.restore(self.w.restart_learner(ckpt, str(err)) or self.start_state)

    def restore(self, extra: dict) -> None:
        self.step = extra["step"]
        self.rng.setstate((3, tuple(extra["rng"]), extra["rng_gauss"]))
        self.summary = dict(extra["summary"])
        self.starved = int(extra.get("starved", 0))
        self.pending, self.in_flight = Pending.from_dict(extra.get("pending")), None
        self.reference = L.ReferenceLengths(*extra["reference"]) if extra["reference"] else None
        self.monitor = make_monitor(self.cfg, self.eos, self.reference)
        if extra.get("monitor"):
            self.monitor.load_state_dict(extra["monitor"])
        self.run_dir.truncate_metrics(self.step)
