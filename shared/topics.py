"""The protocol's topics, device ids and payload bound, without its payload models.

:mod:`shared.protocol` re-exports everything here and adds the pydantic models of the payloads.
This module imports neither pydantic nor anything else heavy, so that the agent daemon, which
parses its few messages without pydantic (:mod:`agent.messages`), can build and check topics
with the same code as the fleet.

>>> device_topic("dev-001", UP_STATE)
'edgefleet/v1/devices/dev-001/up/state'
>>> parse_device_topic("edgefleet/v1/devices/dev-001/up/state")
('dev-001', 'up/state')
"""

from __future__ import annotations

import re
from typing import Literal

from shared.errors import ManifestError

__all__ = [
    "DEVICE_ID_PATTERN",
    "DOWN_CMD",
    "DOWN_FETCH",
    "INFER_REQUEST",
    "INFER_RESPONSE",
    "MAX_JSON_PAYLOAD",
    "PREFIX",
    "UP_EVENTS",
    "UP_FETCH",
    "UP_PRESENCE",
    "UP_STATE",
    "UP_TELEMETRY",
    "CommandType",
    "Phase",
    "ProtocolError",
    "device_topic",
    "parse_device_topic",
]

PREFIX = "edgefleet/v1/devices"
UP_PRESENCE = "up/presence"
UP_STATE = "up/state"
UP_EVENTS = "up/events"
UP_TELEMETRY = "up/telemetry"
UP_FETCH = "up/fetch"
DOWN_CMD = "down/cmd"
DOWN_FETCH = "down/fetch"
INFER_REQUEST = "infer/request"
INFER_RESPONSE = "infer/response"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
MAX_JSON_PAYLOAD = 256 * 1024  # a control message; bulk data travels in frames

CommandType = Literal["check", "deploy", "revert", "report"]  # what a down/cmd asks
Phase = Literal[  # the steps of a deployment that an up/events report names
    "received",
    "downloading",
    "downloaded",
    "verified",
    "installed",
    "self_test",
    "activated",
    "committed",
    "failed",
    "rolled_back",
]


class ProtocolError(ManifestError):
    """A message from the network is malformed: wrong topic, shape, size or frame."""

    default_check = "protocol"


def device_topic(device_id: str, suffix: str) -> str:
    """The full topic of ``suffix`` (e.g. :data:`UP_STATE`) for ``device_id``."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(f"device id {device_id[:80]!r} must match {DEVICE_ID_PATTERN}")
    return f"{PREFIX}/{device_id}/{suffix}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """Split a device topic into (device id, suffix). Raises :class:`ProtocolError`."""
    head = PREFIX + "/"
    if not topic.startswith(head):
        raise ProtocolError(f"topic {topic[:120]!r} is not under {PREFIX}/")
    device_id, _, suffix = topic[len(head) :].partition("/")
    if not _DEVICE_ID.fullmatch(device_id) or not suffix:
        raise ProtocolError(f"topic {topic[:120]!r} has no valid device id and suffix")
    return device_id, suffix
