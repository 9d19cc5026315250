"""The runtime backends edgefleet knows, by name. Importing this imports no runtime library.

Backends are named by import path (``module:Class``) so that a trial child process can load one
by itself; tests and simulators pass their own paths the same way. A path may carry keyword
arguments for the class as a query string: ``simulators.hardware:SimulatedBackend?profile=npu``.
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl

from agent.runtimes.base import Backend

__all__ = ["BACKENDS", "load_backend"]

BACKENDS: dict[str, str] = {
    "onnxruntime": "agent.runtimes.onnx:OnnxRuntimeBackend",
    "openvino": "agent.runtimes.openvino:OpenVinoBackend",
    "litert": "agent.runtimes.litert:LiteRtBackend",
}


def load_backend(path: str) -> Backend:
    """Instantiate the backend at ``path`` (``package.module:Class[?key=value&...]``)."""
    location, _, query = path.partition("?")
    module_name, _, class_name = location.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(**dict(parse_qsl(query, strict_parsing=bool(query))))
    return backend
