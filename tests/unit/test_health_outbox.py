"""Device health from a fake /proc and /sys, the bounded store-and-forward outbox, and the
latency percentiles telemetry reports."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.daemon import percentiles
from agent.health import HealthSampler
from agent.outbox import Outbox


def fake_root(tmp_path: Path, busy: int, idle: int) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\n")
    (root / "proc/meminfo").write_text("MemTotal: 2048000 kB\nMemAvailable: 1024000 kB\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "temp").write_text("61500\n")
    return root


def test_health_reports_cpu_memory_disk_and_temperature(tmp_path):
    sampler = HealthSampler(tmp_path, root=fake_root(tmp_path, busy=100, idle=900))
    fake_root(tmp_path, busy=400, idle=1600)  # 300 busy of 1000 ticks since the first read
    health = sampler.sample()
    assert health["cpu_percent"] == 30.0
    assert health["memory_total_mb"] == 2000.0
    assert health["memory_available_mb"] == 1000.0
    assert health["temperature_c"] == 61.5
    assert health["disk_total_mb"] > 0


def test_outbox_keeps_everything_until_sent_and_counts_what_it_drops(tmp_path):
    box = Outbox(tmp_path / "outbox", max_records=3)
    for i in range(5):
        box.put("t", f"r{i}".encode())
    assert len(box) == 3
    assert box.dropped == 2
    sent: list[bytes] = []
    assert box.drain(lambda topic, data: False) == 0  # offline: nothing lost
    reopened = Outbox(tmp_path / "outbox", max_records=3)  # a restart keeps the journal
    assert reopened.dropped == 2
    assert reopened.drain(lambda topic, data: sent.append(data) or True) == 3
    assert sent == [b"r2", b"r3", b"r4"]
    assert len(reopened) == 0


def test_outbox_removes_temp_files_left_by_a_crash(tmp_path):
    directory = tmp_path / "outbox"
    directory.mkdir()
    (directory / ".tmp-000000000007.json").write_bytes(b'{"topic": "t", "pay')  # torn write
    box = Outbox(directory)
    assert not list(directory.glob(".tmp-*"))
    assert len(box) == 0


def test_outbox_drops_and_counts_a_damaged_record_and_sends_the_rest(tmp_path):
    box = Outbox(tmp_path / "outbox")
    for i in range(3):
        box.put("t", f"r{i}".encode())
    damaged = sorted((tmp_path / "outbox").glob("*.json"))[1]
    damaged.write_bytes(b'["not", "a record"]')
    sent: list[bytes] = []
    assert box.drain(lambda topic, data: sent.append(data) or True) == 2
    assert sent == [b"r0", b"r2"]
    assert box.dropped == 1
    assert len(box) == 0
    assert not list((tmp_path / "outbox").glob("*.json"))


def test_outbox_offer_sends_at_once_when_nothing_waits_and_journals_when_unacknowledged(tmp_path):
    box = Outbox(tmp_path / "outbox")
    sent: list[bytes] = []
    assert box.offer("t", b"online", lambda topic, data: sent.append(data) or True)
    assert sent == [b"online"]
    assert len(box) == 0
    assert not list((tmp_path / "outbox").glob("*.json"))  # nothing was written to disk
    # Unacknowledged (offline, or the broker did not answer): the record is journalled...
    assert not box.offer("t", b"offline", lambda topic, data: False)
    assert len(box) == 1
    # ...and a later offer queues behind it, so the broker sees them in order.
    assert not box.offer("t", b"back", lambda topic, data: sent.append(data) or True)
    assert sent == [b"online", b"offline", b"back"]
    assert len(box) == 0


@given(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.lists(st.floats(0, 100), min_size=1, max_size=5),
)
def test_latency_percentiles_are_numpys_linear_percentiles(values, qs):
    expected = np.percentile(np.array(values), qs)
    assert percentiles(deque(values), qs) == pytest.approx(list(expected), rel=1e-9, abs=1e-9)
