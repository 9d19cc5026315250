"""Bounded, strict JSON parsing for input that arrives from outside.

``json.loads`` alone accepts duplicate keys (keeping the last), NaN and Infinity, any depth until
``RecursionError``, and any size. ``load_json`` refuses all of these, with a message that names
the document: the size before parsing, duplicates and constants while parsing, nesting from the
parsed value (runaway nesting is refused by CPython's C parser itself, as a ``RecursionError``,
without exhausting the C stack). A hostile document costs bounded memory and linear time.

>>> load_json(b'{"a": 1}', what="manifest.json", max_bytes=100)
{'a': 1}
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import ManifestError

__all__ = ["MAX_DEPTH", "json_kind", "load_json", "nesting_depth"]

MAX_DEPTH = 32
_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in words, for error messages: ``an object``, ``null``..."""
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def nesting_depth(value: Any) -> int:
    """The deepest nesting of lists and dicts in a parsed JSON value (iterative, no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in item if isinstance(child, (list, dict)))
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


def load_json(data: bytes, *, what: str, max_bytes: int, max_depth: int | None = MAX_DEPTH) -> Any:
    """Parse ``data`` as strict UTF-8 JSON within size and nesting limits.

    Args:
        data: the raw bytes.
        what: the document's name, used in every error message.
        max_bytes: refuse anything larger.
        max_depth: refuse deeper nesting of arrays and objects. ``None`` relies on the parser's
            own recursion limit only (for tensors, whose nesting is their rank).

    Raises:
        ManifestError: with ``check`` one of ``size``, ``nesting``, ``json``.
    """
    if len(data) > max_bytes:
        raise ManifestError(
            f"{what}: {len(data)} bytes exceeds the limit of {max_bytes} bytes", check="size"
        )
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_refuse_duplicates(what),
            parse_constant=_refuse_constant(what),
        )
    except RecursionError as e:  # CPython's parser refuses runaway nesting cleanly
        raise ManifestError(
            f"{what}: nesting depth exceeds the limit of {max_depth}", check="nesting"
        ) from e
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
    if max_depth is None:
        return value
    depth = nesting_depth(value)
    if depth > max_depth:
        raise ManifestError(
            f"{what}: nesting depth {depth} exceeds the limit of {max_depth}", check="nesting"
        )
    return value
