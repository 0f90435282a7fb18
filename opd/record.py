"""What a run writes and says as it goes: each step's metrics line (metrics.jsonl and the
loggers) and console line, the held-out views, the early-stop verdict, and the summary
(summary.json, the end-of-run table).

The share of a step's tokens that carry gradient is measured on every step; a step under
`length.penalties.min_effective_weight`, or with no gradient at all, is counted and said, never silent.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

from opd.batch import effective_weights
from opd.console import Console
from opd.evaluation import flatten
from opd.evaluation import table as eval_table
from opd.evaluation import teacher_tables
from opd.report import STEP_PHASES
from opd.run_io import RunDir, read_metrics
from opd.sweep import best_finished_run, early_stop_decision
from opd.types import StepMetrics, Summary, TrainBatch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import LossConfig, TrainConfig
    from opd.steps import StepResult


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


def loss_terms(loss: LossConfig, batch: TrainBatch) -> dict[str, bool]:
    """Which loss terms train on `batch` (effective_weights' `terms`)."""
    return {"pg": loss.distill == "reverse_kl_pg" and loss.distill_coef > 0,
            "jsd": loss.distill == "jsd" and loss.distill_coef > 0, "sft": True,
            "smpo": loss.smpo_coef > 0, "topk_kl": batch.topk_kl_coef_B is not None,
            "anchor": batch.anchor_coef > 0}


class RunRecord:
    """The run's metrics, console and summary. `summary` and `starved` are what a checkpoint
    keeps of it."""

    def __init__(self, cfg: TrainConfig, run_dir: RunDir):
        self.cfg, self.run_dir = cfg, run_dir
        self.summary, self.starved = Summary(), 0  # starved: steps that trained on (almost) nothing
        self.console: Optional[Console] = None

    def begin(self, teacher: dict[str, float], before: dict[str, float]) -> None:
        """A fresh summary from the teacher's and the student's held-out views at the start."""
        self.summary = Summary(eval={"teacher": teacher, "before": before},
                               teacher=teacher.get("accuracy/greedy", math.nan),
                               student_before=before.get("accuracy/greedy", math.nan))

    def open_console(self, start_step: int, heldout: bool) -> None:
        """The console from `start_step` on, first with the held-out table (if there are prompts)."""
        self.console = Console(self.cfg.steps, self.cfg.log_every, start_step=start_step)
        if heldout:
            self.console.note("held-out before training:\n" + eval_table(self.summary.eval))
            if self.cfg.teachers:
                self.console.note(teacher_tables(self.summary.eval, list(self.cfg.teachers)))

    def log_step(self, step: int, result: StepResult, timer: PhaseTimer, events: list[dict]) -> None:
        """The step's metrics line (with its gradient share and phase times) and console line;
        `events`: the workers' own (actor restarts), after the length monitor's."""
        values = {**result.metrics, **self.gradient_share(result.batch, step), **timer.metrics(result.metrics)}
        events = [e.as_dict() for e in result.events] + events
        self.run_dir.log(StepMetrics(step, values, events))
        for e in events:
            if "condition" in e:  # restart events are printed where they happen
                self.console.note(f"length monitor: step {e['step']} {e['condition']} -> {e['state']} "
                                  f"({e['reason']})")
        self.console.step(step, values)

    def gradient_share(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """length/effective_weight*: the share of the batch's tokens that carry gradient, per
        term, and the starved steps so far."""
        share, floor = effective_weights(batch, loss_terms(self.cfg.loss, batch)), self.cfg.length.penalties.min_effective_weight
        w = share["length/effective_weight"]
        if w < floor or w == 0.0:  # a batch with no gradient at all is said even with the floor at 0
            self.starved += 1
            self.console.note(f"warning: step {step} trains on {w:.1%} of its tokens (length/effective_weight"
                              f" {'= 0' if w == 0 else '<'} length.penalties.min_effective_weight={floor:g}); "
                              f"{self.starved} such steps so far")
        return {**share, "length/starved_steps": float(self.starved)}

    def log_eval(self, step: int, view: dict[str, float]) -> None:
        """A held-out view of the student during training."""
        self.run_dir.log(StepMetrics(step, flatten("eval/", view)))
        each = "".join(f"; {n} {view.get(f'{n}/accuracy/greedy', math.nan):.3f}" for n in self.cfg.teachers)
        self.console.note(f"step {step}: held-out KL {view.get('kl', math.nan):.3f}, accuracy (greedy) "
                          f"{view.get('accuracy/greedy', math.nan):.3f}{each}")

    def early_stop(self, step: int) -> bool:
        """The early-stop rule (`early_stop.*`, opd/sweep.py) at step `after_steps`: its
        verdict goes to the summary; a stopped run is evaluated and checkpointed as usual."""
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

    def finish(self, after: dict[str, float], steps_done: int, wall_seconds: float) -> Summary:
        """The summary, with the student's held-out view after training."""
        s = self.summary
        s.eval["after"], s.student_after = after, after.get("accuracy/greedy", math.nan)
        s.starved_steps, s.wall_seconds, s.steps_done = self.starved, wall_seconds, steps_done
        return s
