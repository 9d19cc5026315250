"""The agent's settings: one typed object, read once at start-up and passed down.

Sources, lowest to highest precedence: defaults, a TOML file (``--config``), environment
variables ``EDGEFLEET_AGENT_<FIELD>``, command-line flags. :func:`load_settings` merges them.
:class:`AgentSettings` is a frozen dataclass that checks every field on construction: the daemon
runs without pydantic, which would cost it several MB of resident memory for as long as it runs
(ADR 0008).

Values are converted only where text stands for a number or a path (environment variables,
flags): ``"16"`` for an integer field, ``"1.5"`` for a float, ``"data"`` for a path. Anything
else of the wrong type, out of range or unknown is refused with the field's name:

>>> AgentSettings(device_id="dev-1", broker="mqtt://b:1883", data_dir="d", trust="r.json",
...               window_chunks="16").window_chunks
16
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, get_args, get_origin, get_type_hints

from shared.errors import UsageError
from shared.topics import DEVICE_ID_PATTERN

__all__ = ["ENV_PREFIX", "AgentSettings", "load_settings"]

ENV_PREFIX = "EDGEFLEET_AGENT_"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def _bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    return {"ge": ge, "gt": gt, "le": le}


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Everything the agent daemon needs to know. Units are in the field names."""

    device_id: str  # DEVICE_ID_PATTERN
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT
    data_dir: Path
    trust: Path  # the trusted root.json
    hardware_id: str | None = None  # default: the inventory's hardware class
    # MQTT identity
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    mqtt_protocol: Literal[5, 311] = 5
    # transfer
    max_message_bytes: int = field(default=1 << 20, metadata=_bounds(ge=4096))
    window_chunks: int = field(default=8, metadata=_bounds(ge=1, le=256))
    request_timeout_s: float = field(default=10.0, metadata=_bounds(gt=0))
    min_bytes_per_s: float = field(default=1024.0, metadata=_bounds(ge=0))
    throughput_window_s: float = field(default=30.0, metadata=_bounds(gt=0))  # slow retrieval
    download_deadline_s: float = field(default=3600.0, metadata=_bounds(gt=0))
    # self-test and probation
    objective: Literal["latency", "p99", "throughput"] = "latency"
    latency_budget_ms: float | None = None  # refuse a model slower than this in self-test
    probation_s: float = field(default=30.0, metadata=_bounds(ge=0))
    max_crash_restarts: int = field(default=3, metadata=_bounds(ge=1))
    # inference server for local applications
    inference_broker: str | None = None  # default: the fleet broker
    telemetry_interval_s: float = field(default=30.0, metadata=_bounds(gt=0))
    outbox_max_records: int = field(default=10_000, metadata=_bounds(ge=10))

    def __post_init__(self) -> None:
        """Convert text where a number or a path is meant, then check every field.

        Raises:
            ValueError: the first field of the wrong type or out of range, by name.
        """
        hints = _hints()
        for f in fields(self):
            value = _convert(f.name, hints[f.name], getattr(self, f.name))
            _check_bounds(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        if not _DEVICE_ID.fullmatch(self.device_id):
            raise ValueError(f"device_id: must match {DEVICE_ID_PATTERN}, got {self.device_id!r}")
        for name in ("broker", "inference_broker"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("mqtt://", "mqtts://")):
                raise ValueError(f"{name}: must start with mqtt:// or mqtts://, got {url!r}")


@cache
def _hints() -> dict[str, Any]:
    return get_type_hints(AgentSettings)


def _convert(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's type (``hint``), or ValueError naming the field."""
    options = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    if value is None:
        if NoneType in options:
            return None
        raise ValueError(f"{name}: required, got None")
    (kind,) = (o for o in options if o is not NoneType)
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if isinstance(value, str) and value.isdigit() and all(isinstance(c, int) for c in choices):
            value = int(value)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
    description, convert = _CONVERTERS[kind]
    converted = convert(value)
    if converted is None:
        raise ValueError(f"{name}: expected {description}, got {value!r}")
    return converted


def _to_path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, str | os.PathLike) else None


def _to_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _to_int(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


_CONVERTERS: dict[Any, tuple[str, Any]] = {
    Path: ("a path", _to_path),
    str: ("text", _to_text),
    int: ("an integer", _to_int),
    float: ("a finite number", _to_float),
}


def _check_bounds(name: str, value: Any, bounds: Any) -> None:
    if value is None:
        return
    if bounds.get("ge") is not None and value < bounds["ge"]:
        raise ValueError(f"{name}: must be >= {bounds['ge']}, got {value}")
    if bounds.get("gt") is not None and value <= bounds["gt"]:
        raise ValueError(f"{name}: must be > {bounds['gt']}, got {value}")
    if bounds.get("le") is not None and value > bounds["le"]:
        raise ValueError(f"{name}: must be <= {bounds['le']}, got {value}")


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> AgentSettings:
    """Merge the TOML file, the environment and command-line ``overrides`` (None = unset).

    Raises:
        UsageError: the file cannot be read, names an unknown setting, or a value is invalid.
    """
    known = {f.name for f in fields(AgentSettings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text()).get("agent", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{config_file}: cannot read the agent configuration ({e})") from e
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{config_file}: unknown agent settings {unknown}")
    for key, value in os.environ.items():  # the environment overrides the file...
        name = key[len(ENV_PREFIX) :].lower()
        if key.upper().startswith(ENV_PREFIX) and name in known:
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})  # ...and flags both
    missing = [
        f.name
        for f in fields(AgentSettings)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values
    ]
    if missing:
        raise UsageError(f"agent settings: {', '.join(missing)} must be set")
    try:
        return AgentSettings(**values)
    except ValueError as e:
        raise UsageError(f"agent settings: {e}") from e
