"""The agent's inference path: the chosen runtime loaded in-process, with run-time fallback.

:class:`ModelRunner` loads the best-ranked candidate of a :class:`Decision`. If it fails to load,
or fails during inference, the runner moves down the ranking and retries the call once on the
next candidate, so a runtime that breaks in the field costs one slower call, not an outage.
The hot path is a single method call on the loaded model plus a name check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.runtimes.base import ArtifactRef, Candidate, LoadedModel, RuntimeLoadError
from agent.runtimes.registry import BACKENDS, load_backend
from agent.runtimes.selection import Decision, NoRuntimeError

__all__ = ["ModelRunner", "RunnableManifest"]

logger = logging.getLogger(__name__)


class RunnableManifest(Protocol):
    """What running needs of a manifest: a bundle's :class:`shared.manifest.Manifest`, or the
    daemon's :class:`agent.installed.InstalledManifest` read without pydantic."""

    @property
    def name(self) -> str: ...

    @property
    def artifacts(self) -> Sequence[ArtifactRef]: ...


class ModelRunner:
    """Run a bundle's model on the decided runtime, falling back down the ranking on failure."""

    def __init__(
        self,
        model_root: Path,
        manifest: RunnableManifest,
        decision: Decision,
        backends: Mapping[str, str] = BACKENDS,
    ) -> None:
        self.model_root = model_root
        self.manifest = manifest
        self.decision = decision
        self._backends = backends
        self._model: LoadedModel | None = None
        self.active: Candidate | None = None
        self.failures: list[str] = []

    def load(self) -> Candidate:
        """Load the best candidate that loads; return it.

        Raises:
            NoRuntimeError: every ranked candidate failed to load.
        """
        while self.decision.ranking:
            candidate = self.decision.ranking[0].candidate
            artifact = self.manifest.artifacts[candidate.artifact_index]
            try:
                backend = load_backend(self._backends[candidate.runtime])
                self._model = backend.load(self.model_root, artifact, candidate)
            except (RuntimeLoadError, KeyError, ImportError) as e:
                self._drop(candidate, f"load failed at run time: {e}")
                continue
            self.active = candidate
            logger.info("model %s running on %s", self.manifest.name, candidate.key)
            return candidate
        raise NoRuntimeError(
            f"no runtime on this device can run {self.manifest.name}: " + "; ".join(self.failures)
        )

    def _drop(self, candidate: Candidate, reason: str) -> None:
        logger.warning("model %s: dropping %s: %s", self.manifest.name, candidate.key, reason)
        self.failures.append(f"{candidate.key}: {reason}")
        self.decision = self.decision.without(candidate.key, reason)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one input or a batch. On a runtime failure, fall back once and retry."""
        model = self._model
        if model is None:
            self.load()
            model = self._model
        assert model is not None
        try:
            return model.infer(feeds)
        except Exception as e:
            failed = self.active
            self.close()
            if failed is not None:
                self._drop(failed, f"inference failed at run time: {e}")
            self.load()
            assert self._model is not None
            return self._model.infer(feeds)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
        self._model, self.active = None, None
