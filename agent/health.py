"""Device health for telemetry, read from /proc and /sys (no extra dependency).

CPU is the busy share since the previous sample; temperature is the hottest thermal zone, when
the kernel exposes one. Anything unreadable is left out rather than guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

__all__ = ["Health", "HealthSampler"]


class Health(Protocol):
    """What the agent reports health from: :class:`HealthSampler`, or a simulation's stand-in."""

    def sample(self) -> dict[str, float]: ...


def _cpu_times(root: Path) -> tuple[int, int] | None:
    try:
        fields = (root / "proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


class HealthSampler:
    """Call :meth:`sample` periodically; each call reports since the previous one."""

    def __init__(self, data_dir: Path, root: Path = Path("/")) -> None:
        self.data_dir = data_dir
        self.root = root
        self._last = _cpu_times(root)
        # thermal zones are fixed at boot: list them once, read them at each sample
        self._zones = sorted((root / "sys/class/thermal").glob("thermal_zone*/temp"))

    def sample(self) -> dict[str, float]:
        health: dict[str, float] = {}
        now = _cpu_times(self.root)
        if now and self._last and now[0] > self._last[0]:
            total, idle = now[0] - self._last[0], now[1] - self._last[1]
            health["cpu_percent"] = round(100.0 * (total - idle) / total, 1)
        self._last = now
        try:
            meminfo = {
                key: int(rest.split()[0])
                for key, _, rest in (
                    line.partition(":")
                    for line in (self.root / "proc/meminfo").read_text().splitlines()
                )
                if key in ("MemTotal", "MemAvailable")
            }
            health["memory_total_mb"] = round(meminfo["MemTotal"] / 1024, 1)
            health["memory_available_mb"] = round(meminfo["MemAvailable"] / 1024, 1)
        except (OSError, KeyError, ValueError, IndexError):
            pass
        try:
            rss_kb = next(
                int(line.split()[1])
                for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
            health["agent_rss_mb"] = round(rss_kb / 1024, 1)
        except (OSError, StopIteration, ValueError):
            pass
        try:
            fs = os.statvfs(self.data_dir)
            health["disk_free_mb"] = round(fs.f_bavail * fs.f_frsize / 2**20, 1)
            health["disk_total_mb"] = round(fs.f_blocks * fs.f_frsize / 2**20, 1)
        except OSError:
            pass
        temps = []
        for zone in self._zones:
            try:
                temps.append(int(zone.read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue
        if temps:
            health["temperature_c"] = max(temps)
        return health
