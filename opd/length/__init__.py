"""Length monitor: rollout-length statistics, a hysteresis detector, a feedback controller, and
length penalties.

On-policy distillation fails in a few recurring ways that all show in rollout lengths:
*inflation* (rollouts grow until most are cut at ``max_new_tokens``: truncation collapse),
*repetition loops*, *short collapse* (answers shrink to nothing) and *EOS collapse* (the
student stops emitting EOS). The driver loop calls :class:`LengthMonitor` once per rollout
batch; it computes :class:`LengthStats`, a :class:`LengthDetector` with hysteresis names
the conditions that are on, a :class:`LengthController` (proportional-integral, with a dead
band and a clamped integral) sets each remedy's strength so that the student's smoothed
truncation, EOS, repetition and length track the teacher's (``length.control=pi``; the
default ``switch`` turns remedies on and off with the detector instead), and pure penalty
functions turn the resulting :class:`PenaltyPlan` into numbers::

    monitor = LengthMonitor({eos}, max_new_tokens=1024, config=LengthConfig(mode="auto"),
                            reference=reference_lengths(teacher_token_ids))
    stats, events, plan = monitor.observe(token_ids, finish_reasons, step)   # batch t
    advantage_B += apply_sequence_penalty(plan, lengths_B, finish_reasons)  # batch t
    seq_weight_B = loss_weights(plan, finish_reasons)                      # batch t
    sampling.max_tokens = plan.max_new_tokens                               # batch t+1
    monitor.observe_probe(greedy_stats)          # every length.probe_every steps: greedy view

The package, one module per part (each importable alone, all re-exported here):

    stats.py      StatsConfig, LengthStats, rollout_stats, repetition flags, reference lengths
    detector.py   DetectorConfig, LengthDetector, LengthEvent (hysteresis)
    controller.py ControllerConfig, LengthController (the PI rule), the remedies' strengths
    penalties.py  the penalty functions, PenaltyConfig, RemedyConfig, PenaltyPlan
    monitor.py    LengthConfig (the five configs above, nested), LengthMonitor: the parts
                  together, once per batch

Each part owns its config dataclass, defaults included, and each field declares the values it
allows (opd/constraints.py). These defaults are a run's too: opd/config.py nests LengthConfig
as ``length``, and conf/length/ only picks the mode.

Conventions: a rollout's length is its number of completion tokens, EOS included when it
was generated. ``finish_reasons`` are vLLM's: 'stop' (EOS or a stop string) or 'length'
(cut at ``max_new_tokens``). Pure package: numpy, the standard library, ``opd.types`` and
``opd.constraints`` only; plain values in, plain values and dataclasses out; every
``state_dict`` is JSON-serialisable.
"""
from opd.length.controller import (ACTUATORS, CONTROLS, ControllerConfig, LengthController, pi_strengths,
                                   switch_strengths)
from opd.length.detector import CONDITIONS, DetectorConfig, LengthDetector, LengthEvent
from opd.length.monitor import MODES, LengthConfig, LengthMonitor
from opd.length.penalties import (STOP_PROPERLY_MODES, PenaltyConfig, PenaltyPlan, RemedyConfig,
                                  adaptive_max_new_tokens, apply_sequence_penalty, length_ratio_penalty,
                                  loss_weights, overlong_penalty, rejection_badness, stop_properly_at,
                                  stop_properly_weights)
from opd.length.stats import (LengthStats, ReferenceLengths, StatsConfig, reference_lengths, repetitive_flags,
                              rollout_stats, tail_repeat_fraction)

__all__ = [
    "CONDITIONS", "MODES", "STOP_PROPERLY_MODES", "StatsConfig", "LengthStats", "rollout_stats",
    "ReferenceLengths", "reference_lengths", "tail_repeat_fraction", "repetitive_flags", "DetectorConfig",
    "LengthEvent", "LengthDetector", "overlong_penalty", "stop_properly_weights", "length_ratio_penalty",
    "rejection_badness", "adaptive_max_new_tokens", "PenaltyConfig", "RemedyConfig", "PenaltyPlan",
    "LengthConfig", "LengthMonitor", "apply_sequence_penalty", "loss_weights", "stop_properly_at", "ACTUATORS",
    "CONTROLS", "ControllerConfig", "LengthController", "pi_strengths", "switch_strengths",
]
