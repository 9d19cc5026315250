"""OpenVINO backend: CPU, GPU and NPU; precision (f32, f16, bf16) and LATENCY/THROUGHPUT hints.

OpenVINO reads both its own IR and ONNX, so both artifacts are candidates. The compute precision
is set explicitly with ``INFERENCE_PRECISION_HINT``: OpenVINO's default on CPUs with bf16 support
is bf16, which is fast but changes outputs, so it must be measured against the accuracy budget
like any other candidate rather than taken silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.runtimes.base import ArtifactRef, Backend, Candidate, RuntimeLoadError, RuntimeStatus
from shared.openvino_quiet import import_openvino

if TYPE_CHECKING:
    from shared.manifest import Artifact

__all__ = ["OpenVinoBackend"]

_PRECISION_CAPS = {"bf16": "BF16", "f16": "FP16"}


class _OvModel:
    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.output_names = [port.get_any_name() for port in compiled.outputs]
        self._outputs = list(compiled.outputs)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer(dict(feeds))
        return {
            name: np.asarray(results[port])
            for name, port in zip(self.output_names, self._outputs, strict=True)
        }

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVinoBackend(Backend):
    name = "openvino"
    distributions = ("openvino",)
    formats = frozenset({"openvino", "onnx"})

    def status(self) -> RuntimeStatus:
        try:
            ov = import_openvino()
        except ImportError as e:
            return RuntimeStatus(self.name, installed=False, reason=f"not installed ({e})")
        core = ov.Core()
        devices = tuple(core.available_devices)
        capabilities = []
        for device in devices:
            try:
                caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
                capabilities.append((device, tuple(str(c) for c in caps)))
            except RuntimeError:
                capabilities.append((device, ()))
        return RuntimeStatus(
            self.name,
            installed=True,
            version=ov.get_version(),
            devices=devices,
            capabilities=tuple(capabilities),
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
        found = []
        for device in status.devices:
            caps = status.device_capabilities(device)
            precisions = ["f32"] + [p for p, cap in _PRECISION_CAPS.items() if cap in caps]
            if device.startswith("NPU"):
                precisions = ["f16"]  # NPUs compute in f16 whatever is asked
            for precision in precisions:
                for hint in ("LATENCY", "THROUGHPUT"):
                    found.append(
                        Candidate.make(
                            runtime=self.name,
                            device=device,
                            artifact_index=artifact_index,
                            artifact=artifact,
                            settings={"precision": precision, "hint": hint},
                            precision=precision,
                        )
                    )
        return found

    def load(self, model_root: Path, artifact: ArtifactRef, candidate: Candidate) -> _OvModel:
        ov = import_openvino()

        options = candidate.options
        config = {
            "PERFORMANCE_HINT": str(options.get("hint", "LATENCY")),
            "INFERENCE_PRECISION_HINT": str(options.get("precision", "f32")),
        }
        if candidate.device.startswith("NPU"):
            config.pop("INFERENCE_PRECISION_HINT")
        try:
            core = ov.Core()
            model = core.read_model(str(model_root / artifact.files[0]))
            compiled = core.compile_model(model, candidate.device, config)
        except RuntimeError as e:
            raise RuntimeLoadError(
                f"openvino could not compile the model for {candidate.device}: {e}"
            ) from e
        return _OvModel(compiled)
