"""LiteRT backend (``ai-edge-litert``), with ``tflite-runtime`` as a fallback import.

Candidates: the TFLite artifact on the CPU with 1, half and all cores (the interpreter defaults to
one thread), plus each external delegate found on the device (e.g. ``libedgetpu.so.1`` for a Coral
Edge TPU). LiteRT cannot list its accelerators, so delegates are found by looking for their
shared libraries, and a delegate that fails to load rejects only its candidate.
"""

from __future__ import annotations

import ctypes.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.runtimes.base import (
    ArtifactRef,
    Backend,
    Candidate,
    RuntimeLoadError,
    RuntimeStatus,
    thread_options,
)

if TYPE_CHECKING:
    from shared.manifest import Artifact

__all__ = ["LiteRtBackend"]

# Device name -> shared library of its external delegate.
DELEGATES = {"edgetpu": "libedgetpu.so.1"}


def _interpreter_module() -> Any:
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        from tflite_runtime import interpreter
    return interpreter


class _LiteRtModel:
    def __init__(self, interpreter: Any) -> None:
        self._interp = interpreter
        self._inputs = interpreter.get_input_details()
        self._outputs = interpreter.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._batch = 0

    def _resize(self, batch: int) -> None:
        if batch == self._batch:
            return
        for detail in self._inputs:
            self._interp.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        self._interp.allocate_tensors()
        self._batch = batch

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(feeds.values()))
        self._resize(int(first.shape[0]))
        for detail in self._inputs:
            self._interp.set_tensor(detail["index"], feeds[detail["name"]])
        self._interp.invoke()
        return {d["name"]: self._interp.get_tensor(d["index"]) for d in self._outputs}

    def close(self) -> None:
        self._interp = None


class LiteRtBackend(Backend):
    name = "litert"
    distributions = ("ai-edge-litert", "tflite-runtime")
    formats = frozenset({"tflite"})

    def status(self) -> RuntimeStatus:
        try:
            module = _interpreter_module()
        except ImportError as e:
            return RuntimeStatus(
                self.name,
                installed=False,
                reason=f"neither ai-edge-litert nor tflite-runtime ({e})",
            )
        package = module.__name__.split(".")[0]
        version = getattr(__import__(package), "__version__", None)
        devices = ["CPU"] + [
            d
            for d, lib in DELEGATES.items()
            if ctypes.util.find_library(lib.removeprefix("lib").split(".so")[0])
        ]
        return RuntimeStatus(
            self.name, installed=True, version=f"{package} {version}", devices=tuple(devices)
        )

    def candidates(
        self,
        artifact_index: int,
        artifact: Artifact,
        status: RuntimeStatus,
        *,
        cores: int,
        cpu_flags: frozenset[str],
    ) -> list[Candidate]:
        precision = "f32" if artifact.precision == "fp32" else artifact.precision
        found = [
            Candidate.make(
                runtime=self.name,
                device="CPU",
                artifact_index=artifact_index,
                artifact=artifact,
                settings={"threads": t},
                precision=precision,
            )
            for t in thread_options(cores)
        ]
        found += [
            Candidate.make(
                runtime=self.name,
                device=device,
                artifact_index=artifact_index,
                artifact=artifact,
                settings={"delegate": DELEGATES[device]},
                precision=precision,
            )
            for device in status.devices
            if device in DELEGATES
        ]
        return found

    def load(self, model_root: Path, artifact: ArtifactRef, candidate: Candidate) -> _LiteRtModel:
        module = _interpreter_module()
        options = candidate.options
        delegates = []
        try:
            if "delegate" in options:
                delegates.append(module.load_delegate(str(options["delegate"])))
            interpreter = module.Interpreter(
                model_path=str(model_root / artifact.files[0]),
                num_threads=int(options.get("threads", 1)),
                experimental_delegates=delegates or None,
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as e:
            raise RuntimeLoadError(
                f"litert could not load the model on {candidate.device}: {e}"
            ) from e
        return _LiteRtModel(interpreter)
