"""fleet.console.live.Recent: one computation shared by the callers that come while it is young."""

from __future__ import annotations

import threading

import pytest

from fleet.console.live import Recent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_result_is_shared_while_young_and_computed_again_after():
    clock, calls = Clock(), []
    recent: Recent[int] = Recent(0.2, clock=clock)

    def compute() -> int:
        calls.append(clock.now)
        return len(calls)

    assert recent.get(compute) == 1
    clock.now += 0.19
    assert recent.get(compute) == 1
    clock.now += 0.01  # 0.2 s after the computation started
    assert recent.get(compute) == 2
    assert calls == [100.0, 100.2]


def test_a_failed_computation_is_not_kept():
    recent: Recent[int] = Recent(10.0, clock=Clock())

    def fail() -> int:
        raise RuntimeError("database gone")

    with pytest.raises(RuntimeError):
        recent.get(fail)
    assert recent.get(lambda: 7) == 7


def test_callers_that_come_during_a_computation_wait_for_it_and_share_it():
    recent: Recent[int] = Recent(10.0)
    started, release, calls = threading.Event(), threading.Event(), []

    def slow() -> int:
        calls.append(1)
        started.set()
        release.wait(5)
        return 42

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(recent.get(slow)))
    first.start()
    assert started.wait(5)
    others = [threading.Thread(target=lambda: results.append(recent.get(slow))) for _ in range(3)]
    for thread in others:
        thread.start()
    release.set()
    for thread in [first, *others]:
        thread.join(5)
    assert results == [42] * 4
    assert calls == [1]
