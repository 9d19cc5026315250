"""ONNX Runtime backend: every execution provider the installed build lists.

Candidates: the ONNX artifact on each available provider (CPU, CUDA, TensorRT, OpenVINO EP, ...);
on the CPU provider, with 1, half and all cores as intra-op threads. ONNX Runtime silently falls
back to the CPU when a requested provider cannot start, so :meth:`OnnxRuntimeBackend.load` checks
which provider the session really uses and refuses the candidate if it is not the one asked for.
"""

from __future__ import annotations

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

__all__ = ["OnnxRuntimeBackend"]

CPU = "CPUExecutionProvider"
# Providers that are listed by some builds but cannot run a local model by themselves.
_NOT_LOCAL = {"AzureExecutionProvider"}


class _OrtModel:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, results, strict=True))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    distributions = (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
    )
    formats = frozenset({"onnx"})

    def status(self) -> RuntimeStatus:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return RuntimeStatus(self.name, installed=False, reason=f"not installed ({e})")
        providers = tuple(p for p in ort.get_available_providers() if p not in _NOT_LOCAL)
        return RuntimeStatus(self.name, installed=True, version=ort.__version__, devices=providers)

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
        for provider in status.devices:
            thread_counts = thread_options(cores) if provider == CPU else [cores]
            for threads in thread_counts:
                found.append(
                    Candidate.make(
                        runtime=self.name,
                        device=provider,
                        artifact_index=artifact_index,
                        artifact=artifact,
                        settings={"threads": threads},
                        precision="f32" if artifact.precision == "fp32" else artifact.precision,
                    )
                )
        return found

    def load(self, model_root: Path, artifact: ArtifactRef, candidate: Candidate) -> _OrtModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        threads = int(candidate.options.get("threads", 0))
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: fallback warnings are checked below
        providers = [candidate.device] if candidate.device == CPU else [candidate.device, CPU]
        try:
            session = ort.InferenceSession(
                str(model_root / artifact.files[0]), sess_options=options, providers=providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(
                f"onnxruntime could not load the model on {candidate.device}: {e}"
            ) from e
        active = session.get_providers()[0]
        if active != candidate.device:
            raise RuntimeLoadError(
                f"onnxruntime was asked for {candidate.device} but runs on {active}"
            )
        return _OrtModel(session)
