"""Bounded, strict JSON parsing for input that arrives from outside.

``json.loads`` alone accepts duplicate keys (keeping the last), NaN and Infinity, any depth until
``RecursionError``, and any size. ``load_json`` refuses all of these *before* or while parsing,
with a message that names the document, so a hostile file costs bounded memory and time.

>>> load_json(b'{"a": 1}', what="manifest.json", max_bytes=100)
{'a': 1}
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import ManifestError

__all__ = ["MAX_DEPTH", "load_json", "nesting_depth"]

MAX_DEPTH = 32


def nesting_depth(data: bytes) -> int:
    """Return the deepest ``[``/``{`` nesting in a JSON text, ignoring brackets inside strings.

    A linear scan with no allocation, so it can run before ``json.loads`` on hostile input.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _refuse_duplicates(what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ManifestError(f"{what}: duplicate key {key!r}", check="json")
            result[key] = value
        return result

    return hook


def _refuse_constant(what: str) -> Any:
    def hook(name: str) -> Any:
        raise ManifestError(f"{what}: {name} is not valid JSON", check="json")

    return hook


def load_json(data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` as strict UTF-8 JSON within size and nesting limits.

    Args:
        data: the raw bytes.
        what: the document's name, used in every error message.
        max_bytes: refuse anything larger.
        max_depth: refuse deeper nesting of arrays and objects.

    Raises:
        ManifestError: with ``check`` one of ``size``, ``nesting``, ``json``.
    """
    if len(data) > max_bytes:
        raise ManifestError(
            f"{what}: {len(data)} bytes exceeds the limit of {max_bytes} bytes", check="size"
        )
    depth = nesting_depth(data)
    if depth > max_depth:
        raise ManifestError(
            f"{what}: nesting depth {depth} exceeds the limit of {max_depth}", check="nesting"
        )
    try:
        text = data.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_refuse_duplicates(what),
            parse_constant=_refuse_constant(what),
        )
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{what}: not UTF-8 ({e.reason} at byte {e.start})", check="json"
        ) from e
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{what}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})", check="json"
        ) from e
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise ManifestError(f"{what}: invalid JSON ({e})", check="json") from e
