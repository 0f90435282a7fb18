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

The package, one module per part (each importable alone, all re-exported here):

    stats.py      LengthStats, rollout_stats, repetition flags, reference lengths
    detector.py   DetectorConfig, LengthDetector, LengthEvent (hysteresis)
    penalties.py  the penalty functions, PenaltyConfig, PenaltyPlan
    monitor.py    LengthMonitor: the three together, once per batch

Conventions: a rollout's length is its number of completion tokens, EOS included when it
was generated. ``finish_reasons`` are vLLM's: 'stop' (EOS or a stop string) or 'length'
(cut at ``max_new_tokens``). Pure package: numpy, the standard library and ``opd.types``
only; plain values in, plain values and dataclasses out; every ``state_dict`` is
JSON-serialisable.
"""
from opd.length.detector import (CONDITIONS, DetectorConfig, LengthDetector, LengthEvent,
                                 hysteresis_errors)
from opd.length.monitor import LengthMonitor
from opd.length.penalties import (PenaltyConfig, PenaltyPlan, adaptive_max_new_tokens,
                                  apply_sequence_penalty, length_ratio_penalty, loss_weights,
                                  overlong_penalty, rejection_badness, stop_properly_weights)
from opd.length.stats import (LengthStats, ReferenceLengths, reference_lengths, repetitive_flags,
                              rollout_stats, tail_repeat_fraction)

__all__ = [
    "CONDITIONS", "LengthStats", "rollout_stats", "ReferenceLengths", "reference_lengths",
    "tail_repeat_fraction", "repetitive_flags", "DetectorConfig", "hysteresis_errors", "LengthEvent",
    "LengthDetector", "overlong_penalty", "stop_properly_weights", "length_ratio_penalty",
    "rejection_badness", "adaptive_max_new_tokens", "PenaltyConfig", "PenaltyPlan",
    "LengthMonitor", "apply_sequence_penalty", "loss_weights",
]
