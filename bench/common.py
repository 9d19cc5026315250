"""What every benchmark reports about the machine, and small helpers they share."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from agent.runtimes.inventory import scan_cpu

__all__ = ["free_port", "machine_info"]


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model and cores (from the agent's own inventory), Python, OS, plus ``extra``."""
    cpu = scan_cpu()
    return {
        "cpu": cpu.model,
        "cores": os.cpu_count(),
        "usable_cores": cpu.cores,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        **extra,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
