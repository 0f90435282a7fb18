"""The length detector: a hysteresis state machine over :class:`LengthStats`.

Four conditions (inflation, short collapse, repetition, EOS collapse), each switched on
after ``k_on`` consecutive batches past its on-threshold and off after ``k_off`` batches
back past its off-threshold; every switch is a :class:`LengthEvent` with its reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from opd.constraints import between, ge, gt, knob, require
from opd.length.stats import LengthStats

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
    """Thresholds of :class:`LengthDetector` (``length.detector.*``; all conditions share
    ``k_on`` / ``k_off``).

    A condition turns on after ``k_on`` consecutive hit steps and off after ``k_off``
    consecutive clear steps (see ``_RULES``); ratios are ``mean / reference_mean`` and
    their rules are skipped when no reference is known. Each off-threshold lies on the
    healthy side of its on-threshold, which gives the hysteresis band (``cross_checks``).
    """

    ema_decay: float = knob(0.9, between(0, 1, hi_open=True))  # ema <- decay * ema + (1 - decay)
    #                                                             * value (logged baselines)
    k_on: int = knob(2, ge(1))  # consecutive hit steps to switch a condition on
    k_off: int = knob(2, ge(1))  # consecutive clear steps to switch it off
    trunc_on: float = knob(0.2, between(0, 1))  # inflation: truncated_frac > trunc_on ...
    trunc_off: float = knob(0.1, between(0, 1))
    ratio_on: float = knob(1.5, gt(0))  # ... or length_ratio > ratio_on
    ratio_off: float = knob(1.2, gt(0))
    short_on: float = knob(0.3, between(0, 1))  # short collapse: short_frac > short_on ...
    short_off: float = knob(0.15, between(0, 1))
    short_ratio_on: float = knob(0.5, gt(0))  # ... or length_ratio < short_ratio_on
    short_ratio_off: float = knob(0.7, gt(0))
    rep_on: float = knob(0.2, between(0, 1))  # repetition: repetition_frac > rep_on
    rep_off: float = knob(0.1, between(0, 1))
    eos_on: float = knob(0.5, between(0, 1))  # EOS collapse: eos_frac < eos_on (0 and 0: never,
    eos_off: float = knob(0.7, between(0, 1))  # e.g. when answers legitimately end on stop strings)

    def cross_checks(self, prefix: str = "") -> list[str]:
        """Each off-threshold on the healthy side of its on-threshold (the hysteresis band);
        one message per pair that is not, keys named with ``prefix``."""
        errors = []
        for rules in _RULES.values():
            for _, op, on_key, off_key in rules:
                lo, hi = (off_key, on_key) if op == ">" else (on_key, off_key)
                if getattr(self, lo) > getattr(self, hi):
                    errors.append(f"{prefix}{lo} must be <= {prefix}{hi} ({getattr(self, hi)}), "
                                  f"got {getattr(self, lo)}")
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
        require(self.config)
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
        """Count this batch toward switching `name` (hits while off, clears while on); an
        event when the count reaches k_on / k_off."""
        st, cfg = self._conds[name], self.config
        hits, clears, all_clear = _evaluate(stats, cfg, _RULES[name])
        if st.on:
            st.clears = st.clears + 1 if all_clear else 0
            run, needed, why = st.clears, cfg.k_off, " and ".join(clears)
        else:
            st.hits = st.hits + 1 if hits else 0
            run, needed, why = st.hits, cfg.k_on, " or ".join(hits)
        if run < needed:
            return None
        st.on, st.hits, st.clears, st.since = not st.on, 0, 0, step
        ema = ", ".join(f"{k}={v:.3g}" for k, v in self.ema.items())
        return LengthEvent(step, name, "on" if st.on else "off", f"{why} for {needed} steps (ema {ema})")

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
