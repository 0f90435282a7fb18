"""Length monitor: rollout-length statistics, a hysteresis detector, and length penalties.

On-policy distillation fails in a few recurring ways that all show in rollout lengths:
*inflation* (rollouts grow until most are cut at ``max_new_tokens``: truncation collapse),
*repetition loops*, *short collapse* (answers shrink to nothing) and *EOS collapse* (the
student stops emitting EOS). The driver loop calls :class:`LengthMonitor` once per rollout
batch; it computes :class:`LengthStats`, a :class:`LengthDetector` with hysteresis decides
which conditions are on, and pure penalty functions turn the resulting
:class:`PenaltyPlan` into numbers::

    monitor = LengthMonitor(eos_ids={eos}, penalty=PenaltyConfig(max_new_tokens=1024,
                            reference=reference_lengths(teacher_token_ids)), mode="auto")
    stats, events, plan = monitor.observe(token_ids, finish_reasons, step)   # batch t
    advantage_B += apply_sequence_penalty(plan, lengths_B, finish_reasons)  # batch t
    seq_weight_B = loss_weights(plan, finish_reasons)                      # batch t
    sampling.max_tokens = plan.max_new_tokens                               # batch t+1

Conventions: a rollout's length is its number of completion tokens, EOS included when it
was generated. ``finish_reasons`` are vLLM's: 'stop' (EOS or a stop string) or 'length'
(cut at ``max_new_tokens``). Pure module: numpy and the standard library only; plain values
in, plain values and dataclasses out; every ``state_dict`` is JSON-serialisable.

Departures from the papers: DAPO's soft overlong punishment (Yu et al. 2025) is a reward
term; here it is a per-rollout scalar added to the rollout's advantage, and rollouts whose
finish reason is 'length' always get the full -1 whatever length the caller counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Collection, Optional, Sequence

import numpy as np

__all__ = [
    "CONDITIONS", "LengthStats", "rollout_stats", "ReferenceLengths", "reference_lengths",
    "tail_repeat_fraction", "repetitive_flags", "DetectorConfig", "hysteresis_errors", "LengthEvent",
    "LengthDetector", "overlong_penalty", "stop_properly_weights", "length_ratio_penalty",
    "rejection_badness", "adaptive_max_new_tokens", "PenaltyConfig", "PenaltyPlan",
    "LengthMonitor", "apply_sequence_penalty", "loss_weights",
]

FINISH_REASONS = ("stop", "length")

# --------------------------------------------------------------------------- statistics


def _ngrams(tokens: list, n: int) -> list:
    return list(zip(*(tokens[i:] for i in range(n))))


def tail_repeat_fraction(tokens: Sequence[int], ngram: int = 3, tail_window: int = 32) -> float:
    """Fraction of the tail's n-gram positions that repeat an earlier n-gram of the tail.

    tail = last ``tail_window`` tokens; G = its n-grams (len(tail) - ngram + 1 positions);
    fraction = (|G| - |distinct(G)|) / |G|. A loop of period p fills the tail with only p
    distinct n-grams, so the fraction is 1 - p / |G| (period 2 in a 32-token tail with
    trigrams: 28/30); varied text scores about 0. Returns 0.0 when the tail holds fewer
    than ``2 * ngram`` tokens (a pattern cannot occur twice).
    """
    tail = list(tokens)[-tail_window:]
    if len(tail) < 2 * ngram:
        return 0.0
    grams = _ngrams(tail, ngram)
    return (len(grams) - len(set(grams))) / len(grams)


def repetitive_flags(token_ids: Sequence[Sequence[int]], ngram: int = 3, tail_window: int = 32,
                     repeat_threshold: float = 0.5) -> list[bool]:
    """Per rollout: ``tail_repeat_fraction(tokens, ngram, tail_window) >= repeat_threshold``."""
    _check_ngram_args(ngram, tail_window, repeat_threshold)
    return [tail_repeat_fraction(np.asarray(t).tolist(), ngram, tail_window) >= repeat_threshold
            for t in token_ids]


def _check_ngram_args(ngram: int, tail_window: int, repeat_threshold: float) -> None:
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if tail_window < 2 * ngram:
        raise ValueError(f"tail_window must be >= 2 * ngram = {2 * ngram}, got {tail_window}")
    if not 0.0 < repeat_threshold <= 1.0:
        raise ValueError(f"repeat_threshold must be in (0, 1], got {repeat_threshold}")


@dataclass(frozen=True)
class LengthStats:
    """Length statistics of one rollout batch (lengths in tokens, EOS included)."""

    n: int                        # number of rollouts
    mean: float                   # mean length
    median: float
    p95: float                    # np.percentile(lengths, 95), linear interpolation
    min: int
    max: int
    truncated_frac: float         # finish reason 'length'
    eos_frac: float               # last token in eos_ids
    short_frac: float             # length < min_length
    repetition_frac: float        # tail dominated by a repeated n-gram (tail_repeat_fraction)
    repeated_ngram_rate: float    # sum(repeated n-grams) / sum(n-grams), within each rollout
    length_ratio: Optional[float]  # mean / reference_mean; None without a reference
    max_new_tokens: int           # the cap these rollouts were generated under
    repetitive: tuple[bool, ...] = ()  # per rollout: its tail loops (repetitive_flags)

    def as_metrics(self, prefix: str = "length/") -> dict[str, float]:
        """The scalar fields as floats for logging; ``length_ratio`` omitted when None."""
        return {prefix + k: float(v) for k, v in asdict(self).items()
                if v is not None and k != "repetitive"}


def rollout_stats(token_ids: Sequence[Sequence[int]], finish_reasons: Sequence[str],
                  eos_ids: Collection[int], max_new_tokens: int, min_length: int = 1,
                  ngram: int = 3, tail_window: int = 32, repeat_threshold: float = 0.5,
                  reference_mean: Optional[float] = None) -> LengthStats:
    """Statistics of one batch; see :class:`LengthStats` for each field.

    repeated_ngram_rate = sum_i (|G_i| - |distinct(G_i)|) / sum_i |G_i| over the n-grams G_i
    of each whole rollout i (0.0 when no rollout is ``ngram`` tokens long).
    Raises ValueError on an empty batch, mismatched sizes, an unknown finish reason or a
    rollout longer than ``max_new_tokens`` (the caller passed the wrong cap).
    """
    seqs = [np.asarray(t).tolist() for t in token_ids]
    n = len(seqs)
    _check_batch(n, finish_reasons)
    _check_ngram_args(ngram, tail_window, repeat_threshold)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if lengths.max() > max_new_tokens:
        raise ValueError(f"a rollout has {lengths.max()} tokens > max_new_tokens={max_new_tokens}")
    grams = [_ngrams(s, ngram) for s in seqs]
    total = sum(len(g) for g in grams)
    repeated = sum(len(g) - len(set(g)) for g in grams)
    eos = set(int(e) for e in eos_ids)
    mean = float(lengths.mean())
    flags = repetitive_flags(seqs, ngram, tail_window, repeat_threshold)
    return LengthStats(
        n=n, mean=mean, median=float(np.median(lengths)),
        p95=float(np.percentile(lengths, 95)), min=int(lengths.min()), max=int(lengths.max()),
        truncated_frac=sum(r == "length" for r in finish_reasons) / n,
        eos_frac=sum(bool(s) and s[-1] in eos for s in seqs) / n,
        short_frac=float((lengths < min_length).mean()),
        repetition_frac=float(np.mean(flags)), repetitive=tuple(flags),
        repeated_ngram_rate=repeated / total if total else 0.0,
        length_ratio=None if reference_mean is None else mean / float(reference_mean),
        max_new_tokens=int(max_new_tokens))


def _check_batch(n: int, finish_reasons: Sequence[str]) -> None:
    if n == 0:
        raise ValueError("empty rollout batch")
    if len(finish_reasons) != n:
        raise ValueError(f"{n} rollouts but {len(finish_reasons)} finish_reasons")
    bad = set(finish_reasons) - set(FINISH_REASONS)
    if bad:
        raise ValueError(f"finish_reasons must be in {FINISH_REASONS}, got {sorted(bad)}")


@dataclass(frozen=True)
class ReferenceLengths:
    """The teacher's reference lengths: mean and p95 (np.percentile, linear) in tokens."""

    mean: float
    p95: float


def reference_lengths(token_ids_or_lengths: Sequence) -> ReferenceLengths:
    """Reference lengths from teacher generations (token lists) or from plain lengths (ints),
    e.g. the teacher's answers on a sample of prompts at start, or a dataset's answers
    tokenised with the student's tokenizer. Count EOS the same way as the rollouts do."""
    items = list(token_ids_or_lengths)
    if not items:
        raise ValueError("reference_lengths needs at least one item")
    is_len = [isinstance(x, (int, float, np.integer, np.floating)) for x in items]
    lengths = np.array([x if flag else len(x) for x, flag in zip(items, is_len)], dtype=np.float64)
    if lengths.mean() <= 0:
        raise ValueError("reference lengths must have a positive mean")
    return ReferenceLengths(mean=float(lengths.mean()), p95=float(np.percentile(lengths, 95)))


# --------------------------------------------------------------------------- detector

# condition -> rules (stats field, direction, on-threshold key, off-threshold key).
# A condition's step is a *hit* when ANY rule is past its on-threshold, and *clear* when
# EVERY rule (with a value) is back past its off-threshold; in between, the state holds.
_RULES = {
    "inflation": (("truncated_frac", ">", "trunc_on", "trunc_off"),
                  ("length_ratio", ">", "ratio_on", "ratio_off")),
    "short_collapse": (("short_frac", ">", "short_on", "short_off"),
                       ("length_ratio", "<", "short_ratio_on", "short_ratio_off")),
    "repetition": (("repetition_frac", ">", "rep_on", "rep_off"),),
    "eos_collapse": (("eos_frac", "<", "eos_on", "eos_off"),),
}
CONDITIONS = tuple(_RULES)


@dataclass
class DetectorConfig:
    """Thresholds of :class:`LengthDetector` (all conditions share ``k_on`` / ``k_off``).

    A condition turns on after ``k_on`` consecutive hit steps and off after ``k_off``
    consecutive clear steps (see ``_RULES``); ratios are ``mean / reference_mean`` and
    their rules are skipped when no reference is known. Each off-threshold lies on the
    healthy side of its on-threshold, which gives the hysteresis band.
    """

    ema_decay: float = 0.9       # ema <- decay * ema + (1 - decay) * value (logged baselines)
    k_on: int = 2                # consecutive hit steps to switch a condition on
    k_off: int = 2               # consecutive clear steps to switch it off
    trunc_on: float = 0.2        # inflation: truncated_frac > trunc_on ...
    trunc_off: float = 0.1
    ratio_on: float = 1.5        # ... or length_ratio > ratio_on
    ratio_off: float = 1.2
    short_on: float = 0.3        # short collapse: short_frac > short_on ...
    short_off: float = 0.15
    short_ratio_on: float = 0.5  # ... or length_ratio < short_ratio_on
    short_ratio_off: float = 0.7
    rep_on: float = 0.2          # repetition: repetition_frac > rep_on
    rep_off: float = 0.1
    eos_on: float = 0.5          # EOS collapse: eos_frac < eos_on (0 and 0: never, e.g.
    eos_off: float = 0.7         # when answers legitimately end on stop strings)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.k_on < 1 or self.k_off < 1:
            raise ValueError(f"k_on and k_off must be >= 1, got {self.k_on}, {self.k_off}")
        errors = hysteresis_errors(self.__dict__)
        if errors:
            raise ValueError(errors[0])


def hysteresis_errors(values: dict, prefix: str = "") -> list[str]:
    """Each off-threshold must lie on the healthy side of its on-threshold (the hysteresis
    band); one message per pair that does not, keys named with ``prefix``."""
    errors = []
    for rules in _RULES.values():
        for _, op, on_key, off_key in rules:
            lo, hi = (off_key, on_key) if op == ">" else (on_key, off_key)
            if values[lo] > values[hi]:
                errors.append(f"{prefix}{lo} must be <= {prefix}{hi} ({values[hi]}), got {values[lo]}")
    return errors


@dataclass(frozen=True)
class LengthEvent:
    """A condition switching state at ``step``, with the numbers that made it switch."""

    step: int
    condition: str   # one of CONDITIONS, or 'effective_weight' (the gradient guard)
    state: str       # 'on' | 'off' (conditions); 'low' | 'ok' (effective_weight)
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Condition:
    on: bool = False
    hits: int = 0      # consecutive hit steps while off
    clears: int = 0    # consecutive clear steps while on
    since: Optional[int] = None  # step of the last switch


def _evaluate(stats: LengthStats, cfg: DetectorConfig, rules) -> tuple[list[str], list[str], bool]:
    """-> (descriptions of the rules hit, of the rules clear, whether every rule is clear)."""
    hits, clears, all_clear = [], [], True
    for name, op, on_key, off_key in rules:
        v = getattr(stats, name)
        if v is None:
            continue
        on, off = getattr(cfg, on_key), getattr(cfg, off_key)
        if (v > on) if op == ">" else (v < on):
            hits.append(f"{name}={v:.3g} {op} {on:g}")
        if (v < off) if op == ">" else (v > off):
            clears.append(f"{name}={v:.3g} {'<' if op == '>' else '>'} {off:g}")
        else:
            all_clear = False
    return hits, clears, all_clear


class LengthDetector:
    """Hysteresis state machine over :class:`LengthStats`, one update per rollout batch.

    Conditions are judged on each batch's raw statistics (k_on consecutive hits, so a single
    spike never switches anything); EMAs of mean length, truncated_frac and eos_frac are
    kept as smoothed baselines for logging and for the event reasons.
    """

    def __init__(self, config: Optional[DetectorConfig] = None):
        self.config = config or DetectorConfig()
        self._conds = {c: _Condition() for c in CONDITIONS}
        self.ema: Optional[dict[str, float]] = None  # mean_length, truncated_frac, eos_frac
        self.last_step: Optional[int] = None

    def active(self) -> frozenset[str]:
        """The conditions that are on now."""
        return frozenset(c for c, s in self._conds.items() if s.on)

    def update(self, stats: LengthStats, step: int) -> list[LengthEvent]:
        """Fold in one batch; returns one event per condition that switched at this step."""
        values = {"mean_length": stats.mean, "truncated_frac": stats.truncated_frac,
                  "eos_frac": stats.eos_frac}
        d = self.config.ema_decay
        self.ema = values if self.ema is None else {
            k: d * self.ema[k] + (1.0 - d) * v for k, v in values.items()}
        self.last_step = int(step)
        events = [self._step(c, stats, int(step)) for c in CONDITIONS]
        return [e for e in events if e is not None]

    def _step(self, name: str, stats: LengthStats, step: int) -> Optional[LengthEvent]:
        st, cfg = self._conds[name], self.config
        hits, clears, all_clear = _evaluate(stats, cfg, _RULES[name])
        ema = ", ".join(f"{k}={v:.3g}" for k, v in self.ema.items())
        if not st.on:
            st.hits = st.hits + 1 if hits else 0
            if st.hits < cfg.k_on:
                return None
            st.on, st.hits, st.since = True, 0, step
            why = " or ".join(hits)
            return LengthEvent(step, name, "on", f"{why} for {cfg.k_on} steps (ema {ema})")
        st.clears = st.clears + 1 if all_clear else 0
        if st.clears < cfg.k_off:
            return None
        st.on, st.clears, st.since = False, 0, step
        why = " and ".join(clears)
        return LengthEvent(step, name, "off", f"{why} for {cfg.k_off} steps (ema {ema})")

    def metrics(self, prefix: str = "length/") -> dict[str, float]:
        """Active flags (0/1) and EMA baselines, for logging."""
        out = {f"{prefix}active/{c}": float(s.on) for c, s in self._conds.items()}
        out.update({f"{prefix}ema/{k}": v for k, v in (self.ema or {}).items()})
        return out

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state; a resumed run continues exactly."""
        return {"conditions": {c: asdict(s) for c, s in self._conds.items()},
                "ema": None if self.ema is None else dict(self.ema), "last_step": self.last_step}

    def load_state_dict(self, d: dict) -> None:
        missing = set(CONDITIONS) - set(d["conditions"])
        if missing:
            raise KeyError(f"detector state lacks conditions {sorted(missing)}")
        self._conds = {c: _Condition(**d["conditions"][c]) for c in CONDITIONS}
        self.ema = None if d["ema"] is None else {k: float(v) for k, v in d["ema"].items()}
        self.last_step = d["last_step"]


# --------------------------------------------------------------------------- penalties


def overlong_penalty(lengths: Sequence[int], max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), per rollout::

        R(L) = 0                                  if L <= M - B
             = ((M - B) - L) / B                  if M - B < L <= M
             = -1                                 if L > M

    with M = ``max_new_tokens``, B = ``buffer`` in [1, M]; i.e. clip(((M-B) - L)/B, -1, 0).
    """
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(f"buffer must be in [1, max_new_tokens={max_new_tokens}], got {buffer}")
    L = np.asarray(lengths, dtype=np.float64)
    return np.clip(((max_new_tokens - buffer) - L) / buffer, -1.0, 0.0)


def stop_properly_weights(finish_reasons: Sequence[str], mode: str = "mask",
                          weight: float = 0.1) -> np.ndarray:
    """Per-rollout loss weight: w_i = 1 if rollout i stopped ('stop'), else 0 (``mode='mask'``)
    or ``weight`` (``mode='downweight'``), so truncated rollouts do not silently train."""
    if mode not in ("mask", "downweight"):
        raise ValueError(f"mode must be 'mask' or 'downweight', got {mode!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    _check_batch(len(finish_reasons), finish_reasons)
    cut = 0.0 if mode == "mask" else float(weight)
    return np.array([1.0 if r == "stop" else cut for r in finish_reasons])


def length_ratio_penalty(lengths: Sequence[int], reference_mean: float, coef: float = 1.0,
                         tolerance: float = 0.25) -> np.ndarray:
    """Two-sided penalty for straying from the reference length, per rollout::

        P(L) = -coef * max(0, |L / ref - 1| - tolerance)

    0 inside [ (1 - tol) ref, (1 + tol) ref ], linear outside (too long and too short)."""
    if reference_mean <= 0:
        raise ValueError(f"reference_mean must be > 0, got {reference_mean}")
    if coef < 0 or tolerance < 0:
        raise ValueError(f"coef and tolerance must be >= 0, got {coef}, {tolerance}")
    dev = np.abs(np.asarray(lengths, dtype=np.float64) / reference_mean - 1.0)
    return -coef * np.maximum(0.0, dev - tolerance)


def rejection_badness(finish_reasons: Sequence[str], repetitive_flags: Sequence[bool],
                      malformed_flags: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Badness for picking an SMPO pair's rejected completion among a prompt's samples:
    b_i = [finish_i == 'length'] + [repetitive_i] (+ [malformed_i], a failed format check,
    opd/formatting.py) in {0, 1, 2, 3}; prefer the highest, so the preference loss pushes
    down truncation, loops and broken markup rather than EOS of a good answer."""
    _check_batch(len(finish_reasons), finish_reasons)
    flags = [repetitive_flags] + ([malformed_flags] if malformed_flags is not None else [])
    if any(len(f) != len(finish_reasons) for f in flags):
        raise ValueError("finish_reasons and repetitive/malformed flags differ in length")
    trunc = np.array([r == "length" for r in finish_reasons], dtype=np.int64)
    return trunc + sum(np.asarray(f, dtype=np.int64) for f in flags)


def adaptive_max_new_tokens(current: int, stats: LengthStats, inflation_active: bool,
                            floor_tokens: int, ceiling_tokens: int, shrink: float = 0.9,
                            grow: float = 1.1) -> int:
    """Next generation cap.

    Inflating: shrink by the factor, but not below the batch p95 while the batch still sits
    under the cap (p95 < current); when the batch presses the cap (p95 >= current) there is
    no p95 to stop at and the factor alone applies::

        new = floor(current * shrink)            ; new = max(new, ceil(p95)) if p95 < current

    Recovered: new = max(current + 1, ceil(current * grow)), back toward the ceiling.
    Always clipped to [floor_tokens, ceiling_tokens]: never below the teacher's reference p95
    (``floor_tokens``), so legitimate answers still fit, and never above the configured cap.
    """
    if not 1 <= floor_tokens <= ceiling_tokens:
        raise ValueError(f"need 1 <= floor_tokens ({floor_tokens}) <= ceiling_tokens ({ceiling_tokens})")
    if not 0.0 < shrink <= 1.0 or grow < 1.0:
        raise ValueError(f"need shrink in (0, 1] and grow >= 1, got {shrink}, {grow}")
    if inflation_active:
        new = math.floor(current * shrink + 1e-9)
        if stats.p95 < current:
            new = max(new, math.ceil(stats.p95 - 1e-9))
    else:
        new = current if grow == 1.0 else max(current + 1, math.ceil(current * grow - 1e-9))
    return int(min(ceiling_tokens, max(floor_tokens, new)))


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class PenaltyConfig:
    """How strong each penalty is when the monitor switches it on (mode 'auto')."""

    max_new_tokens: int                      # configured generation cap (the ceiling)
    overlong_buffer: Optional[int] = None    # DAPO buffer B; None: max_new_tokens // 5; 0: never
    stop_properly_mode: Optional[str] = "mask"  # 'mask' | 'downweight' | None (never)
    stop_properly_weight: float = 0.1        # weight of truncated rollouts in 'downweight'
    length_ratio_coef: float = 1.0           # 0: never
    length_ratio_tolerance: float = 0.25
    adaptive_max_new_tokens: bool = False    # shrink the cap under inflation (needs reference)
    adaptive_shrink: float = 0.9
    adaptive_grow: float = 1.1
    reference: Optional[ReferenceLengths] = None  # teacher lengths (ratio rules, floor of cap)
    topk_kl_coef: float = 0.0                # remedy (a): forward KL over the teacher's top-k on
    #                                          truncated / repetitive rollouts; 0: never
    mixture_fraction: float = 0.0            # remedy (b): share of a step's prompts answered by
    #                                          the teacher and trained by SFT; 0: never
    mixture_sft_coef: float = 1.0            # SFT weight of those teacher completions
    anchor_coef: float = 0.0                 # remedy (c): KL(student‖starting student) on every
    #                                          rollout while repetition is on; 0: never
    loop_tail: bool = False                  # no positive advantage on a looping tail
    tail_window: int = 32                    # tokens of a looping tail (the detector's window)
    min_effective_weight: float = 0.1        # stop-properly never leaves less than this share
    #                                          of the batch's tokens in the policy-gradient term
    malformed_weight: float = 1.0            # sequence-level weight of a rollout failing a
    #                                          format check (opd/formatting.py); 1: never
    prefer_malformed_rejected: bool = False  # malformed rollouts are SMPO's rejected first

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.overlong_buffer is not None and not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [0, max_new_tokens], got {self.overlong_buffer}")
        if self.stop_properly_mode not in (None, "mask", "downweight"):
            raise ValueError(f"stop_properly_mode must be None, 'mask' or 'downweight', "
                             f"got {self.stop_properly_mode!r}")
        if self.adaptive_max_new_tokens and self.reference is None:
            raise ValueError("adaptive_max_new_tokens needs reference (its p95 is the floor)")

    @property
    def buffer(self) -> int:
        """The overlong buffer in tokens (DAPO used 4096 of 20480, i.e. 1/5)."""
        if self.overlong_buffer is None:
            return max(1, self.max_new_tokens // 5)
        return self.overlong_buffer

    @property
    def floor_tokens(self) -> int:
        """Lowest adaptive cap: the teacher's reference p95, at most the ceiling."""
        p95 = self.reference.p95 if self.reference else self.max_new_tokens
        return max(1, min(self.max_new_tokens, math.ceil(p95)))


@dataclass(frozen=True)
class PenaltyPlan:
    """Which penalties apply to the batch just observed, and the cap for the next batch."""

    overlong: bool = False
    overlong_buffer: int = 1
    overlong_max_tokens: int = 1          # cap the observed batch was generated under
    stop_properly: Optional[str] = None   # None | 'mask' | 'downweight'
    stop_properly_weight: float = 0.1
    length_ratio_coef: float = 0.0        # 0: off
    length_ratio_tolerance: float = 0.25
    reference_mean: Optional[float] = None
    prefer_bad_rejected: bool = False     # pick truncated/repetitive rejected (rejection_badness)
    max_new_tokens: int = 1               # cap for the next batch
    topk_kl_coef: float = 0.0             # remedy (a) on truncated/repetitive rollouts (0: off)
    mixture_fraction: float = 0.0         # remedy (b): share of prompts the teacher answers
    mixture_sft_coef: float = 1.0
    anchor_coef: float = 0.0              # remedy (c): divergence anchor to the starting student
    loop_tail: int = 0                    # tokens of a looping tail denied positive advantage
    malformed_weight: float = 1.0         # sequence-level weight of a malformed rollout (format)
    prefer_malformed_rejected: bool = False  # malformed rollouts count in rejection_badness

    @classmethod
    def off(cls, max_new_tokens: int) -> "PenaltyPlan":
        return cls(overlong_max_tokens=max_new_tokens, max_new_tokens=max_new_tokens)

    @property
    def any_on(self) -> bool:
        return bool(self.overlong or self.stop_properly or self.length_ratio_coef > 0
                    or self.prefer_bad_rejected or self.topk_kl_coef > 0 or self.mixture_fraction > 0
                    or self.anchor_coef > 0 or self.loop_tail or self.malformed_weight < 1
                    or self.prefer_malformed_rejected)

    def as_metrics(self, prefix: str = "length/penalty/") -> dict[str, float]:
        return {prefix + "overlong": float(self.overlong),
                prefix + "stop_properly": float(self.stop_properly is not None),
                prefix + "stop_properly_weight": float(self.stop_properly_weight),
                prefix + "length_ratio_coef": float(self.length_ratio_coef),
                prefix + "prefer_bad_rejected": float(self.prefer_bad_rejected),
                prefix + "max_new_tokens": float(self.max_new_tokens),
                prefix + "topk_kl_coef": float(self.topk_kl_coef),
                prefix + "mixture_fraction": float(self.mixture_fraction),
                prefix + "anchor_coef": float(self.anchor_coef),
                prefix + "loop_tail": float(self.loop_tail),
                prefix + "malformed_weight": float(self.malformed_weight),
                prefix + "prefer_malformed_rejected": float(self.prefer_malformed_rejected)}

    def rejection_preference(self, finish_reasons: Sequence[str], repetitive: Sequence[bool],
                             malformed: Optional[Sequence[bool]] = None) -> Optional[np.ndarray]:
        """SMPO's rejected-badness per rollout (rejection_badness) from what this plan turns
        on: truncation and loops under prefer_bad_rejected, failed format checks under
        prefer_malformed_rejected; None when neither is on."""
        use_len = self.prefer_bad_rejected
        use_fmt = self.prefer_malformed_rejected and malformed is not None
        if not (use_len or use_fmt):
            return None
        if use_len:
            return rejection_badness(finish_reasons, repetitive, malformed if use_fmt else None)
        return np.asarray(malformed, dtype=np.int64)

    def remedy_weights(self, stats: "LengthStats", finish_reasons: Sequence[str]) -> Optional[np.ndarray]:
        """Per rollout, the weight of remedy (a): topk_kl_coef on truncated or repetitive
        rollouts, 0 elsewhere; None when the remedy is off."""
        if self.topk_kl_coef <= 0:
            return None
        bad = np.array([r == "length" for r in finish_reasons]) | np.array(stats.repetitive, bool)
        return np.where(bad, self.topk_kl_coef, 0.0).astype(np.float32)

    def no_reward_tails(self, stats: "LengthStats") -> Optional[list[int]]:
        """Per rollout, how many final tokens may not earn a positive advantage (a looping
        rollout's tail window; 0 for the rest); None when the rule is off."""
        if not self.loop_tail:
            return None
        return [self.loop_tail if flag else 0 for flag in stats.repetitive]


def apply_sequence_penalty(plan: PenaltyPlan, lengths: Sequence[int],
                           finish_reasons: Sequence[str]) -> np.ndarray:
    """Per-rollout scalar to add to the rollout's advantage::

        a_i = [overlong] * R_overlong(L_i; overlong_max_tokens, overlong_buffer)
              (= -1 whenever finish_i == 'length')
            + [coef > 0] * P_ratio(L_i; reference_mean, coef, tolerance)
    """
    _check_batch(len(lengths), finish_reasons)
    out = np.zeros(len(lengths))
    if plan.overlong:
        term = overlong_penalty(lengths, plan.overlong_max_tokens, plan.overlong_buffer)
        out += np.where(np.array(finish_reasons) == "length", -1.0, term)
    if plan.length_ratio_coef > 0 and plan.reference_mean:
        out += length_ratio_penalty(lengths, plan.reference_mean, plan.length_ratio_coef,
                                    plan.length_ratio_tolerance)
    return out


def loss_weights(plan: PenaltyPlan, finish_reasons: Sequence[str],
                 malformed: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Per-rollout weight of the sequence-level (policy-gradient) term: stop-properly when on,
    else 1; times plan.malformed_weight on rollouts that fail a format check."""
    if plan.stop_properly is None:
        _check_batch(len(finish_reasons), finish_reasons)
        w = np.ones(len(finish_reasons))
    else:
        w = stop_properly_weights(finish_reasons, plan.stop_properly, plan.stop_properly_weight)
    if malformed is not None and plan.malformed_weight < 1:
        if len(malformed) != len(finish_reasons):
            raise ValueError("finish_reasons and malformed flags differ in length")
        w = np.where(np.asarray(malformed, bool), w * plan.malformed_weight, w)
    return w


MODES = ("off", "monitor", "auto")


class LengthMonitor:
    """Stats + detector + penalty policy, called once per rollout batch.

    mode 'off': stats only (always computed and logged), no events, all-off plan.
    mode 'monitor': stats and events, all-off plan (watch before you act).
    mode 'auto': penalties follow the active conditions:
        inflation      -> overlong + stop_properly + adaptive max_new_tokens (if enabled)
                          + top-k KL remedy + teacher mixture
        repetition     -> stop_properly + prefer_bad_rejected + top-k KL remedy + loop-tail rule
                          + divergence anchor to the starting student
        short_collapse -> length_ratio (needs a reference)
        eos_collapse   -> stop_properly + overlong + top-k KL remedy + teacher mixture
    and switch off when the detector reports the condition recovered. Format checks
    (opd/formatting.py) are not gated by the detector: in 'auto' a malformed rollout always
    gets ``malformed_weight`` and, with ``prefer_malformed_rejected``, counts as bad for SMPO.

    Never training on nothing: stop-properly masking would leave no gradient at all when every
    rollout is truncated (a collapsing student). When the stopped rollouts hold less than
    ``min_effective_weight`` of the batch's tokens, truncated rollouts are down-weighted
    instead of masked (an event says so), and the remedies that *teach* stopping carry the
    signal: the teacher's top-k distribution (which holds its EOS probability wherever it would
    stop) and teacher completions that end in EOS. Masking alone does not teach a model to
    stop (DAPO, Yu et al. 2025, who use a soft overlong penalty for that reason). While
    repetition is on, a divergence anchor (StableOPD's KL constraint to a reference policy,
    here the starting student) keeps the student near where it began, so a loop the
    distillation signal rewards cannot run away.
    """

    def __init__(self, eos_ids: Collection[int], penalty: PenaltyConfig,
                 detector: Optional[DetectorConfig] = None, mode: str = "monitor",
                 min_length: int = 1, ngram: int = 3, tail_window: int = 32,
                 repeat_threshold: float = 0.5):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_ngram_args(ngram, tail_window, repeat_threshold)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.penalty, self.mode = penalty, mode
        self.detector = LengthDetector(detector)
        self.stats_kwargs = dict(min_length=min_length, ngram=ngram, tail_window=tail_window,
                                 repeat_threshold=repeat_threshold)
        self.max_new_tokens = penalty.max_new_tokens  # cap in force for the next batch
        self._starving = False  # stop-properly is down-weighting to keep a gradient

    def observe(self, token_ids: Sequence[Sequence[int]], finish_reasons: Sequence[str],
                step: int) -> tuple[LengthStats, list[LengthEvent], PenaltyPlan]:
        """Stats of the batch (generated under ``self.max_new_tokens``), the detector's
        events, and the plan: penalties for this batch plus the next batch's cap."""
        ref = self.penalty.reference
        stats = rollout_stats(token_ids, finish_reasons, self.eos_ids, self.max_new_tokens,
                              reference_mean=ref.mean if ref else None, **self.stats_kwargs)
        if self.mode == "off":
            return stats, [], PenaltyPlan.off(self.max_new_tokens)
        events = self.detector.update(stats, step)
        if self.mode == "monitor":
            return stats, events, PenaltyPlan.off(self.max_new_tokens)
        plan = self._auto_plan(stats)
        plan, starving = self._keep_gradient(plan, token_ids, finish_reasons, step)
        return stats, events + starving, plan

    def _keep_gradient(self, plan: PenaltyPlan, token_ids, finish_reasons,
                       step: int) -> tuple[PenaltyPlan, list[LengthEvent]]:
        """Down-weight instead of mask when masking would leave less than min_effective_weight
        of the tokens in the policy-gradient term; an event when this starts or stops."""
        from dataclasses import replace

        lengths = np.array([len(t) for t in token_ids], np.float64)
        kept = float(lengths[np.array(finish_reasons) == "stop"].sum() / max(1.0, lengths.sum()))
        floor = self.penalty.min_effective_weight
        starving = plan.stop_properly == "mask" and kept < floor
        events = []
        if starving != self._starving:
            self._starving = starving
            why = (f"stopped rollouts hold {kept:.0%} of the tokens < length.min_effective_weight={floor:g}: "
                   f"truncated rollouts down-weighted to {max(floor, plan.stop_properly_weight):g} instead "
                   f"of masked" if starving else f"stopped rollouts hold {kept:.0%} of the tokens again: masking")
            events.append(LengthEvent(step, "effective_weight", "low" if starving else "ok", why))
        if starving:
            plan = replace(plan, stop_properly="downweight",
                           stop_properly_weight=max(floor, plan.stop_properly_weight))
        return plan, events

    def _auto_plan(self, stats: LengthStats) -> PenaltyPlan:
        p, active = self.penalty, self.detector.active()
        inflation = "inflation" in active
        batch_cap = self.max_new_tokens
        if p.adaptive_max_new_tokens:
            self.max_new_tokens = adaptive_max_new_tokens(
                batch_cap, stats, inflation, p.floor_tokens, p.max_new_tokens,
                p.adaptive_shrink, p.adaptive_grow)
        stop = bool(active & {"inflation", "repetition", "eos_collapse"})
        ratio_on = "short_collapse" in active and p.reference is not None
        return PenaltyPlan(
            overlong=bool(active & {"inflation", "eos_collapse"}) and p.buffer > 0,
            overlong_buffer=max(1, min(p.buffer, batch_cap)), overlong_max_tokens=batch_cap,
            stop_properly=p.stop_properly_mode if stop else None,
            stop_properly_weight=p.stop_properly_weight,
            length_ratio_coef=p.length_ratio_coef if ratio_on else 0.0,
            length_ratio_tolerance=p.length_ratio_tolerance,
            reference_mean=p.reference.mean if p.reference else None,
            prefer_bad_rejected="repetition" in active, max_new_tokens=self.max_new_tokens,
            topk_kl_coef=p.topk_kl_coef if stop else 0.0,
            mixture_fraction=p.mixture_fraction if active & {"inflation", "eos_collapse"} else 0.0,
            mixture_sft_coef=p.mixture_sft_coef,
            anchor_coef=p.anchor_coef if "repetition" in active else 0.0,
            loop_tail=p.tail_window if p.loop_tail and "repetition" in active else 0,
            malformed_weight=p.malformed_weight, prefer_malformed_rejected=p.prefer_malformed_rejected)

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state (the cap in force and the detector)."""
        return {"mode": self.mode, "max_new_tokens": self.max_new_tokens,
                "detector": self.detector.state_dict(), "starving": self._starving}

    def load_state_dict(self, d: dict) -> None:
        """Restore the cap and the detector; the mode stays the one this monitor was built with."""
        self.max_new_tokens = min(self.penalty.max_new_tokens, int(d["max_new_tokens"]))
        self.detector.load_state_dict(d["detector"])
        self._starving = bool(d.get("starving", False))
