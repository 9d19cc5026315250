"""The device's local state as ``edgefleet agent status`` shows it, read from the data directory.

Reads only: it never recovers or changes anything, so it is safe while the agent runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.store import ModelStore
from shared.errors import UsageError

__all__ = ["read_status"]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(data_dir: Path) -> dict[str, Any]:
    """``device_id`` and, per model, the active, previous, failed and in-progress versions.

    Raises:
        UsageError: ``data_dir`` is not an agent data directory.
    """
    if not (data_dir / "models").is_dir():
        raise UsageError(f"{data_dir}: not an agent data directory (no models/ in it)")
    store = ModelStore(data_dir)
    identity = _json(data_dir / "identity.json")
    probation = _json(data_dir / "probation.json")
    runtimes = _json(data_dir / "runtime.json")
    models: dict[str, dict[str, Any]] = {}
    for name in store.models():
        current = store.current(name)
        staging = data_dir / "staging" / name
        models[name] = {
            "version": current,
            "runtime": runtimes.get(name) if current else None,
            "previous_version": store.previous(name),
            "rollback_floor": store.floor(name),
            "failed_versions": store.state.failed.get(name, []),
            "downloading": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
            "probation": probation.get("version") if probation.get("model") == name else None,
        }
    return {
        "device_id": identity.get("device_id"),
        "hardware_class": identity.get("hardware_class"),
        "models": models,
    }
