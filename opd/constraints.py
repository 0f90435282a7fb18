"""Constraints declared on config fields, and the one validator that reads them.

A field says what it accepts where it is declared::

    temperature: float = knob(MISSING, gt(0))      # opd/config.py: the value comes from conf/
    k_on: int = knob(2, ge(1))                     # opd/length/detector.py: a default of its own

:func:`problems` walks a tree of such dataclasses and returns one message per value outside
its rule, naming the field by its dotted path and saying what is allowed
(``rollout.temperature must be > 0, got -1.0``), and one per attribute that is not a field
(Hydra lets ``+rollout.tempreture=0.5`` into a structured config); a field that maps names to
dataclasses (``teachers.<name>``) is walked like a nested one. Rules that relate fields
of one dataclass are its ``cross_checks(prefix)`` method, run once every field passes.

Standard library only, so that every module can declare its fields with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

RULE = "opd.rule"  # the metadata key of a field's rule


@dataclass(frozen=True)
class Rule:
    """What a field accepts: a predicate and the words that say it (``must be > 0``)."""

    ok: Callable[[Any], bool]  # False, or a TypeError / ValueError: the value breaks the rule
    text: str

    def holds(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):  # e.g. a value of the wrong type in a hand-built config
            return False


def knob(default: Any = dataclasses.MISSING, rule: Rule | None = None, *,
         factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a rule: ``x: float = knob(0.5, between(0, 1))``; ``factory``
    for a mutable default (``knob(rule=subset(...), factory=list)``)."""
    meta = {} if rule is None else {RULE: rule}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def gt(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"must be > {lo}")


def ge(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f"must be >= {lo}")


def lt(hi: float) -> Rule:
    return Rule(lambda v: v < hi, f"must be < {hi}")


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """lo <= v <= hi, either end open: ``must be in (0, 1]``."""
    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Rule(ok, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*allowed: Any) -> Rule:
    return Rule(lambda v: v in allowed, f"must be one of {[str(a) for a in allowed]}")


def subset(*allowed: Any) -> Rule:
    """A list whose every item is one of `allowed`."""
    return Rule(lambda v: all(x in allowed for x in v), f"must list only {list(allowed)}")


def optional(rule: Rule) -> Rule:
    """`rule`, or null."""
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.text} or null")


def problems(obj: Any, prefix: str = "") -> list[str]:
    """Every field of the dataclass tree `obj` outside its rule and every stray attribute;
    when there are none, the ``cross_checks`` of each dataclass in the tree. Keys are named
    from the root: ``prefix`` + the dotted path."""
    return _field_problems(obj, prefix) or _cross_problems(obj, prefix)


def require(obj: Any) -> None:
    """Raise ValueError listing `obj`'s problems (a component checking the config it gets)."""
    errs = problems(obj)
    if errs:
        raise ValueError(f"invalid {type(obj).__name__}: " + "; ".join(errs))


def _children(obj: Any):
    """(name, value) of the fields of `obj` that are dataclasses themselves, and of the
    dataclasses in a field that maps names to them (`teachers.<name>`)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield f.name, value
        elif isinstance(value, dict):
            yield from ((f"{f.name}.{k}", v) for k, v in value.items()
                        if dataclasses.is_dataclass(v) and not isinstance(v, type))


def _field_problems(obj: Any, prefix: str) -> list[str]:
    names = {f.name for f in dataclasses.fields(obj)}
    out = [f"{prefix}{k} is not a config key, got {v!r}" for k, v in vars(obj).items() if k not in names]
    for f in dataclasses.fields(obj):
        value, rule = getattr(obj, f.name), f.metadata.get(RULE)
        if rule is not None and not rule.holds(value):
            out.append(f"{prefix}{f.name} {rule.text}, got {value!r}")
    for name, child in _children(obj):
        out += _field_problems(child, f"{prefix}{name}.")
    return out


def _cross_problems(obj: Any, prefix: str) -> list[str]:
    out = [e for name, child in _children(obj) for e in _cross_problems(child, f"{prefix}{name}.")]
    check = getattr(obj, "cross_checks", None)
    return out + (list(check(prefix)) if check is not None else [])
