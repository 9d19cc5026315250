"""Import OpenVINO with Intel's usage telemetry switched off.

``import openvino`` and ``convert_model`` start OpenVINO's opt-out telemetry, which sends each
event from a background thread by forking a child process. A fork while the main thread is inside
a multi-threaded OpenBLAS call (numpy's ``@``/``tensordot``) deadlocks the parent: a loop of
matrix products right after ``import openvino`` hung in 5 of 6 runs on a 2-core machine, and 0 of
6 with telemetry off. Edge devices should not phone home either. OpenVINO skips telemetry when
``CI=true``, so :func:`telemetry_off` sets that variable around the import (and conversions) and
restores it afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["import_openvino", "telemetry_off"]


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """Set ``CI=true`` (OpenVINO's telemetry off switch) inside the block, then restore it."""
    previous = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = previous


def import_openvino() -> Any:
    """``import openvino`` with telemetry off; raises ImportError if it is not installed."""
    with telemetry_off():
        import openvino

    return openvino
