"""Length statistics of one rollout batch: lengths, truncation, EOS, short answers, loops.

``rollout_stats`` turns a batch's token ids and finish reasons into :class:`LengthStats`,
including each rollout's repetition flag (``LengthStats.repetitive``), computed here once
per batch for every later user (the detector, SMPO's rejected choice, the remedies).
``reference_lengths`` gives the teacher's lengths the ratio rules compare against.
:class:`StatsConfig` says what counts as short and as a loop (``length.stats.*``), for the
monitor, the loop's off-policy steps and the held-out evaluation alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Collection, Optional, Sequence

import numpy as np

from opd.constraints import between, ge, knob, require
from opd.types import FinishReason

FINISH_REASONS = tuple(r.value for r in FinishReason)


@dataclass
class StatsConfig:
    """What the length statistics count as short and as looping (``length.stats.*``)."""

    min_length: int = knob(2, ge(0))  # completions shorter than this count as short
    ngram: int = knob(3, ge(1))  # n of the repetition detector's n-grams
    tail_window: int = knob(32, ge(2))  # tokens at the end of a rollout checked for a loop
    #                                     (also the looping tail the loop-tail rule covers)
    repeat_threshold: float = knob(0.5, between(0, 1, lo_open=True))  # a tail loops when this
    #                                  share of its n-grams repeats (tail_repeat_fraction)

    def cross_checks(self, prefix: str = "") -> list[str]:
        """A loop needs room to occur twice in the tail."""
        if self.tail_window < 2 * self.ngram:
            return [f"{prefix}tail_window must be >= 2 * {prefix}ngram ({2 * self.ngram}), "
                    f"got {self.tail_window}"]
        return []


def _ngrams(tokens: list, n: int) -> list:
    return list(zip(*(tokens[i:] for i in range(n))))


def tail_repeat_fraction(tokens: Sequence[int], ngram: int = StatsConfig.ngram,
                         tail_window: int = StatsConfig.tail_window) -> float:
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


def repetitive_flags(token_ids: Sequence[Sequence[int]], stats: Optional[StatsConfig] = None) -> list[bool]:
    """Per rollout: ``tail_repeat_fraction(tokens, ngram, tail_window) >= repeat_threshold``."""
    c = stats or StatsConfig()
    require(c)
    return [tail_repeat_fraction(np.asarray(t).tolist(), c.ngram, c.tail_window) >= c.repeat_threshold
            for t in token_ids]


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
                  eos_ids: Collection[int], max_new_tokens: int, stats: Optional[StatsConfig] = None,
                  reference_mean: Optional[float] = None) -> LengthStats:
    """Statistics of one batch under ``stats`` (default StatsConfig()); see
    :class:`LengthStats` for each field.

    repeated_ngram_rate = sum_i (|G_i| - |distinct(G_i)|) / sum_i |G_i| over the n-grams G_i
    of each whole rollout i (0.0 when no rollout is ``ngram`` tokens long).
    Raises ValueError on an empty batch, mismatched sizes, an unknown finish reason or a
    rollout longer than ``max_new_tokens`` (the caller passed the wrong cap).
    """
    seqs = [np.asarray(t).tolist() for t in token_ids]
    n = len(seqs)
    check_batch(n, finish_reasons)
    c = stats or StatsConfig()
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if lengths.max() > max_new_tokens:
        raise ValueError(f"a rollout has {lengths.max()} tokens > max_new_tokens={max_new_tokens}")
    grams = [_ngrams(s, c.ngram) for s in seqs]
    total = sum(len(g) for g in grams)
    repeated = sum(len(g) - len(set(g)) for g in grams)
    eos = set(int(e) for e in eos_ids)
    mean = float(lengths.mean())
    flags = repetitive_flags(seqs, c)
    return LengthStats(
        n=n, mean=mean, median=float(np.median(lengths)),
        p95=float(np.percentile(lengths, 95)), min=int(lengths.min()), max=int(lengths.max()),
        truncated_frac=sum(r == "length" for r in finish_reasons) / n,
        eos_frac=sum(bool(s) and s[-1] in eos for s in seqs) / n,
        short_frac=float((lengths < c.min_length).mean()),
        repetition_frac=float(np.mean(flags)), repetitive=tuple(flags),
        repeated_ngram_rate=repeated / total if total else 0.0,
        length_ratio=None if reference_mean is None else mean / float(reference_mean),
        max_new_tokens=int(max_new_tokens))


def check_batch(n: int, finish_reasons: Sequence[str]) -> None:
    """Refuse an empty batch, a count of finish reasons other than ``n``, or an unknown reason."""
    if n == 0:
        raise ValueError("empty rollout batch")
    if len(finish_reasons) != n:
        raise ValueError(f"{n} rollouts but {len(finish_reasons)} finish_reasons")
    bad = set(finish_reasons) - set(FINISH_REASONS)
    if bad:
        raise ValueError(f"finish_reasons must be in {FINISH_REASONS}, got {sorted(bad)}")


@dataclass(frozen=True)
class ReferenceLengths:
    """The teacher's reference: mean and p95 (np.percentile, linear) length in tokens, and
    the share of its completions truncated, ending in EOS and looping (what the length
    controller tracks; 0, 1 and 0 for answers that are never cut, e.g. a dataset's). These
    come from completions sampled like the student's rollouts; ``greedy_*`` are the same
    rates of the teacher's greedy completions, which the greedy probe is compared with
    (None: the sampled rates stand in)."""

    mean: float
    p95: float
    truncated_frac: float = 0.0
    eos_frac: float = 1.0
    repetition_frac: float = 0.0
    greedy_truncated_frac: Optional[float] = None
    greedy_repetition_frac: Optional[float] = None

    def with_greedy(self, greedy: "ReferenceLengths") -> "ReferenceLengths":
        """This reference with the greedy rates of ``greedy`` (the teacher's greedy completions)."""
        return replace(self, greedy_truncated_frac=greedy.truncated_frac,
                       greedy_repetition_frac=greedy.repetition_frac)

    def greedy_rates(self) -> tuple[float, float]:
        """(truncation, repetition) the greedy probe is compared with."""
        t, r = self.greedy_truncated_frac, self.greedy_repetition_frac
        return (self.truncated_frac if t is None else t), (self.repetition_frac if r is None else r)


def reference_lengths(token_ids_or_lengths: Sequence, finish_reasons: Optional[Sequence[str]] = None,
                      eos_ids: Optional[Collection[int]] = None,
                      stats: Optional[StatsConfig] = None) -> ReferenceLengths:
    """Reference lengths from teacher generations (token lists) or from plain lengths (ints),
    e.g. the teacher's answers on a sample of prompts at start, or a dataset's answers
    tokenised with the student's tokenizer. Count EOS the same way as the rollouts do.

    With token lists, ``finish_reasons`` give the truncation rate, ``eos_ids`` the EOS rate
    (else 1 - truncation) and ``stats`` the repetition rate (else 0)."""
    items = list(token_ids_or_lengths)
    if not items:
        raise ValueError("reference_lengths needs at least one item")
    is_len = [isinstance(x, (int, float, np.integer, np.floating)) for x in items]
    lengths = np.array([x if flag else len(x) for x, flag in zip(items, is_len)], dtype=np.float64)
    if lengths.mean() <= 0:
        raise ValueError("reference lengths must have a positive mean")
    trunc = 0.0
    if finish_reasons is not None:
        check_batch(len(items), finish_reasons)
        trunc = float(np.mean([r == "length" for r in finish_reasons]))
    seqs = [] if any(is_len) else [np.asarray(x).tolist() for x in items]
    eos = set(int(e) for e in eos_ids or ())
    return ReferenceLengths(
        mean=float(lengths.mean()), p95=float(np.percentile(lengths, 95)), truncated_frac=trunc,
        eos_frac=float(np.mean([bool(s) and s[-1] in eos for s in seqs])) if eos and seqs else 1.0 - trunc,
        repetition_frac=float(np.mean(repetitive_flags(seqs, stats))) if stats and seqs else 0.0)
