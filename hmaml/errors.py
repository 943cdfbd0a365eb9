"""The one exception type that command-line tools turn into a one-line message."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")


class HmamlError(Exception):
    """Bad input a user can fix: the message names the file, key or value at fault.

    The launch scripts catch it, print ``error: <message>`` on one line and exit with status 2,
    so a user never has to read a traceback to learn what to change. A subclass for a failure
    that is not the input's (a lost rank) sets another ``exit_status``.
    """

    exit_status = 2


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type when the message is empty), cut to
    ``limit`` characters: what a one-line report of someone else's exception quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def one_line_errors(main: Callable[P, int | None]) -> Callable[P, int]:
    """Wrap a command's ``main``: a :class:`HmamlError` becomes ``error: <message>`` on stderr
    and its ``exit_status`` (2: bad input); otherwise the status is what ``main`` returned
    (None: 0)."""

    @functools.wraps(main)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except HmamlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_status

    return wrapped
