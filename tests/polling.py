"""Waiting for what a real process does (a broker, an agent, the fleet service, a browser):
poll until it holds, or fail the test saying what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, what: str, timeout: float, every: float = 0.1) -> T:
    """Call ``check`` every ``every`` seconds until it returns something true; return that.

    Raises:
        AssertionError: still false after ``timeout`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
