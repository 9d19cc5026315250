"""What the daemon needs to serve installed models: runtime decisions and loaded runners.

Kept apart from :mod:`agent.updater` so that the idle daemon does not import the deployment
pipeline's trust stack (python-tuf, securesystemslib, cryptography): when deployments run in a
child process (:mod:`agent.isolation`), only the child imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import AgentSettings
from agent.installed import InstalledManifest
from agent.platform import DevicePlatform
from agent.runtimes.cache import DecisionCache
from agent.runtimes.probe import cached_decision, probe_model
from agent.runtimes.runner import ModelRunner, probe_feeds
from agent.runtimes.selection import Decision
from agent.store import ModelStore
from shared.bundle_format import MANIFEST_NAME
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from shared.manifest import Manifest

__all__ = ["ActiveModel", "DeploymentError", "Ready", "Runtimes"]


class DeploymentError(EdgefleetError):
    """A deployment stopped; ``failure_class`` says where (download, verification, ...)."""

    def __init__(
        self, failure_class: str, message: str, *, model: str = "?", version: str = "?"
    ) -> None:
        super().__init__(message, check=failure_class)
        self.failure_class = failure_class
        self.model = model
        self.version = version


@dataclass
class ActiveModel:
    """A model the agent serves: its version, manifest and loaded runner."""

    name: str
    version: str
    manifest: Manifest | InstalledManifest
    runner: ModelRunner

    def feeds(self, inputs: Mapping[str, Any], *, binary: bool) -> dict[str, np.ndarray]:
        """The runtime's feeds for a request's inputs, refusing what the model does not take.

        Every input the manifest declares must arrive, with its shape (``-1``: any size), and
        nothing else. A JSON request's nested lists are converted to the model's dtypes; a binary
        request's arrays are used as they arrived, so their dtype must be the model's. All this
        is checked before the runtime sees the request: a runtime's failure makes the runner drop
        that runtime and fall back to another (:meth:`ModelRunner.infer`), which bad input from
        one application must never cause.

        Raises:
            EdgefleetError: what the model takes, and what arrived.
        """
        specs = {t.name: t for t in self.manifest.inputs}
        takes = f"the model takes {sorted(specs)}"
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise EdgefleetError(f"unknown inputs {unknown}; {takes}")
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise EdgefleetError(f"missing inputs {missing}; {takes}")
        feeds = {}
        for name, value in inputs.items():
            spec = specs[name]
            if binary:
                array = value
                if array.dtype.name != spec.dtype:
                    raise EdgefleetError(
                        f"input {name!r}: expected dtype {spec.dtype} (the model's), "
                        f"got {array.dtype.name}"
                    )
            else:
                array = _json_array(name, value, spec.dtype)
            shape = list(array.shape)
            if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=False)
            ):
                raise EdgefleetError(
                    f"input {name!r}: expected shape {list(spec.shape)} (-1: any size), got {shape}"
                )
            feeds[name] = array
        return feeds


# What JSON numbers may become, by the kind of the model's dtype: booleans only for bool inputs,
# integers for integer inputs, and integers or reals for floating-point inputs.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


def _json_array(name: str, value: Any, dtype: str) -> np.ndarray:
    """A JSON input's nested lists as an array of the model's ``dtype``, refusing anything that is
    not a rectangular array of the right kind of values (text, null, objects, ragged lists,
    fractions for an integer input) rather than letting numpy coerce it."""
    try:
        want = np.dtype(dtype)
    except TypeError:  # bfloat16: numpy has no such type
        raise EdgefleetError(f"input {name!r}: {dtype} inputs cannot be sent as JSON") from None
    what = f"input {name!r}: expected a rectangular array of {_KIND_NAMES.get(want.kind, dtype)}"
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nesting
        raise EdgefleetError(f"{what}, got nested lists of uneven lengths ({e})") from None
    allowed = _JSON_KINDS.get(want.kind, "")
    if raw.size and raw.dtype.kind not in allowed:
        got = {
            "U": "text",
            "O": "null, objects, mixed values or integers beyond 64 bits",
            "b": "booleans",
            "i": "integers",
            "u": "integers",
            "f": "numbers with a fraction or an exponent",
        }.get(raw.dtype.kind, f"{raw.dtype.name} values")
        raise EdgefleetError(f"{what}, got {got}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = raw.astype(want, casting="unsafe")
    except (FloatingPointError, OverflowError, ValueError) as e:
        raise EdgefleetError(f"{what} that fit {dtype}, got values that do not ({e})") from None
    if want.kind in "iu" and not np.array_equal(array, raw):
        raise EdgefleetError(f"{what} that fit {dtype}, got values that do not")
    return array


@dataclass(frozen=True)
class Ready:
    """A deployed version, installed and self-tested, ready to activate.

    The manifest is the full one when the deployment ran in this process, or what the daemon
    reads of it (:mod:`agent.installed`) when it ran in a child process.
    """

    manifest: Manifest | InstalledManifest
    decision: Decision
    rollback_floor: int


class Runtimes:
    """Choose a runtime for an installed version by measurement (self-test) and load it."""

    def __init__(
        self, settings: AgentSettings, store: ModelStore, platform: DevicePlatform
    ) -> None:
        self.settings = settings
        self.store = store
        self.platform = platform
        self.cache = DecisionCache(settings.data_dir / "cache" / "runtime-decisions")

    def self_test(self, manifest: Manifest) -> Decision:
        """Choose the runtime by measurement, which runs the test vectors; check latency.

        The decision is cached on disk: the next call for the same version measures nothing.
        """
        name, version = manifest.name, manifest.version
        root = self.store.version_dir(name, version)
        digest = hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()
        try:
            report = probe_model(
                root,
                manifest,
                bundle_digest=digest,
                inventory=self.platform.inventory,
                objective=self.settings.objective,
                cache=self.cache,
                backends=self.platform.backends,
                isolate=self.platform.isolate_trials,
                settings=self.platform.trial_settings,
            )
        except EdgefleetError as e:
            raise DeploymentError("self_test", str(e)) from e
        selected = report.decision.selected
        budget = self.settings.latency_budget_ms
        p50 = selected.measurement.p50_ms
        if budget is not None and p50 is not None and p50 > budget:
            raise DeploymentError(
                "self_test",
                f"{name} {version}: p50 {p50:.2f} ms exceeds the "
                f"latency budget {budget:g} ms on {selected.candidate.key}",
            )
        return report.decision

    def decision_for(self, name: str, version: str) -> Decision:
        """The runtime decision for an installed version (cached after its self-test).

        Only when the cache no longer applies (a runtime was upgraded, the hardware changed)
        is the version measured again, which parses its manifest in full (pydantic).
        """
        manifest_bytes = (self.store.version_dir(name, version) / MANIFEST_NAME).read_bytes()
        _, decision = cached_decision(
            bundle_digest=hashlib.sha256(manifest_bytes).hexdigest(),
            inventory=self.platform.inventory,
            objective=self.settings.objective,
            cache=self.cache,
            backends=self.platform.backends,
        )
        if decision is not None:
            return decision
        return self.self_test(self.store.manifest(name, version))

    def load(self, manifest: Manifest | InstalledManifest, decision: Decision) -> ActiveModel:
        """Load a model for serving (the old one keeps serving until the caller swaps)."""
        root = self.store.version_dir(manifest.name, manifest.version)
        runner = ModelRunner(
            root, manifest, decision, self.platform.backends, probe=probe_feeds(manifest.inputs)
        )
        try:
            runner.load()
        except EdgefleetError as e:
            raise DeploymentError("self_test", str(e)) from e
        return ActiveModel(manifest.name, manifest.version, manifest, runner)
