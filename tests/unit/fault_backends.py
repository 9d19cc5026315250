"""A runtime backend that misbehaves on request, to test isolation and fallback.

Its "model" doubles the input (a real computation checked against golden outputs). A candidate's
``fault`` setting makes it crash the process, hang, fail to load, fail at inference, or return
wrong numbers. The trial worker loads it by import path, like the real backends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.runtimes.base import ArtifactRef, Backend, Candidate, RuntimeLoadError, RuntimeStatus
from shared.manifest import Artifact

FAULTS = ("none", "slow", "wrong", "fail-load", "crash", "hang")
# Faults applied at inference time by ModelRunner tests (see FaultyModel.broken).
BROKEN_AT_RUNTIME: set[str] = set()


class FaultyModel:
    input_names = ("x",)
    output_names = ("y",)

    def __init__(self, fault: str, key: str) -> None:
        self.fault = fault
        self.key = key
        self.calls = 0

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.key in BROKEN_AT_RUNTIME:
            raise RuntimeError("device lost")
        if self.fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "slow":
            time.sleep(0.002)
        out = feeds["x"] * 2
        return {"y": out + 0.5 if self.fault == "wrong" else out}

    def close(self) -> None:
        pass


class FaultyBackend(Backend):
    name = "faulty"
    formats = frozenset({"fake"})
    distributions = ("numpy",)

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(self.name, installed=True, version="1", devices=("CPU",))

    def candidates(
        self,
        artifact_index: int,
        artifact: Artifact,
        status: RuntimeStatus,
        *,
        cores: int,
        cpu_flags: frozenset[str],
    ) -> list[Candidate]:
        return [
            Candidate.make(
                runtime=self.name,
                device="CPU",
                artifact_index=artifact_index,
                artifact=artifact,
                settings={"fault": fault},
            )
            for fault in os.environ.get("FAULTY_CANDIDATES", ",".join(FAULTS)).split(",")
        ]

    def load(self, model_root: Path, artifact: ArtifactRef, candidate: Candidate) -> FaultyModel:
        fault = str(candidate.options["fault"])
        if fault == "fail-load":
            raise RuntimeLoadError("delegate library not found")
        if not (model_root / artifact.files[0]).is_file():
            raise RuntimeLoadError("model file missing")
        return FaultyModel(fault, candidate.key)


class MissingBackend(FaultyBackend):
    """A runtime that is not installed on this device."""

    name = "missing"
    distributions = ("no-such-distribution",)

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(
            self.name, installed=False, reason="not installed (No module named 'missing')"
        )
