"""Exception hierarchy. Every failure weightbundle detects is a ``BundleError``.

- In the backend, a ``BundleError`` (``FormatError``, ``UpdateError``, ...) becomes that
  request's own error without taking the server down; anything else is a bug.
- On the client side, ``CommandError`` is a command the served model refused (the
  message is the server's), and ``TritonServerError`` is the launcher's: tritonserver
  could not be found, started, or it died.

So ``except BundleError`` catches everything weightbundle raises on purpose.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base class for every error raised by weightbundle."""


class FormatError(BundleError):
    """The bundle bytes are not a valid bundle (magic, version, truncation, layout)."""


class ChecksumError(FormatError):
    """A section's CRC32 does not match its contents (corruption)."""


class ConvertError(BundleError, ValueError):
    """The ONNX model or the weight selection cannot be converted."""


class InputError(BundleError, ValueError):
    """Wrong input names, dtypes or shapes given to ``execute``."""


class UpdateError(InputError):
    """A weight update was rejected; no variable changed."""


class NotInitializedError(BundleError):
    """Inference before any weights exist (bundle without an init graph)."""


class UnloadedError(BundleError):
    """The bundle was unloaded; it cannot be used any more."""


class VersionConflictError(UpdateError):
    """Compare-and-swap failed: ``expected_version`` is not the current version."""

    def __init__(self, expected: int, current: int):
        super().__init__(f"version conflict: expected_version={expected} but the current version is {current}")
        self.expected = expected
        self.current = current


class VersionOrderError(VersionConflictError):
    """A publisher-chosen ``version`` does not exceed the current version (numbers never go down)."""

    def __init__(self, requested: int, current: int):
        UpdateError.__init__(self, f"version {requested} refused: it must exceed the current version {current}")
        self.expected = requested
        self.current = current


class CommandError(BundleError):
    """A served model refused a command (client side); the message is the server's."""


class TritonServerError(BundleError):
    """tritonserver could not be found, started, or it died (the launcher)."""
