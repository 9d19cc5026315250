"""Remember runtime decisions, keyed by what could change them.

The key covers the bundle (its manifest digest), the installed runtime versions (read from
package metadata, without importing the runtimes), the hardware fingerprint and the objective.
Any change re-runs the probe. A cache file that cannot be read or parsed is ignored and replaced,
never trusted and never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from agent.runtimes.selection import Decision

__all__ = ["DecisionCache", "cache_key"]

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


def cache_key(
    *,
    bundle_digest: str,
    runtime_versions: dict[str, str | None],
    hardware_fingerprint: str,
    objective: str,
) -> str:
    """A short hex digest over everything a decision depends on."""
    material = json.dumps(
        {
            "v": CACHE_FORMAT,
            "bundle": bundle_digest,
            "runtimes": runtime_versions,
            "hardware": hardware_fingerprint,
            "objective": objective,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


class DecisionCache:
    """Decisions stored as ``<dir>/<key>.json``, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, key: str) -> Decision | None:
        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != CACHE_FORMAT or data.get("key") != key:
                raise ValueError("format or key does not match")
            return Decision.from_dict(data["decision"])
        except FileNotFoundError:
            return None
        except Exception as e:
            logger.warning("ignoring unreadable runtime decision cache %s: %s", path, e)
            return None

    def save(self, key: str, decision: Decision) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        data = {"format": CACHE_FORMAT, "key": key, "decision": decision.to_dict()}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path
