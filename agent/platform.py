"""What the agent runs on: the hardware inventory, the runtime backends and how trials run.

A real device detects its platform (:meth:`DevicePlatform.detect`: scan the OS for accelerators,
use the installed runtimes, isolate every trial and every deployment in a child process). The
simulators inject one instead: a hardware profile's inventory and simulated backends whose trials
and deployments run in-process, so thousands of virtual devices can share one process while
running the rest of the agent as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.runtimes.inventory import Inventory, scan
from agent.runtimes.registry import BACKENDS
from agent.runtimes.trial import TrialSettings

__all__ = ["DevicePlatform"]


@dataclass(frozen=True)
class DevicePlatform:
    inventory: Inventory
    backends: Mapping[str, str] = field(default_factory=lambda: dict(BACKENDS))
    isolate_trials: bool = True  # False only for trusted, simulated backends
    trial_settings: TrialSettings | None = None  # how hard to time each candidate (None: default)
    health_root: Path = Path("/")  # where /proc and /sys are read for health samples
    # Run each deployment in a child process (agent.isolation) so that the idle daemon never
    # holds the memory of the trust stack, the download and the self-test. Only a real device
    # (detect) does: an injected platform's deployments run on the agent's worker thread.
    isolate_deployments: bool = False

    @classmethod
    def detect(cls) -> DevicePlatform:
        """This machine, as it is."""
        return cls(inventory=scan(), isolate_deployments=True)
