"""The length monitor: statistics, detector, controller and penalty policy, called once per
rollout batch.

Mode 'off' computes statistics only, 'monitor' adds the detector's events and the
controller's errors, 'auto' turns the remedies' strengths into a :class:`PenaltyPlan` (see
:class:`LengthMonitor`): set by the PI controller (``length.control=pi``,
opd/length/controller.py) or switched on and off by the detector (``switch``). Its settings
are one :class:`LengthConfig` (``length.*``), which nests the settings of each part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Collection, Optional, Sequence

import numpy as np

from opd.constraints import ge, knob, one_of, require
from opd.length.controller import CONTROLS, ControllerConfig, LengthController, pi_strengths, switch_strengths
from opd.length.detector import DetectorConfig, LengthDetector, LengthEvent
from opd.length.penalties import (PenaltyConfig, PenaltyPlan, RemedyConfig, adaptive_max_new_tokens,
                                  stop_properly_at)
from opd.length.stats import LengthStats, ReferenceLengths, StatsConfig, rollout_stats

MODES = ("off", "monitor", "auto")


@dataclass
class LengthConfig:
    """The length monitor's settings (``length.*``): its mode and each part's own config."""

    mode: str = knob("auto", one_of(*MODES))  # "off": statistics only | "monitor": + the detector's
    #                                           events | "auto": + penalties and remedies
    reference_prompts: int = knob(64, ge(0))  # teacher greedy generations at start for the reference
    #                                           lengths and rates (0: the dataset's answers, when it has some)
    control: str = knob("switch", one_of(*CONTROLS))  # 'auto' sets the remedies' strengths by "switch":
    #                                 on/off with the detector's conditions | "pi": the controller
    probe_every: int = knob(0, ge(0))  # greedy probe of the student every N steps, a signal of the
    #                                    controller's own (0: never)
    probe_prompts: int = knob(8, ge(1))  # held-out prompts the probe decodes greedily
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # the PI rule's gains
    stats: StatsConfig = field(default_factory=StatsConfig)  # what counts as short and as a loop
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # when a condition is on
    penalties: PenaltyConfig = field(default_factory=PenaltyConfig)  # what 'auto' applies then
    remedies: RemedyConfig = field(default_factory=RemedyConfig)  # ... and what teaches stopping


class LengthMonitor:
    """Stats + detector + controller + penalty policy, called once per rollout batch.

    mode 'off': stats only (always computed and logged), no events, all-off plan.
    mode 'monitor': stats, events and the controller's errors, all-off plan (watch before you act).
    mode 'auto', control 'pi': every remedy gets a strength in [0, 1] from the controller
    (opd/length/controller.py), which scales its configured coefficient: the top-k KL remedy,
    the mixture fraction, the overlong penalty, stop-properly (a truncated rollout's weight goes
    from 1 down to the mode's), the anchor, the loop-tail window and the adaptive cap (from the
    ceiling down to the reference p95) follow the 'stop' and 'loop' strengths; the length-ratio
    penalty follows 'short'. The detector's events are then reports only.
    mode 'auto', control 'switch': penalties follow the active conditions (strengths 0 or 1):
        inflation      -> overlong + stop_properly + adaptive max_new_tokens (if on, with a reference)
                          + top-k KL remedy + teacher mixture
        repetition     -> stop_properly + prefer_bad_rejected + top-k KL remedy + loop-tail rule
                          + divergence anchor to the starting student
        short_collapse -> length_ratio (needs a reference)
        eos_collapse   -> stop_properly + overlong + top-k KL remedy + teacher mixture
    and switch off when the detector reports the condition recovered. Format checks
    (opd/formatting.py) are not gated by the detector: in 'auto' a malformed rollout always
    gets ``malformed_weight`` and, with ``prefer_malformed_rejected``, counts as bad for SMPO.

    Never training on nothing: stop-properly masking would leave no gradient at all when every
    rollout is truncated (a collapsing student). When the loss has a policy-gradient term (the
    one stop-properly weights act on) and the stopped rollouts hold less than
    ``penalties.min_effective_weight`` of the batch's tokens, truncated rollouts are down-weighted
    instead of masked (an event says so), and the remedies that *teach* stopping carry the
    signal: the teacher's top-k distribution (which holds its EOS probability wherever it would
    stop) and teacher completions that end in EOS. Masking alone does not teach a model to
    stop (DAPO, Yu et al. 2025, who use a soft overlong penalty for that reason). While
    repetition is on, a divergence anchor (StableOPD's KL constraint to a reference policy,
    here the starting student) keeps the student near where it began, so a loop the
    distillation signal rewards cannot run away.
    """

    def __init__(self, eos_ids: Collection[int], max_new_tokens: int, config: Optional[LengthConfig] = None,
                 reference: Optional[ReferenceLengths] = None, policy_gradient: bool = True,
                 malformed_weight: float = 1.0, prefer_malformed_rejected: bool = False):
        """``max_new_tokens``: the configured cap (the adaptive cap's ceiling); ``reference``:
        the teacher's lengths (ratio rules, the adaptive cap's floor); ``policy_gradient``:
        whether the loss has the term the stop-properly guard protects; the last two: the
        format checks' penalty (opd/formatting.py), 1 and False when rollouts are not checked."""
        self.config = config or LengthConfig()
        require(self.config)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.reference, self.ceiling = reference, max_new_tokens
        self.detector = LengthDetector(self.config.detector)
        self.controller = LengthController(self.config.controller, reference)
        self.strengths: dict[str, float] = {}  # each actuator's strength in the last plan
        self.buffer = self.config.penalties.buffer(max_new_tokens)  # the overlong penalty's, in tokens
        p95 = reference.p95 if reference else max_new_tokens
        self.floor_tokens = max(1, min(max_new_tokens, math.ceil(p95)))  # the lowest adaptive cap
        self.min_effective_weight = self.config.penalties.min_effective_weight if policy_gradient else 0.0
        self.malformed_weight, self.prefer_malformed_rejected = malformed_weight, prefer_malformed_rejected
        self.max_new_tokens = max_new_tokens  # cap in force for the next batch
        self._starving = False  # stop-properly is down-weighting to keep a gradient

    def observe(self, token_ids: Sequence[Sequence[int]], finish_reasons: Sequence[str],
                step: int) -> tuple[LengthStats, list[LengthEvent], PenaltyPlan]:
        """Stats of the batch (generated under ``self.max_new_tokens``), the detector's
        events, and the plan: penalties for this batch plus the next batch's cap."""
        ref = self.reference
        stats = rollout_stats(token_ids, finish_reasons, self.eos_ids, self.max_new_tokens,
                              self.config.stats, reference_mean=ref.mean if ref else None)
        if self.config.mode == "off":
            return stats, [], PenaltyPlan.off(self.max_new_tokens)
        events = self.detector.update(stats, step)
        drives = self.controller.update(stats)
        if self.config.mode == "monitor":
            return stats, events, PenaltyPlan.off(self.max_new_tokens)
        self.strengths = (pi_strengths(drives) if self.config.control == "pi"
                          else switch_strengths(self.detector.active(), self.reference is not None))
        plan = self._auto_plan(stats, self.strengths)
        plan, starving = self._keep_gradient(plan, token_ids, finish_reasons, step)
        return stats, events + starving, plan

    def _keep_gradient(self, plan: PenaltyPlan, token_ids, finish_reasons,
                       step: int) -> tuple[PenaltyPlan, list[LengthEvent]]:
        """Down-weight instead of mask when masking would leave less than min_effective_weight
        of the tokens in the policy-gradient term; an event when this starts or stops."""
        lengths = np.array([len(t) for t in token_ids], np.float64)
        kept = float(lengths[np.array(finish_reasons) == "stop"].sum() / max(1.0, lengths.sum()))
        floor = self.min_effective_weight
        cut = 0.0 if plan.stop_properly == "mask" else plan.stop_properly_weight  # a truncated row's weight
        starving = plan.stop_properly is not None and cut < floor and kept < floor
        events = []
        if starving != self._starving:
            self._starving = starving
            why = (f"stopped rollouts hold {kept:.0%} of the tokens < length.penalties.min_effective_weight={floor:g}: "
                   f"truncated rollouts down-weighted to {max(floor, plan.stop_properly_weight):g} instead "
                   f"of masked" if starving else f"stopped rollouts hold {kept:.0%} of the tokens again: masking")
            events.append(LengthEvent(step, "effective_weight", "low" if starving else "ok", why))
        if starving:
            plan = replace(plan, stop_properly="downweight",
                           stop_properly_weight=max(floor, plan.stop_properly_weight))
        return plan, events

    def _auto_plan(self, stats: LengthStats, s: dict[str, float]) -> PenaltyPlan:
        """The plan of strengths `s` (controller.ACTUATORS): each remedy's configured
        coefficient times its strength; the next batch's cap from the adaptive rule."""
        p, r = self.config.penalties, self.config.remedies
        batch_cap = self.max_new_tokens
        if p.adaptive_max_new_tokens and self.reference is not None:
            self.max_new_tokens = self._next_cap(stats, s["max_new_tokens"])
        stop_mode, stop_weight = stop_properly_at(p.stop_properly_mode, p.stop_properly_weight, s["stop_properly"])
        tail = round(s["loop_tail"] * self.config.stats.tail_window) if r.loop_tail_rule else 0
        return PenaltyPlan(
            overlong=s["overlong"] > 0 and self.buffer > 0, overlong_coef=s["overlong"],
            overlong_buffer=max(1, min(self.buffer, batch_cap)), overlong_max_tokens=batch_cap,
            stop_properly=stop_mode, stop_properly_weight=stop_weight,
            length_ratio_coef=s["length_ratio"] * p.length_ratio_coef if self.reference else 0.0,
            length_ratio_tolerance=p.length_ratio_tolerance,
            reference_mean=self.reference.mean if self.reference else None,
            prefer_bad_rejected=s["loop_tail"] > 0, max_new_tokens=self.max_new_tokens,
            topk_kl_coef=s["topk_kl"] * r.topk_kl_coef,
            mixture_fraction=s["mixture"] * r.mixture_fraction, mixture_sft_coef=r.mixture_sft_coef,
            anchor_coef=s["anchor"] * r.anchor_coef, loop_tail_tokens=tail,
            malformed_weight=self.malformed_weight, prefer_malformed_rejected=self.prefer_malformed_rejected)

    def _next_cap(self, stats: LengthStats, strength: float) -> int:
        """switch: shrink while inflating, grow back after (adaptive_max_new_tokens); pi: from the
        ceiling (strength 0) down to the reference p95 (strength 1)."""
        p = self.config.penalties
        if self.config.control == "switch":
            return adaptive_max_new_tokens(self.max_new_tokens, stats, strength > 0, self.floor_tokens, self.ceiling,
                                           p.adaptive_shrink, p.adaptive_grow)
        return self.ceiling - round(strength * (self.ceiling - self.floor_tokens))

    def observe_probe(self, greedy: LengthStats) -> None:
        """The greedy probe's statistics, a signal of the controller's own."""
        self.controller.observe_probe(greedy)

    def metrics(self, prefix: str = "length/") -> dict[str, float]:
        """The detector's flags and baselines, the controller's errors and probe figures, and
        each actuator's strength (``strength/<name>``) in the last plan."""
        return {**self.detector.metrics(prefix), **self.controller.metrics(prefix),
                **{f"{prefix}strength/{k}": v for k, v in self.strengths.items()}}

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state (the cap in force, the detector and the controller)."""
        return {"mode": self.config.mode, "max_new_tokens": self.max_new_tokens,
                "detector": self.detector.state_dict(), "controller": self.controller.state_dict(),
                "strengths": dict(self.strengths), "starving": self._starving}

    def load_state_dict(self, d: dict) -> None:
        """Restore the cap, the detector and the controller; the mode stays the one this monitor
        was built with."""
        self.max_new_tokens = min(self.ceiling, int(d["max_new_tokens"]))
        self.detector.load_state_dict(d["detector"])
        if "controller" in d:  # absent from checkpoints of runs without a controller
            self.controller.load_state_dict(d["controller"])
        self.strengths = dict(d.get("strengths", {}))
        self._starving = bool(d.get("starving", False))
