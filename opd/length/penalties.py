"""Length penalties: pure functions of lengths and finish reasons, and the plan that says
which of them apply to a batch (:class:`PenaltyPlan`, built by the monitor from a
:class:`PenaltyConfig` and a :class:`RemedyConfig`).

Departures from the papers: DAPO's soft overlong punishment (Yu et al. 2025) is a reward
term; here it is a per-rollout scalar added to the rollout's advantage, and rollouts whose
finish reason is 'length' always get the full -1 whatever length the caller counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from opd.constraints import between, ge, knob, one_of, optional
from opd.length.stats import LengthStats, check_batch

STOP_PROPERLY_MODES = ("mask", "downweight")  # what stop-properly does to a truncated rollout


def overlong_penalty(lengths: Sequence[int], max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), per rollout::

        R(L) = 0                                  if L <= M - B
             = ((M - B) - L) / B                  if M - B < L <= M
             = -1                                 if L > M

    with M = ``max_new_tokens``, B = ``buffer`` in [1, M]; i.e. clip(((M-B) - L)/B, -1, 0).
    """
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(f"buffer must be in [1, max_new_tokens={max_new_tokens}], got {buffer}")
    lens = np.asarray(lengths, dtype=np.float64)  # L of the formula, per rollout
    return np.clip(((max_new_tokens - buffer) - lens) / buffer, -1.0, 0.0)


def stop_properly_weights(finish_reasons: Sequence[str], mode: str = "mask",
                          weight: float = 0.1) -> np.ndarray:
    """Per-rollout loss weight: w_i = 1 if rollout i stopped ('stop'), else 0 (``mode='mask'``)
    or ``weight`` (``mode='downweight'``), so truncated rollouts do not silently train."""
    if mode not in STOP_PROPERLY_MODES:
        raise ValueError(f"mode must be one of {STOP_PROPERLY_MODES}, got {mode!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    check_batch(len(finish_reasons), finish_reasons)
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


def stop_properly_at(mode: Optional[str], weight: float, strength: float) -> tuple[Optional[str], float]:
    """Stop-properly at a strength in [0, 1] -> (mode, weight) of a plan: off at 0, the
    configured mode and weight at 1, and in between 'downweight' with a truncated rollout's
    weight w = 1 - strength * (1 - w_mode), w_mode = 0 ('mask') or ``weight``."""
    if mode is None or strength <= 0:
        return None, weight
    if strength >= 1:
        return mode, weight
    return "downweight", 1.0 - strength * (1.0 - (0.0 if mode == "mask" else weight))


def rejection_badness(finish_reasons: Sequence[str], repetitive_flags: Sequence[bool],
                      malformed_flags: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Badness for picking an SMPO pair's rejected completion among a prompt's samples:
    b_i = [finish_i == 'length'] + [repetitive_i] (+ [malformed_i], a failed format check,
    opd/formatting.py) in {0, 1, 2, 3}; prefer the highest, so the preference loss pushes
    down truncation, loops and broken markup rather than EOS of a good answer."""
    check_batch(len(finish_reasons), finish_reasons)
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


@dataclass
class PenaltyConfig:
    """How strong each penalty is at full strength in mode 'auto' (``length.penalties.*``)."""

    overlong_buffer: Optional[int] = knob(4, optional(ge(0)))  # DAPO buffer B in tokens (at most
    #                                    rollout.max_new_tokens); null: max_new_tokens // 5; 0: never
    stop_properly_mode: Optional[str] = knob("mask", optional(one_of(*STOP_PROPERLY_MODES)))  # what
    #                                    stop-properly does to a truncated rollout; null: never
    stop_properly_weight: float = knob(0.1, between(0, 1))  # weight of truncated rollouts in 'downweight'
    length_ratio_coef: float = knob(1.0, ge(0))  # short collapse: two-sided penalty; 0: never
    length_ratio_tolerance: float = knob(0.25, ge(0))
    adaptive_max_new_tokens: bool = False  # shrink the cap under inflation (needs reference lengths,
    #                                        whose p95 is its floor; without them the cap stays)
    adaptive_shrink: float = knob(0.9, between(0, 1, lo_open=True))  # cap *= shrink per step under
    #                                     inflation (down to the reference p95)
    adaptive_grow: float = knob(1.1, ge(1))  # cap *= grow per step once recovered (up to the ceiling)
    min_effective_weight: float = knob(0.1, between(0, 1))  # stop-properly never leaves less than this
    #                                     share of the batch's tokens in the policy-gradient term: it
    #                                     down-weights instead of masking, and the run warns

    def buffer(self, max_new_tokens: int) -> int:
        """The overlong buffer in tokens under a cap (DAPO used 4096 of 20480, i.e. 1/5)."""
        if self.overlong_buffer is None:
            return max(1, max_new_tokens // 5)
        return self.overlong_buffer


@dataclass
class RemedyConfig:
    """The remedies that teach stopping, at the strength the controller sets (or switched on
    by the detector) in mode 'auto' (``length.remedies.*``; see LengthMonitor)."""

    topk_kl_coef: float = knob(1.0, ge(0))  # (a) forward KL over the teacher's top-k on truncated /
    #                                         repetitive rollouts (needs teacher.logprobs=topk or full); 0: off
    mixture_fraction: float = knob(0.25, between(0, 1))  # (b) StableOPD rollout mixture: share of a
    #                                     step's prompts answered by the teacher (ending in EOS); 0: off
    mixture_sft_coef: float = knob(1.0, ge(0))  # SFT weight of those teacher completions
    anchor_coef: float = knob(0.1, ge(0))  # (c) StableOPD KL constraint: KL(student||starting student)
    #                                        on every rollout while repetition is on (keeps a frozen copy); 0: off
    loop_tail_rule: bool = True  # (d) the last length.stats.tail_window tokens of a looping rollout
    #                              never earn a positive advantage (policy-gradient loss)


@dataclass(frozen=True)
class PenaltyPlan:
    """Which penalties apply to the batch just observed, and the cap for the next batch."""

    overlong: bool = False
    overlong_coef: float = 1.0            # scale of the overlong penalty when on
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
    loop_tail_tokens: int = 0             # remedy (d): tokens of a looping tail denied positive
    #                                       advantage (0: off)
    malformed_weight: float = 1.0         # sequence-level weight of a malformed rollout (format)
    prefer_malformed_rejected: bool = False  # malformed rollouts count in rejection_badness

    @classmethod
    def off(cls, max_new_tokens: int) -> "PenaltyPlan":
        return cls(overlong_max_tokens=max_new_tokens, max_new_tokens=max_new_tokens)

    @property
    def any_on(self) -> bool:
        return bool(self.overlong or self.stop_properly or self.length_ratio_coef > 0
                    or self.prefer_bad_rejected or self.topk_kl_coef > 0 or self.mixture_fraction > 0
                    or self.anchor_coef > 0 or self.loop_tail_tokens or self.malformed_weight < 1
                    or self.prefer_malformed_rejected)

    def as_metrics(self, prefix: str = "length/penalty/") -> dict[str, float]:
        return {prefix + "overlong": float(self.overlong), prefix + "overlong_coef": float(self.overlong_coef),
                prefix + "stop_properly": float(self.stop_properly is not None),
                prefix + "stop_properly_weight": float(self.stop_properly_weight),
                prefix + "length_ratio_coef": float(self.length_ratio_coef),
                prefix + "prefer_bad_rejected": float(self.prefer_bad_rejected),
                prefix + "max_new_tokens": float(self.max_new_tokens),
                prefix + "topk_kl_coef": float(self.topk_kl_coef),
                prefix + "mixture_fraction": float(self.mixture_fraction),
                prefix + "anchor_coef": float(self.anchor_coef),
                prefix + "loop_tail_tokens": float(self.loop_tail_tokens),
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

    def topk_kl_coef_N(self, stats: LengthStats, finish_reasons: Sequence[str]) -> Optional[np.ndarray]:
        """Per rollout, the weight of remedy (a): topk_kl_coef on truncated or repetitive
        rollouts, 0 elsewhere; None when the remedy is off."""
        if self.topk_kl_coef <= 0:
            return None
        bad = np.array([r == "length" for r in finish_reasons]) | np.array(stats.repetitive, bool)
        return np.where(bad, self.topk_kl_coef, 0.0).astype(np.float32)

    def loop_tail_tokens_N(self, stats: LengthStats) -> Optional[list[int]]:
        """Per rollout, how many final tokens may not earn a positive advantage (a looping
        rollout's tail window; 0 for the rest); None when the rule is off."""
        if not self.loop_tail_tokens:
            return None
        return [self.loop_tail_tokens if flag else 0 for flag in stats.repetitive]


def apply_sequence_penalty(plan: PenaltyPlan, lengths: Sequence[int],
                           finish_reasons: Sequence[str]) -> np.ndarray:
    """Per-rollout scalar to add to the rollout's advantage::

        a_i = [overlong] * overlong_coef * R_overlong(L_i; overlong_max_tokens, overlong_buffer)
              (R = -1 whenever finish_i == 'length')
            + [coef > 0] * P_ratio(L_i; reference_mean, coef, tolerance)
    """
    check_batch(len(lengths), finish_reasons)
    out = np.zeros(len(lengths))
    if plan.overlong:
        term = overlong_penalty(lengths, plan.overlong_max_tokens, plan.overlong_buffer)
        out += plan.overlong_coef * np.where(np.array(finish_reasons) == "length", -1.0, term)
    if plan.length_ratio_coef > 0 and plan.reference_mean:
        out += length_ratio_penalty(lengths, plan.reference_mean, plan.length_ratio_coef,
                                    plan.length_ratio_tolerance)
    return out


def loss_weights(plan: PenaltyPlan, finish_reasons: Sequence[str],
                 malformed: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Per-rollout weight of the sequence-level (policy-gradient) term: stop-properly when on,
    else 1; times plan.malformed_weight on rollouts that fail a format check."""
    if plan.stop_properly is None:
        check_batch(len(finish_reasons), finish_reasons)
        w = np.ones(len(finish_reasons))
    else:
        w = stop_properly_weights(finish_reasons, plan.stop_properly, plan.stop_properly_weight)
    if malformed is not None and plan.malformed_weight < 1:
        if len(malformed) != len(finish_reasons):
            raise ValueError("finish_reasons and malformed flags differ in length")
        w = np.where(np.asarray(malformed, bool), w * plan.malformed_weight, w)
    return w
