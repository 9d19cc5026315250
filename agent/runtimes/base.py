"""The one interface every runtime backend implements, and the values they exchange.

A *backend* wraps one inference library (onnxruntime, OpenVINO, LiteRT). It reports whether the
library is installed and which devices it sees (:meth:`Backend.status`), proposes *candidates* —
one artifact of the bundle on one device with one set of settings — (:meth:`Backend.candidates`),
and loads a candidate into a :class:`LoadedModel` that runs inference (:meth:`Backend.load`).

Backends import their library inside these methods, never at module import, so a device with
only one runtime installed imports every backend module fine. A missing library is a normal
condition reported in :class:`RuntimeStatus`, not an error.
"""

from __future__ import annotations

import functools
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from shared.manifest import Artifact

__all__ = [
    "ArtifactRef",
    "Backend",
    "Candidate",
    "LoadedModel",
    "RuntimeLoadError",
    "RuntimeStatus",
    "SettingValue",
]

SettingValue = str | int | float | bool


class RuntimeLoadError(EdgefleetError):
    """A runtime could not load or run a candidate (bad model, missing device, delegate crash)."""

    default_check = "runtime"


class ArtifactRef(Protocol):
    """What loading needs of an artifact: a bundle's :class:`shared.manifest.Artifact`, or the
    daemon's :class:`agent.installed.InstalledArtifact` read without pydantic."""

    @property
    def format(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def files(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class RuntimeStatus:
    """Whether a runtime library is installed here, its version, and the devices it reports."""

    name: str
    installed: bool
    version: str | None = None
    devices: tuple[str, ...] = ()
    reason: str | None = None  # why it is not installed or not usable
    # What each device can do, as the runtime reports it (e.g. OpenVINO's "BF16", "FP16").
    capabilities: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def device_capabilities(self, device: str) -> tuple[str, ...]:
        return dict(self.capabilities).get(device, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "installed": self.installed,
            "version": self.version,
            "devices": list(self.devices),
            "reason": self.reason,
            "capabilities": {d: list(c) for d, c in self.capabilities},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeStatus:
        return cls(
            name=str(data["name"]),
            installed=bool(data["installed"]),
            version=data.get("version"),
            devices=tuple(data.get("devices", ())),
            reason=data.get("reason"),
            capabilities=tuple(
                (d, tuple(c)) for d, c in sorted(dict(data.get("capabilities", {})).items())
            ),
        )


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: an artifact, on a runtime and device, with settings.

    ``settings`` is a sorted tuple of (name, value) pairs so candidates are hashable and their
    :attr:`key` is stable across runs (it is what the decision cache stores).
    """

    runtime: str
    device: str
    artifact_index: int
    artifact_format: str
    artifact_precision: str
    settings: tuple[tuple[str, SettingValue], ...] = ()
    precision: str = field(default="f32")  # the compute precision the settings ask for

    @classmethod
    def make(
        cls,
        *,
        runtime: str,
        device: str,
        artifact_index: int,
        artifact: ArtifactRef,
        settings: Mapping[str, SettingValue] | None = None,
        precision: str = "f32",
    ) -> Candidate:
        return cls(
            runtime=runtime,
            device=device,
            artifact_index=artifact_index,
            artifact_format=artifact.format,
            artifact_precision=artifact.precision,
            settings=tuple(sorted((settings or {}).items())),
            precision=precision,
        )

    @property
    def options(self) -> dict[str, SettingValue]:
        return dict(self.settings)

    @property
    def key(self) -> str:
        """A stable, readable id, e.g. ``openvino/CPU/openvino:fp32/hint=LATENCY,precision=f32``."""
        settings = ",".join(f"{k}={v}" for k, v in self.settings) or "default"
        return (
            f"{self.runtime}/{self.device}/{self.artifact_format}:{self.artifact_precision}/"
            f"{settings}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "device": self.device,
            "artifact": {
                "index": self.artifact_index,
                "format": self.artifact_format,
                "precision": self.artifact_precision,
            },
            "settings": self.options,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        artifact = data["artifact"]
        return cls(
            runtime=str(data["runtime"]),
            device=str(data["device"]),
            artifact_index=int(artifact["index"]),
            artifact_format=str(artifact["format"]),
            artifact_precision=str(artifact["precision"]),
            settings=tuple(sorted(dict(data["settings"]).items())),
            precision=str(data.get("precision", "f32")),
        )


class LoadedModel(Protocol):
    """A model loaded on one runtime and device, ready to run."""

    @property
    def input_names(self) -> Sequence[str]:
        """The runtime's input tensor names, in order."""
        ...

    @property
    def output_names(self) -> Sequence[str]:
        """The runtime's output tensor names, in order."""
        ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one input or a batch (the tensors' first axis); return outputs by name."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


@functools.cache
def _distribution_version(dist: str) -> str | None:
    """An installed distribution's version, or None; read once per process.

    Reading it scans every directory on ``sys.path`` (milliseconds), and it is asked at each
    deployment and start. A runtime upgraded on the device takes effect at the agent's next
    start, as does the runtime library the process has already imported.
    """
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Backend(ABC):
    """A runtime library behind edgefleet's interface. Subclasses live one per module."""

    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]
    # Python distributions that provide the library, in order of preference.
    distributions: ClassVar[tuple[str, ...]] = ()

    def installed_version(self) -> str | None:
        """``dist==version`` of the installed distribution, read without importing it."""
        for dist in self.distributions:
            version = _distribution_version(dist)
            if version is not None:
                return f"{dist}=={version}"
        return None

    @abstractmethod
    def status(self) -> RuntimeStatus:
        """Import the library if possible and report what it sees. Never raises."""

    @abstractmethod
    def candidates(
        self,
        artifact_index: int,
        artifact: Artifact,
        status: RuntimeStatus,
        *,
        cores: int,
        cpu_flags: frozenset[str],
    ) -> list[Candidate]:
        """The configurations worth trying for ``artifact`` on this machine (may be empty).

        Called only for an artifact in one of :attr:`formats` and an installed runtime.
        """

    @abstractmethod
    def load(self, model_root: Path, artifact: ArtifactRef, candidate: Candidate) -> LoadedModel:
        """Load ``candidate``. Raises :class:`RuntimeLoadError` if the runtime refuses it."""


def thread_options(cores: int) -> list[int]:
    """Thread counts worth trying on a machine with ``cores`` logical CPUs: 1, half, all."""
    return sorted({1, max(1, cores // 2), cores})
