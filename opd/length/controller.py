"""The length controller: a proportional-integral rule that sets each remedy's strength so
that the student's smoothed length statistics track the teacher's.

Reference (the teacher's completions of ``length.reference_prompts``, sampled with the
rollouts' own settings, :class:`ReferenceLengths`): truncation rate T*, EOS rate E*,
repetition rate R*, mean length L*. Measured (the student's rollouts, EMA over steps with
``ema_decay``): T, E, R, L. Each step::

    e_trunc = T - T*      e_eos = E* - E      e_rep = R - R*      e_len = clip(L / L* - 1, -1, 1)
    e       = trunc_weight e_trunc + eos_weight e_eos + rep_weight e_rep + length_weight e_len
    e_db    = sign(e) max(0, |e| - dead_band)                      (dead band: no action near 0)
    I       = clip(I + ki clip(e_db, +-integrated_error_limit), +-integral_limit)
                                          (anti-windup: a clamped integral of a clipped error,
                                          held while u is saturated or every rollout is truncated)
    u       = clip(kp e_db + I, -1, 1), and 1 while every rollout is truncated

``e > 0`` means too long (truncated, not stopping, looping), ``e < 0`` too short. The
integral holds the strength a student needs to stay at the teacher's rates; anti-windup is
fourfold:

- the integral is clamped;
- it is not moved further while the output is already saturated in the error's direction;
- it is held while every rollout is truncated, the measurement's own saturation: a batch cut
  at the cap says the student is too long but not by how much, so the output is then full
  strength, and the integral waits;
- it adds the error clipped to ``integrated_error_limit``: a student answers the remedies
  some steps late, so the large errors of its way down from the cap would otherwise build an
  integral (0.38 on the real pair) that holds the stop strength up, and the student too
  short, for 20 steps after it has learnt to stop. The proportional term answers large
  errors; the integral learns the small steady offset.

The strengths in [0, 1] scale each remedy's configured coefficient (opd/length/monitor.py)::

    stop   = max(u, 0), at least probe_gain * (greedy excess)   top-k KL, overlong,
                                                                stop-properly, adaptive cap
    loop   = stop * clip(max(R, greedy R) - R*, 0, 1)           anchor, loop-tail rule, SMPO's
                                                                bad-rejected choice
    short  = max(-u, 0)                                         length-ratio penalty against L*
    track  = max(stop, short)                                   the teacher mixture

The teacher mixture (rows the teacher answered, trained by SFT) teaches the teacher's own
lengths, so it acts in both directions; it is also the one remedy that works with every loss
(the overlong, length-ratio and stop-properly terms act on the policy-gradient term only).

The greedy probe (``length.probe_every``) feeds its own signal: the excess of the greedy
completions' truncation and repetition over the teacher's greedy rates
(``ReferenceLengths.greedy_rates``), smoothed over probes with ``ema_decay``, is a floor under
``stop`` until the next probe, so loops the sampled rollouts no longer show are still
treated. A probe decodes a few prompts, and a student near the edge loops on all of them or
on none, so its figures are smoothed and its gain is below 1: a floor of full strength from
one probe would switch the remedies like the detector does. ``length.control=switch`` keeps the
hysteresis detector's on/off rule (:func:`switch_strengths`) for comparison; the errors are
measured and logged either way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from opd.constraints import between, ge, knob, require
from opd.length.stats import LengthStats, ReferenceLengths

CONTROLS = ("pi", "switch")  # length.control
# actuator -> the strength that drives it ('stop', 'loop', 'short' or 'track'); see the module docstring
ACTUATORS = {"topk_kl": "stop", "mixture": "track", "overlong": "stop", "stop_properly": "stop",
             "max_new_tokens": "stop", "anchor": "loop", "loop_tail": "loop", "length_ratio": "short"}


@dataclass
class ControllerConfig:
    """Gains of the proportional-integral length controller (``length.controller.*``)."""

    ema_decay: float = knob(0.5, between(0, 1, hi_open=True))  # measured <- decay * measured
    #                                                          + (1 - decay) * this batch's value
    kp: float = knob(0.5, ge(0))  # proportional gain: strength per unit of error
    ki: float = knob(0.05, ge(0))  # integral gain: strength added per step per unit of error
    dead_band: float = knob(0.05, between(0, 1))  # |error| below this: no action, no integration
    integral_limit: float = knob(1.0, between(0, 1))  # |integral| never exceeds this (anti-windup)
    integrated_error_limit: float = knob(0.2, ge(0))  # the error the integral adds is clipped to
    #                                       +-this: it learns the steady offset, not the transient
    trunc_weight: float = knob(1.0, ge(0))  # weight of e_trunc in the error
    eos_weight: float = knob(0.0, ge(0))  # of e_eos (0: EOS rate is mostly 1 - truncation already)
    rep_weight: float = knob(0.5, ge(0))  # of e_rep (loops also scale the 'loop' strength directly)
    length_weight: float = knob(0.5, ge(0))  # of e_len (needs a reference mean length)
    probe_gain: float = knob(0.5, ge(0))  # stop-strength floor per unit of greedy excess over the
    #                                       teacher (the probes' EMA)


@dataclass
class ControllerState:
    """What a checkpoint keeps of the controller (JSON-serialisable)."""

    ema: Optional[dict] = None  # truncated_frac, eos_frac, repetition_frac, mean
    integral: float = 0.0
    probe: Optional[dict] = None  # the last greedy probe: truncated_frac, repetition_frac, mean


def _ema(last: Optional[dict], values: dict, decay: float) -> dict:
    """``values`` folded into the running averages ``last`` (``values`` itself at first)."""
    return values if last is None else {k: decay * last[k] + (1.0 - decay) * v for k, v in values.items()}


def _clip(e: float, limit: float) -> float:
    return max(-limit, min(limit, e))


def _dead_band(e: float, width: float) -> float:
    return math.copysign(max(0.0, abs(e) - width), e)


class LengthController:
    """The PI rule of the module docstring, one ``update`` per rollout batch."""

    def __init__(self, config: Optional[ControllerConfig] = None, reference: Optional[ReferenceLengths] = None):
        self.config = config or ControllerConfig()
        require(self.config)
        self.reference = reference
        self.state = ControllerState()
        self.errors: dict[str, float] = {}  # this step's error terms, for logging

    def observe_probe(self, greedy: LengthStats) -> None:
        """Fold a greedy probe into the probes' EMA: its figures hold until the next probe."""
        values = {"truncated_frac": greedy.truncated_frac, "repetition_frac": greedy.repetition_frac,
                  "mean": greedy.mean}
        self.state.probe = _ema(self.state.probe, values, self.config.ema_decay)

    def measure(self, stats: LengthStats) -> dict[str, float]:
        """Smooth this batch into the EMAs; -> the error terms (positive: too long)."""
        values = {"truncated_frac": stats.truncated_frac, "eos_frac": stats.eos_frac,
                  "repetition_frac": stats.repetition_frac, "mean": stats.mean}
        self.state.ema = _ema(self.state.ema, values, self.config.ema_decay)
        return self.error_terms()

    def error_terms(self) -> dict[str, float]:
        """e_trunc, e_eos, e_rep, e_len and their weighted sum e (module docstring)."""
        ema, ref, c = self.state.ema, self.reference, self.config
        t_ref, e_ref, r_ref = (ref.truncated_frac, ref.eos_frac, ref.repetition_frac) if ref else (0.0, 1.0, 0.0)
        terms = {"trunc": ema["truncated_frac"] - t_ref, "eos": e_ref - ema["eos_frac"],
                 "rep": ema["repetition_frac"] - r_ref,
                 "len": _clip(ema["mean"] / ref.mean - 1.0, 1.0) if ref else 0.0}
        terms["total"] = (c.trunc_weight * terms["trunc"] + c.eos_weight * terms["eos"]
                          + c.rep_weight * terms["rep"] + c.length_weight * terms["len"])
        return terms

    def update(self, stats: LengthStats) -> dict[str, float]:
        """One step of the rule; -> the strengths 'stop', 'loop', 'short', 'track' in [0, 1]."""
        c = self.config
        self.errors = self.measure(stats)
        e = _dead_band(self.errors["total"], c.dead_band)
        if stats.truncated_frac >= 1.0:  # every rollout at the cap: how far too long is unknown
            u = 1.0  # full strength; the integral waits
        else:
            integral = _clip(self.state.integral + c.ki * _clip(e, c.integrated_error_limit), c.integral_limit)
            u_new = c.kp * e + integral
            if not (abs(u_new) > 1.0 and u_new * e > 0 and integral * e > 0):  # no wind-up past saturation
                self.state.integral = integral
            u = _clip(c.kp * e + self.state.integral, 1.0)
        self.errors.update(integral=self.state.integral, output=u)
        greedy_trunc, greedy_rep = self.probe_excess()
        stop = max(u, 0.0, min(1.0, c.probe_gain * max(greedy_trunc, greedy_rep)))
        rep_excess = max(self.errors["rep"], greedy_rep)
        short = max(-u, 0.0)
        return {"stop": stop, "loop": stop * min(1.0, max(0.0, rep_excess)), "short": short,
                "track": max(stop, short)}

    def probe_excess(self) -> tuple[float, float]:
        """The last greedy probe's truncation and repetition above the teacher's greedy rates
        (0, 0 without a probe)."""
        p, ref = self.state.probe, self.reference
        if p is None:
            return 0.0, 0.0
        t_ref, r_ref = ref.greedy_rates() if ref else (0.0, 0.0)
        return max(0.0, p["truncated_frac"] - t_ref), max(0.0, p["repetition_frac"] - r_ref)

    def metrics(self, prefix: str = "length/") -> dict[str, float]:
        """The error terms (``ctrl/err_<term>``, ``ctrl/integral``, ``ctrl/output``), the
        teacher's reference (``reference/<field>``) and the last probe's figures
        (``probe/truncated``, ``probe/repetitive``, ``probe/mean_len``)."""
        out = {f"{prefix}ctrl/{k if k in ('integral', 'output') else 'err_' + k}": float(v)
               for k, v in self.errors.items()}
        ref = self.reference
        if ref is not None:
            out.update({f"{prefix}reference/{k}": float(v) for k, v in asdict(ref).items() if v is not None})
        return {**out, **self.probe_metrics(prefix)}

    def probe_metrics(self, prefix: str = "length/") -> dict[str, float]:
        """The last greedy probe's figures ({} before the first)."""
        p = self.state.probe
        if p is None:
            return {}
        return {f"{prefix}probe/truncated": float(p["truncated_frac"]),
                f"{prefix}probe/repetitive": float(p["repetition_frac"]), f"{prefix}probe/mean_len": float(p["mean"])}

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state; a resumed run continues exactly."""
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = ControllerState(ema=d["ema"], integral=float(d["integral"]), probe=d["probe"])


def switch_strengths(active: frozenset[str], has_reference: bool) -> dict[str, float]:
    """``length.control=switch``: the detector's active conditions as strengths 0 or 1.

    inflation -> every stop remedy; eos_collapse -> the same but the adaptive cap;
    repetition -> top-k KL, stop-properly, anchor, loop-tail; short_collapse -> length ratio."""
    on = lambda *conds: float(bool(active & set(conds)))  # noqa: E731
    stop = ("inflation", "repetition", "eos_collapse")
    return {"topk_kl": on(*stop), "stop_properly": on(*stop), "mixture": on("inflation", "eos_collapse"),
            "overlong": on("inflation", "eos_collapse"), "max_new_tokens": on("inflation"),
            "anchor": on("repetition"), "loop_tail": on("repetition"),
            "length_ratio": on("short_collapse") if has_reference else 0.0}


def pi_strengths(drives: dict[str, float]) -> dict[str, float]:
    """Each actuator's strength from the controller's 'stop' / 'loop' / 'short' / 'track' (ACTUATORS)."""
    return {name: float(drives[drive]) for name, drive in ACTUATORS.items()}
