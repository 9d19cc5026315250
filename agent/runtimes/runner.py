"""The agent's inference path: the chosen runtime loaded in-process, with run-time fallback.

:class:`ModelRunner` loads the best-ranked candidate of a :class:`Decision`. If it fails to load,
or fails during inference, the runner moves down the ranking and retries the call once on the
next candidate, so a runtime that breaks in the field costs one slower call, not an outage.
The hot path is a single method call on the loaded model plus a name check.

A failure is blamed on the runtime only if the runtime also fails a known-good input (the
``probe``: zeros of the model's declared inputs). Otherwise the request was at fault (an index
out of range, two inputs whose free dimensions disagree, anything only the values reveal): it
gets :class:`InputRefusedError` and the runtime keeps serving, so one application's bad input
cannot take a model offline on a device.
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
from shared.errors import EdgefleetError

__all__ = ["InputRefusedError", "ModelRunner", "RunnableManifest", "probe_feeds"]

logger = logging.getLogger(__name__)


class RunnableManifest(Protocol):
    """What running needs of a manifest: a bundle's :class:`shared.manifest.Manifest`, or the
    daemon's :class:`agent.installed.InstalledManifest` read without pydantic."""

    @property
    def name(self) -> str: ...

    @property
    def artifacts(self) -> Sequence[ArtifactRef]: ...


class InputRefusedError(EdgefleetError):
    """The runtime refused one request's input, and still runs a known-good one."""

    default_check = "input"


class TensorShape(Protocol):
    """A declared input: :class:`shared.manifest.TensorSpec` or the daemon's own reading."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def probe_feeds(inputs: Sequence[TensorShape]) -> dict[str, np.ndarray] | None:
    """Zeros of every declared input (a free dimension as 1), or None when numpy has no such
    dtype (``bfloat16``): then every failure is blamed on the runtime, as without a probe."""
    try:
        return {
            t.name: np.zeros([d if d > 0 else 1 for d in t.shape], dtype=t.dtype) for t in inputs
        }
    except TypeError:
        return None


class ModelRunner:
    """Run a bundle's model on the decided runtime, falling back down the ranking on failure."""

    def __init__(
        self,
        model_root: Path,
        manifest: RunnableManifest,
        decision: Decision,
        backends: Mapping[str, str] = BACKENDS,
        *,
        probe: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.model_root = model_root
        self.manifest = manifest
        self.decision = decision
        self._backends = backends
        self._probe = probe
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
        """Run one input or a batch. On a runtime failure, fall back once and retry.

        Raises:
            InputRefusedError: the runtime refused this input but still runs the probe.
            NoRuntimeError: no runtime is left that loads.
        """
        model = self._model
        if model is None:
            self.load()
            model = self._model
        assert model is not None
        try:
            return model.infer(feeds)
        except Exception as e:
            if self._still_runs(model):
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise InputRefusedError(
                    f"{self.manifest.name}: the runtime refused this input: {first_line[:300]}"
                ) from e
            failed = self.active
            self.close()
            if failed is not None:
                self._drop(failed, f"inference failed at run time: {e}")
            self.load()
            assert self._model is not None
            return self._model.infer(feeds)

    def _still_runs(self, model: LoadedModel) -> bool:
        """After a failure: does ``model`` still answer the probe? Then the input was at fault."""
        if self._probe is None:
            return False
        try:
            model.infer(self._probe)
        except Exception:
            return False
        return True

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
        self._model, self.active = None, None
