"""Typed messages that cross actor boundaries (driver <-> rollout workers, teacher, learner),
and the seam they cross: `LoopWorkers`, the verbs the driver loop calls on its workers, with
the errors those calls raise.

Frozen dataclasses (but `Summary`, which the loop fills in as the run goes); every field
carries its shape and meaning. Shape letters:
P prompts in a step, G samples per prompt, N = P*G rollouts, L_n the length of rollout n,
B rows of a train batch, S padded sequence length (prompt + completion), K top-k width,
V vocabulary size. Ragged data (token ids of rollouts) travel as lists; padded numeric
data as numpy arrays (cheap to ship through Ray's object store, no torch needed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np


class FinishReason(StrEnum):
    """Why a completion ended. A str: compares and serialises as "stop" / "length"."""

    STOP = "stop"      # EOS or a stop string / stop token
    LENGTH = "length"  # cut at max_new_tokens

    @classmethod
    def of(cls, engine_reason: Optional[str]) -> "FinishReason":
        """An engine's reason (vLLM: 'stop', 'length', 'abort', None) as one of ours: only
        'length' means cut; everything else ended on its own."""
        return cls.LENGTH if engine_reason == "length" else cls.STOP


class TeacherLogprobs(StrEnum):
    """What the teacher returns per completion token (`teacher.logprobs`), i.e. which of
    TeacherScores' optional arrays are set. A str: compares equal to the config's value."""

    SAMPLED = "sampled"  # the sampled token's log-prob only (logprobs_NT)
    TOPK = "topk"  # plus the teacher's top-k ids and log-probs (topk_*_NTK)
    FULL = "full"  # plus the whole distribution (full_logprobs_NTV; transformers backend)


SMPO_LOSS_TYPES = ("smooth_lower_bound", "sigmoid", "hinge", "ipo")  # loss.smpo.loss_type (losses.smpo_loss)
EOS_PROTECTIONS = ("exclude", "flip", "none")  # loss.smpo.eos_protection


@dataclass(frozen=True)
class SamplingSettings:
    """What a rollout worker samples with on one call (from RolloutConfig, plus the monitor's
    adaptive max_new_tokens and a per-step seed)."""

    max_new_tokens: int
    temperature: float
    top_p: float  # 1.0 = off
    top_k: int  # -1 = off
    repetition_penalty: float  # 1.0 = off
    stop: tuple[str, ...]  # stop strings
    stop_token_ids: tuple[int, ...]  # extra stop token ids (EOS always stops)
    seed: Optional[int]  # None = unseeded; else prompt i of a call is seeded seed + i * seed_stride
    n: int  # samples per prompt (G)
    seed_stride: int = 7919  # a prime; one shared seed would correlate the samples of all prompts

    def prompt_seed(self, i: int) -> Optional[int]:
        """The seed of the call's i-th prompt: every prompt its own, so that the k-th samples
        of different prompts do not draw the same random numbers."""
        return None if self.seed is None else self.seed + i * self.seed_stride

    def for_rows(self, start: int, step: int = 1) -> "SamplingSettings":
        """The settings of a call on this call's prompts start, start + step, ...: each of them
        keeps the seed it has here."""
        return replace(self, seed=self.prompt_seed(start), seed_stride=self.seed_stride * step)

    def shifted(self, by: int) -> "SamplingSettings":
        """Every prompt's seed moved by `by` (unseeded stays unseeded)."""
        return self if self.seed is None else replace(self, seed=self.seed + by)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one step."""

    prompt_ids: list[list[int]]  # [P][prompt_len] token ids, chat template applied
    answers: list[Optional[str]]  # [P] reference answers (None when unchecked)
    sources: list[str]  # [P] "addition:train:17" or "data.jsonl:12"
    extract: list[str] = field(default_factory=list)  # [P] answer extraction ("exact" if empty)
    teachers: list[str] = field(default_factory=list)  # [P] the teacher of each prompt, a name in
    #                                                    `teachers` (empty: the one teacher)

    def extraction(self, p: int) -> str:
        return self.extract[p] if self.extract else "exact"

    def rows(self, index: slice) -> "PromptBatch":
        """The prompts at `index` (a slice), e.g. one rollout worker's share."""
        return PromptBatch(self.prompt_ids[index], self.answers[index], self.sources[index],
                           self.extract[index], self.teachers[index])

    def select(self, idx: Sequence[int]) -> "PromptBatch":
        """The prompts at `idx`, in that order (e.g. one teacher's)."""
        return PromptBatch(*(_take(getattr(self, f.name), idx) if getattr(self, f.name) else []
                             for f in fields(self)))

    def rollout_teachers(self, G: int) -> list[str]:
        """The teacher of each of G rollouts per prompt (rollout n answers prompt n // G)."""
        return [t for t in self.teachers for _ in range(G)]


@dataclass(frozen=True)
class RolloutBatch:
    """Completions sampled from the student by vLLM. Rollout n answers prompt n // G."""

    prompt_ids: list[list[int]]  # [N][prompt_len] the prompt of each rollout
    completion_ids: list[list[int]]  # [N][L_n] sampled tokens, EOS included when generated
    sampler_logprobs: list[list[float]]  # [N][L_n] log-prob of each sampled token under the
    #                                      distribution actually sampled from (processed)
    finish_reasons: list[str]  # [N] FinishReason: "stop" (EOS / stop string) | "length" (cut)
    texts: list[str]  # [N] decoded completions (special tokens skipped)
    weight_version: int  # version of the weights that produced every rollout here
    seconds: float = 0.0  # wall time of generation

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def select(self, idx: Sequence[int]) -> "RolloutBatch":
        """The rollouts at `idx`, in that order; the batch's weight version and time are kept."""
        return replace(self, **{f: _take(getattr(self, f), idx) for f in self._row_fields()})

    @classmethod
    def concat(cls, *batches: "RolloutBatch") -> "RolloutBatch":
        """The rows of every batch, in order, joined as batches generated side by side: the
        oldest of their weight versions (min) and the longest of their times (max)."""
        rows = {f: _join([getattr(b, f) for b in batches]) for f in batches[0]._row_fields()}
        return replace(batches[0], **rows, weight_version=min(b.weight_version for b in batches),
                       seconds=max(b.seconds for b in batches))

    def _row_fields(self) -> list[str]:
        """The per-rollout fields: all but the batch's weight version and time."""
        return [f.name for f in fields(self) if f.name not in ("weight_version", "seconds")]


def _take(rows, idx: Sequence[int]):
    """Rows `idx` of a per-rollout field: a list, a numpy array (first axis), or None (unset)."""
    if rows is None:
        return None
    return rows[np.asarray(idx, np.int64)] if isinstance(rows, np.ndarray) else [rows[i] for i in idx]


def _join(parts: list):
    """One per-rollout field of several batches end to end (None where every batch leaves it unset)."""
    if _unset(parts):
        return None
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [r for p in parts for r in p]


def _paste(parts: list, N: int, T: int, fill: float) -> Optional[np.ndarray]:
    """Arrays [n_i, T_i, ...] one under the other at the top left of a new [N, T, ...] array
    of `fill` (None where every part is None): joined and padded in one copy."""
    if _unset(parts):
        return None
    out, row = np.full((N, T, *parts[0].shape[2:]), fill, parts[0].dtype), 0
    for p in parts:
        out[row: row + len(p), : p.shape[1]] = p
        row += len(p)
    return out


def _unset(parts: list) -> bool:
    """Whether every part leaves a per-rollout field unset (None); only some is an error."""
    if any(p is None for p in parts) and not all(p is None for p in parts):
        raise ValueError("cannot join a field that is set in some batches and unset in others")
    return parts[0] is None


_SCORES_FILL = {"topk_logprobs_NTK": -np.inf}  # what a scorer leaves past a row's tokens (else 0)


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's log-probs of the exact completion tokens, at temperature `temperature`
    (log_softmax(logits / temperature)). Padded to T >= max_n L_n; entries past L_n are 0
    (top-k log-probs: -inf, as past the k an engine returned). Rows join as `RolloutBatch`'s do."""

    logprobs_NT: np.ndarray  # [N, T] float32 log p_teacher(completion token)
    temperature: float
    topk_ids_NTK: Optional[np.ndarray] = None  # [N, T, K] int64 teacher's top-k token ids
    topk_logprobs_NTK: Optional[np.ndarray] = None  # [N, T, K] float32 their log-probs
    full_logprobs_NTV: Optional[np.ndarray] = None  # [N, T, V] float32 whole distribution
    seconds: float = 0.0

    def select(self, idx: Sequence[int]) -> "TeacherScores":
        """The rows at `idx`, in that order; T, the temperature and the time are kept."""
        return replace(self, **{f: _take(getattr(self, f), idx) for f in self._row_fields()})

    @classmethod
    def concat(cls, *parts: "TeacherScores") -> "TeacherScores":
        """The rows of every part, in order, padded to the widest T, joined as scores made side
        by side: the longest of their times (max). The parts share one temperature."""
        if len({p.temperature for p in parts}) > 1:
            raise ValueError(f"cannot join scores at temperatures {sorted({p.temperature for p in parts})}")
        N, T = sum(len(p.logprobs_NT) for p in parts), max(p.logprobs_NT.shape[1] for p in parts)
        rows = {f: _paste([getattr(p, f) for p in parts], N, T, _SCORES_FILL.get(f, 0))
                for f in parts[0]._row_fields()}
        return replace(parts[0], **rows, seconds=max(p.seconds for p in parts))

    def padded(self, N: int, T: int) -> "TeacherScores":
        """These scores in arrays of N rows and T positions (at least the present ones); what
        is added holds what a scorer leaves past a row's tokens (0; top-k log-probs -inf)."""
        return replace(self, **{f: _paste([getattr(self, f)], N, T, _SCORES_FILL.get(f, 0))
                                for f in self._row_fields()})

    def _row_fields(self) -> list[str]:
        """The per-rollout arrays: all but the temperature and the time."""
        return [f.name for f in fields(self) if f.name not in ("temperature", "seconds")]


@dataclass(frozen=True)
class PairBatch:
    """SMPO preference pairs built from a step's rollouts (rows of the TrainBatch)."""

    chosen_rows: np.ndarray  # [M] int64 row index of each pair's chosen completion
    rejected_rows: np.ndarray  # [M] int64 row index of each pair's rejected completion
    score_gap: np.ndarray  # [M] float32 score(chosen) - score(rejected)
    skipped: int  # prompts whose best-worst gap was under the threshold

    def within(self, rows: np.ndarray) -> "PairBatch":
        """The pairs whose chosen and rejected rows are both in `rows`, as indices into `rows`."""
        at = {int(r): i for i, r in enumerate(rows)}
        keep = [m for m, (c, r) in enumerate(zip(self.chosen_rows, self.rejected_rows))
                if int(c) in at and int(r) in at]
        return PairBatch(np.array([at[int(self.chosen_rows[m])] for m in keep], np.int64),
                         np.array([at[int(self.rejected_rows[m])] for m in keep], np.int64),
                         self.score_gap[keep], self.skipped)


@dataclass(frozen=True)
class TrainBatch:
    """What the learner trains on. Token s of row b is a target when loss_mask_BS[b, s] > 0;
    its log-prob is read from the logits at position s - 1."""

    input_ids_BS: np.ndarray  # [B, S] int64 prompt + completion, right-padded with pad id
    loss_mask_BS: np.ndarray  # [B, S] float32 1 on completion tokens (EOS included), 0 on prompt/pad
    sampler_logprobs_BS: np.ndarray  # [B, S] float32 sampler log-prob of each target token
    teacher_logprobs_BS: np.ndarray  # [B, S] float32 teacher log-prob of each target token
    seq_advantage_B: np.ndarray  # [B] float32 sequence-level advantage term (length penalties)
    seq_weight_B: np.ndarray  # [B] float32 weight of row b in the sequence-level (policy-gradient)
    #                           term: stop-properly masks (0) or down-weights truncated rollouts
    on_policy_B: np.ndarray  # [B] bool True: a student rollout (distillation terms); False: a
    #                          teacher/dataset completion (SFT only)
    sft_weight_B: np.ndarray  # [B] float32 weight of row b in the SFT term (0: not trained by SFT)
    temperature: float  # the sampler's temperature (learner log-probs use logits / T)
    teacher_topk_ids_BSK: Optional[np.ndarray] = None  # [B, S, K] int64
    teacher_topk_logprobs_BSK: Optional[np.ndarray] = None  # [B, S, K] float32
    teacher_full_logprobs_BSV: Optional[np.ndarray] = None  # [B, S, V] float32
    pairs: Optional[PairBatch] = None  # SMPO pairs among the rows
    rejected_eos_id: int = -1  # EOS id (for SMPO's EOS protection)
    topk_kl_coef_B: Optional[np.ndarray] = None  # [B] float32 weight of the length remedy's
    #   forward KL over the teacher's top-k (truncated / repetitive rollouts); None: off
    loop_tail_BS: Optional[np.ndarray] = None  # [B, S] float32 1 where a looping tail's token may
    #   not get a positive advantage (the loop-tail rule); None: off
    anchor_coef: float = 0.0  # weight of KL(student||starting student) on student rollouts (0: off)
    is_cap: Optional[float] = None  # rollouts from older weights (rollout.overlap): the KL terms
    #   are weighted by the prefix importance weight, truncated at is_cap; None: off

    @property
    def num_tokens(self) -> float:
        return float(self.loss_mask_BS.sum())

    @property
    def on_policy(self) -> bool:
        """Whether any row is a student rollout."""
        return bool(self.on_policy_B.any())

    def select(self, rows: Sequence[int]) -> "TrainBatch":
        """These rows (every per-row array: the fields named *_B*), with the pairs whose two
        rows are both among them, renumbered."""
        rows = np.asarray(rows, np.int64)
        per_row = {f.name: getattr(self, f.name)[rows] for f in fields(self)
                   if "_B" in f.name and getattr(self, f.name) is not None}
        return replace(self, **per_row, pairs=self.pairs and self.pairs.within(rows))


@dataclass(frozen=True)
class WeightUpdate:
    """The student's weights, sent from the learner to the rollout workers. Numpy arrays, so
    that Ray stores them once in shared memory and every reader maps them without a copy;
    bfloat16 (which numpy lacks) travels as its int16 bits."""

    version: int  # learner step that produced them
    arrays: dict  # {hf_name: np.ndarray}, every one in `dtype`
    dtype: str = "float32"  # torch dtype of the tensors: "float32" | "bfloat16" | "float16"
    seconds: float = 0.0  # export time on the learner
    adapter: Optional[dict] = None  # a LoRA adapter's peft config: the arrays are that adapter's
    #                                 tensors (student.lora.sync=adapter), not the model's weights

    @classmethod
    def from_tensors(cls, version: int, tensors: dict, seconds: float = 0.0,
                     adapter: Optional[dict] = None) -> "WeightUpdate":
        """From {name: CPU torch tensor} of one dtype (no copy for contiguous tensors)."""
        import torch

        dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
        if len(dtypes) > 1:
            raise ValueError(f"a weight update has one dtype, got {sorted(dtypes)}")
        dtype = dtypes.pop() if dtypes else "float32"
        view = (lambda t: t.view(torch.int16)) if dtype == "bfloat16" else (lambda t: t)  # noqa: E731
        return cls(version, {k: view(t.detach().contiguous()).numpy() for k, t in tensors.items()},
                   dtype, seconds, adapter)

    def tensors(self) -> list:
        """[(hf_name, torch tensor)] sharing the arrays' memory (read-only: load by copying)."""
        import warnings

        import torch

        with warnings.catch_warnings():  # Ray's arrays are read-only; loaders only copy from them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            out = [(k, torch.from_numpy(a)) for k, a in self.arrays.items()]
        if self.dtype == "bfloat16":
            out = [(k, t.view(torch.bfloat16)) for k, t in out]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @classmethod
    def join(cls, parts: Sequence["WeightUpdate"]) -> "WeightUpdate":
        """The whole update from the dim-0 shards of a sharded learner's ranks, in rank order
        (one part: itself, no copy). An adapter comes whole from rank 0."""
        if len(parts) == 1 or parts[0].adapter is not None:
            return parts[0]
        arrays = {k: np.concatenate([p.arrays[k] for p in parts], 0) for k in parts[0].arrays}
        return cls(parts[0].version, arrays, parts[0].dtype, max(p.seconds for p in parts))


@dataclass(frozen=True)
class StepMetrics:
    """One line of metrics.jsonl."""

    step: int
    values: dict[str, float]  # namespaced scalars: "rollout/len_mean", "loss/pg", "time/generate"
    events: list[dict] = field(default_factory=list)  # length-monitor state changes this step


@dataclass
class Summary:
    """The run's outcome (summary.json, the end-of-run table): the held-out views and their
    headline accuracies, how long it took, and what went wrong on the way."""

    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # teacher / before / after views
    teacher: float = math.nan  # held-out greedy accuracy of the teacher
    student_before: float = math.nan  # ... of the student at the start
    student_after: float = math.nan  # ... and at the end
    starved_steps: int = 0  # steps that trained on (almost) nothing
    steps_done: int = 0
    wall_seconds: float = 0.0
    early_stop: Optional[dict] = None  # the early-stop verdict (EarlyStopDecision.as_dict), when the rule ran

    def as_dict(self) -> dict:
        """The JSON form (summary.json), without the fields that were never set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Pending:
    """rollout.overlap: the next step's prompts and the rollouts generated for them."""

    prompts: PromptBatch
    rollouts: RolloutBatch  # from the weights of the step that launched them


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint keeps of the driver loop (JSON, next to the learner's own state):
    enough to continue exactly where it stopped."""

    step: int
    rng_state: list  # the loop's random.Random.getstate(), as JSON lists
    summary: Summary  # the summary so far (the "before" view is never recomputed)
    monitor: Optional[dict] = None  # LengthMonitor.state_dict()
    starved: int = 0
    reference: Optional[list[float]] = None  # the reference's fields in order (ReferenceLengths:
    #                                          mean, p95, truncated_frac, eos_frac, repetition_frac)
    pending: Optional[Pending] = None  # rollout.overlap: the next step's prompts and rollouts

    def as_dict(self) -> dict:
        """The JSON form (plain dicts and lists all the way down)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointState":
        """From `as_dict` (a checkpoint's JSON)."""
        p = d.get("pending")
        pending = None if p is None else Pending(PromptBatch(**p["prompts"]), RolloutBatch(**p["rollouts"]))
        return cls(**{**d, "summary": Summary(**d["summary"]), "pending": pending})


# ---------------------------------------------------------------------------- the loop's workers
class ActorError(RuntimeError):
    """A remote actor failed or timed out; the message names it and the call."""


class ActorDied(ActorError):
    """An actor's process is gone (killed, crashed) and could not be restarted."""


class LearnerDied(ActorDied):
    """The learner's process is gone: the loop restores it from the newest checkpoint."""


class LoopWorkers(Protocol):
    """The verbs the driver loop (and its held-out evaluator) calls on its workers: the
    rollout workers, the teacher and the learner. `opd.actors.Workers` runs them as Ray
    actors or in process; tests and benchmarks pass fakes. A verb may raise `ActorError`;
    `train` raises `LearnerDied` when the learner's process is gone."""

    restarts: int  # actor restarts so far (fault/restarts)
    teacher_eval: Optional[tuple[RolloutBatch, RolloutBatch]]  # the teacher's greedy and sampled
    #   held-out completions, made at start (None: no held-out prompts)

    def generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """The student's rollouts of `prompts` (sampling.n per prompt, in prompt order)."""

    def generate_async(self, prompts: PromptBatch, sampling: SamplingSettings) -> Callable[[], RolloutBatch]:
        """Start `generate` from the current weights; calling the result waits for the rollouts."""

    def score(self, rollouts: RolloutBatch, teachers: Sequence[str] = ()) -> TeacherScores:
        """The teacher's log-probs of the rollouts' exact tokens; row n by teacher `teachers[n]`
        (empty: the one teacher)."""

    def teacher_generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """The teacher's own completions of `prompts` (weight_version -1), each prompt's from
        the teacher it names (`prompts.teachers`)."""

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One learner step on `batch`; its metrics."""

    def sync(self) -> tuple[list[WeightUpdate], list[int]]:
        """The learner's weights into every rollout worker; the update's parts (one per
        learner rank) and the workers' versions."""

    def student_logprobs(self, batch: TrainBatch) -> np.ndarray:
        """The learner's log-probs of a batch's target tokens [B, S] (0 off the mask)."""

    def save_checkpoint(self, path: str, state: CheckpointState) -> str:
        """The learner's weights and optimizer, with the loop's state, at `path`."""

    def load_checkpoint(self, path: str) -> CheckpointState:
        """The learner's state from `path`; the loop's state saved with it."""

    def restart_learner(self, ckpt: Optional[Path], reason: str) -> Optional[CheckpointState]:
        """A new learner from `ckpt` (None: the run's start), synced to the rollout workers; the
        loop state saved with the checkpoint (None: the start of the run)."""

    def take_events(self) -> list[dict]:
        """Restart events since the last call (for the step's metrics line)."""
