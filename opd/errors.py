"""Errors a user can fix, and how the entry points report them.

Every error opd anticipates (a bad config value or path, a bad prompt-file line, a
mismatched tokenizer, an unreachable teacher server, a failed check) derives from
`UserError`. The entry points (`opd-train`, `opd-check`, `opd-prepare`, `opd-eval`) print its
message alone, without a traceback, and exit with status 2; anything else keeps its
traceback.

    @exit_on_user_error("opd-train")
    def main() -> None: ...
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

USER_ERROR_STATUS = 2


class UserError(Exception):
    """An error whose message says what the user can change (a key, a file and line, a URL)."""


class ConfigError(UserError, ValueError):
    """A config value outside its allowed range; the message names the key."""


def user_error(e: BaseException) -> UserError | None:
    """The UserError behind `e`: `e` itself, or what a Ray task raised (Ray's error keeps it
    as `cause`), or None when `e` is not one."""
    for err in (getattr(e, "cause", None), e):
        if isinstance(err, UserError):
            return err
    return None


def exit_on_user_error(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated entry point; a UserError prints `<prog>: <message>` to stderr and
    exits with status 2."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - only a UserError is caught, the rest re-raised
                err = user_error(e)
                if err is None:
                    raise
                print(f"{prog}: {err}", file=sys.stderr, flush=True)
                sys.exit(USER_ERROR_STATUS)

        return run

    return wrap
