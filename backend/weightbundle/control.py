"""The control protocol: what a ``CONTROL`` tensor may say, and who may say it.

A command is a one-element string tensor holding a JSON object, e.g.
``{"op": "update", "expected_version": 3, "secret": "..."}``.  This module only
parses and authorises; executing a command is the service's job.
Spec: docs/bundle-format.md, section "Control protocol".
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import BundleError

CONTROL_INPUT = "CONTROL"
VERSION_OUTPUT = "WEIGHTS_VERSION"
RESULT_OUTPUT = "CONTROL_RESULT"
OPS = ("update", "status", "reset", "rollback", "commit", "stage", "activate", "abort")
MUTATING = frozenset({"update", "reset", "rollback", "commit", "stage", "activate", "abort"})
# "version": a publisher-chosen number for the version the op creates (fleets; see docs/fleet.md)
_FIELDS = {
    "update": {"expected_version", "source", "reject_nonfinite", "version"},
    "status": {"checksums"},
    "reset": {"expected_version", "version"},
    "rollback": {"expected_version", "version"},
    "commit": {"expected_version"},
    "stage": {"source", "reject_nonfinite", "version"},
    "activate": {"expected_version", "version"},
    "abort": {"version"},
}
RESERVED_NAMES = frozenset({CONTROL_INPUT, VERSION_OUTPUT, RESULT_OUTPUT})
# Field types, checked strictly: a boolean is true or false, not 1 or "yes".
_TYPES: dict[str, type] = {"reject_nonfinite": bool, "checksums": bool, "source": dict, "version": int}
_TYPE_WORDS = {bool: "true or false", dict: "a JSON object", int: "an integer", str: "a string"}
MAX_CONTROL_BYTES = 64 * 1024  # a command is small; refuse to parse megabytes of JSON


class ControlError(BundleError):
    """A command was refused. ``code`` maps to a Triton error code."""

    def __init__(self, message: str, code: str = "INVALID_ARG", reason: str = "bad_command"):
        super().__init__(message)
        self.code = code
        self.reason = reason  # metrics label: bad_command, auth, disabled


@dataclass
class Command:
    op: str
    expected_version: int | None = None
    secret: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


def parse_command(value: Any) -> Command:
    """Parse the CONTROL tensor. Every way it can be wrong gets its own message."""
    arr = np.asarray(value)
    if arr.dtype != object and arr.dtype.kind not in "SU":
        raise ControlError(f"{CONTROL_INPUT} must be a TYPE_STRING (BYTES) tensor holding JSON, got dtype {arr.dtype}")
    if arr.size != 1:
        raise ControlError(f"{CONTROL_INPUT} must hold exactly one element, got shape {arr.shape}")
    raw = arr.reshape(-1)[0]
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, (bytes, bytearray)):
        raise ControlError(f"{CONTROL_INPUT} element must be a string, got {type(raw).__name__}")
    if len(raw) > MAX_CONTROL_BYTES:
        raise ControlError(f"{CONTROL_INPUT} is {len(raw)} bytes; a command is at most {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") cannot be used as text
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise ControlError(f"{CONTROL_INPUT} is not valid UTF-8 text: {e.reason}") from None
    except RecursionError:
        raise ControlError(f"{CONTROL_INPUT} nests too deeply; a command is a flat JSON object") from None
    except ValueError as e:
        raise ControlError(f"{CONTROL_INPUT} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ControlError(f'{CONTROL_INPUT} must be a JSON object like {{"op": "update"}}, got {type(obj).__name__}')
    op = obj.pop("op", None)
    if not isinstance(op, str) or op not in OPS:
        raise ControlError(f"unknown op {op!r:.80}; valid ops are {list(OPS)}")
    secret = obj.pop("secret", None)
    if secret is not None and not isinstance(secret, str):
        raise ControlError("'secret' must be a string")
    ev = obj.pop("expected_version", None) if "expected_version" in _FIELDS[op] else None
    if ev is not None and (not isinstance(ev, int) or isinstance(ev, bool) or ev < 0):
        raise ControlError(f"'expected_version' must be a non-negative integer, got {ev!r:.80}")
    unknown = sorted(set(obj) - _FIELDS[op])
    if unknown:
        raise ControlError(f"op {op!r} does not take field(s) {unknown[:10]!r:.200}; it takes {sorted(_FIELDS[op] | {'secret'})}")
    for name, value in obj.items():
        want = _TYPES.get(name)
        if want is not None and not (isinstance(value, want) and not (want is int and isinstance(value, bool))):
            raise ControlError(f"'{name}' must be {_TYPE_WORDS[want]}, got {type(value).__name__}")
    return Command(op, ev, secret, obj)


class Authorizer:
    """Gate for mutating ops: off unless enabled; when on, a shared secret is required.

    The secret is read from an environment variable or a file, never from the
    model config text, and compared in constant time.
    """

    def __init__(self, enabled: bool, secret: bytes | None, require_secret: bool = True):
        if enabled and require_secret and not secret:
            raise ControlError("updates are enabled but no secret is configured: set update_secret_env or update_secret_file")
        self.enabled = enabled
        self._secret = secret
        self._require = require_secret

    @classmethod
    def from_sources(cls, enabled: bool, env_name: str | None, file_path: str | None, require_secret: bool = True) -> "Authorizer":
        secret = None
        if enabled and env_name:
            val = os.environ.get(env_name)
            if not val:
                raise ControlError(f"updates are enabled with update_secret_env={env_name!r}, but that environment variable is not set or empty")
            secret = val.encode()
        elif enabled and file_path:
            try:
                with open(file_path, "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise ControlError(f"cannot read update_secret_file {file_path!r}: {e.strerror}") from None
            if not secret:
                raise ControlError(f"update_secret_file {file_path!r} is empty")
        return cls(enabled, secret, require_secret)

    def authenticated(self, cmd: Command) -> bool:
        """Whether ``cmd`` carries what a mutating op would need (the secret, or auth is off)."""
        if not self.enabled:
            return False
        if not self._require:
            return True
        return cmd.secret is not None and hmac.compare_digest(cmd.secret.encode(), self._secret or b"")

    def check(self, cmd: Command) -> None:
        if cmd.op not in MUTATING:
            return
        if not self.enabled:
            raise ControlError(f"op {cmd.op!r} refused: weight updates are disabled for this model (set parameter allow_updates)", reason="disabled")
        if not self._require:
            return
        if cmd.secret is None:
            raise ControlError(f"op {cmd.op!r} refused: missing 'secret'", reason="auth")
        if not hmac.compare_digest(cmd.secret.encode(), self._secret or b""):
            raise ControlError(f"op {cmd.op!r} refused: wrong 'secret'", reason="auth")


def validate_names(names: Sequence[str], what: str = "tensor") -> None:
    """Refuse names that a Triton config or request cannot carry safely.

    Control characters (a newline ends a config line), quotes and backslashes (string
    delimiters and escapes in config.pbtxt and JSON), names reserved by the control
    protocol, empty names, and names over 256 bytes.
    """
    bad = []
    for n in names:
        why = name_problem(n)
        if why:
            bad.append(f"{n!r} ({why})")
    if bad:
        raise BundleError(
            f"{what} name(s) Triton cannot carry: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "rename them in the ONNX model (or pick other weights with --weights)"
        )


def name_problem(n: Any) -> str | None:
    if not isinstance(n, str) or not n:
        return "empty"
    if n in RESERVED_NAMES:
        return "reserved by the control protocol"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in n):
        return "contains a control character"
    if '"' in n or "\\" in n:
        return "contains a quote or a backslash"
    try:
        if len(n.encode("utf-8")) > 256:
            return "longer than 256 bytes"
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None
