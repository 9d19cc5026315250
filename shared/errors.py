"""The errors edgefleet raises, in one shallow tree.

::

    EdgefleetError                 every error edgefleet raises on purpose
    ├── UsageError                 bad flag, missing file: the caller's mistake
    ├── BundleError                a bundle or model directory is malformed
    │   ├── ContainerError         the container breaks a rule (links, traversal, truncation)
    │   ├── ManifestError          manifest.json / model.json is invalid (schema, size, nesting)
    │   └── IntegrityError         a file differs from the manifest (size, sha256, missing, extra)
    ├── TrustError                 a release fails a trust check
    │   ├── SignatureError         unknown key, bad signature, threshold not met
    │   ├── ExpiredError           a release or its metadata is past its expiry
    │   ├── RollbackError          an older release or metadata version than already trusted
    │   └── TargetingError         the release is not meant for this device or hardware
    └── KeyStoreError              the signer's key directory is missing or inconsistent

Every error carries ``check``, the short name of the check that failed (``"sha256"``,
``"threshold"``, ``"expiry"``...), so callers can count and report failures by class. Messages state
facts with values: what was expected and what arrived, e.g.
``model.onnx: sha256 mismatch (expected 3fa1..., got 9b0c...)``.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ContainerError",
    "EdgefleetError",
    "ExpiredError",
    "IntegrityError",
    "KeyStoreError",
    "ManifestError",
    "RollbackError",
    "SignatureError",
    "TargetingError",
    "TrustError",
    "UsageError",
]


class EdgefleetError(Exception):
    """Base class. ``check`` names the failed check; ``str(err)`` is one line for a person."""

    default_check = "edgefleet"

    def __init__(self, message: str, *, check: str | None = None) -> None:
        super().__init__(message)
        self.check = check or self.default_check


class UsageError(EdgefleetError):
    default_check = "usage"


class BundleError(EdgefleetError):
    default_check = "bundle"


class ContainerError(BundleError):
    default_check = "container"


class ManifestError(BundleError):
    default_check = "manifest"


class IntegrityError(BundleError):
    default_check = "integrity"


class TrustError(EdgefleetError):
    default_check = "trust"


class SignatureError(TrustError):
    default_check = "signature"


class ExpiredError(TrustError):
    default_check = "expiry"


class RollbackError(TrustError):
    default_check = "rollback"


class TargetingError(TrustError):
    default_check = "targeting"


class KeyStoreError(EdgefleetError):
    default_check = "keys"
