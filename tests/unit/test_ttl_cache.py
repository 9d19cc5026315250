"""``TtlCache``: remembered for ``ttl_s`` seconds, forgotten at once, and a read that raced with
a ``forget`` or ``clear`` is not stored."""

from __future__ import annotations

import pytest

from fleet.ttl_cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_value_is_remembered_for_ttl_seconds_only():
    clock = Clock()
    cache = TtlCache[str, object](5.0, clock=clock)
    value = object()
    assert cache.get("k") is None
    cache.put("k", value, generation=cache.generation)
    assert cache.get("k") is value
    assert cache.get("other") is None
    clock.now += 5.0
    assert cache.get("k") is value
    clock.now += 0.001
    assert cache.get("k") is None


def test_forget_and_clear_take_effect_at_once():
    cache = TtlCache[str, int](5.0, clock=Clock())
    for key in ("a", "b", "c"):
        cache.put(key, 1, generation=cache.generation)
    cache.forget("a")
    assert (cache.get("a"), cache.get("b")) == (None, 1)
    cache.clear()
    assert (cache.get("b"), cache.get("c")) == (None, None)


@pytest.mark.parametrize("change", ["forget", "clear"])
def test_a_read_that_raced_with_a_change_is_not_stored(change):
    cache = TtlCache[str, str](5.0, clock=Clock())
    generation = cache.generation  # a reader starts reading the source...
    getattr(cache, change)(*(["k"] if change == "forget" else []))  # ...which changes meanwhile
    cache.put("k", "read before the change", generation=generation)
    assert cache.get("k") is None
    cache.put("k", "read after", generation=cache.generation)
    assert cache.get("k") == "read after"


def test_the_oldest_values_go_first_and_zero_ttl_remembers_nothing():
    clock = Clock()
    cache = TtlCache[int, int](5.0, max_entries=2, clock=clock)
    for key in (1, 2, 3):
        clock.now += 1
        cache.put(key, key, generation=cache.generation)
    assert [cache.get(k) for k in (1, 2, 3)] == [None, 2, 3]
    cache.put(2, 20, generation=cache.generation)  # stored again: now the newest
    cache.put(4, 4, generation=cache.generation)
    assert [cache.get(k) for k in (2, 3, 4)] == [20, None, 4]
    disabled = TtlCache[int, int](0.0)
    disabled.put(1, 1, generation=disabled.generation)
    assert disabled.get(1) is None
    with pytest.raises(ValueError, match="max_entries must be at least 1, got 0"):
        TtlCache[int, int](1.0, max_entries=0)
