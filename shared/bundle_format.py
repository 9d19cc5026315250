"""The bundle format's names and limits, in one place for every reader of a bundle.

This module imports only :mod:`typing`, so the agent's daemon can use it without pydantic
(ADR 0008): :mod:`shared.manifest` and :mod:`shared.bundle` (the full schema, pydantic) and
:mod:`agent.installed` (what the daemon reads back of an installed manifest) all take these
values from here.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DTYPES",
    "FORMAT_MAJOR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_MAX_BYTES",
    "MANIFEST_NAME",
    "PRECISIONS",
    "Dtype",
    "Precision",
]

FORMAT_NAME = "edgefleet-bundle"
FORMAT_VERSION = "1.1"  # major.minor: a reader refuses a higher major, accepts any minor
FORMAT_MAJOR = FORMAT_VERSION.split(".", maxsplit=1)[0]
MANIFEST_NAME = "manifest.json"  # the bundle's first member, and its name in an installed version
MANIFEST_MAX_BYTES = 1 << 20
Dtype = Literal[  # a tensor's element type, as numpy names it
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
]
Precision = Literal["fp32", "fp16", "bf16", "int8", "mixed"]  # an artifact's numeric precision
DTYPES: tuple[str, ...] = get_args(Dtype)
PRECISIONS: tuple[str, ...] = get_args(Precision)
