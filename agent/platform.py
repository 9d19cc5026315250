"""What the agent runs on: the hardware inventory, the runtime backends and how trials run.

A real device detects its platform (:meth:`DevicePlatform.detect`: scan the OS for accelerators,
use the installed runtimes, isolate every trial in a child process). The simulators inject one
instead: a hardware profile's inventory and simulated backends whose trials run in-process, so
thousands of virtual devices can share one process while running the rest of the agent as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.runtimes.inventory import Inventory, scan
from agent.runtimes.registry import BACKENDS

__all__ = ["DevicePlatform"]


@dataclass(frozen=True)
class DevicePlatform:
    inventory: Inventory
    backends: Mapping[str, str] = field(default_factory=lambda: dict(BACKENDS))
    isolate_trials: bool = True  # False only for trusted, simulated backends
    health_root: Path = Path("/")  # where /proc and /sys are read for health samples

    @classmethod
    def detect(cls) -> DevicePlatform:
        """This machine, as it is."""
        return cls(inventory=scan())
