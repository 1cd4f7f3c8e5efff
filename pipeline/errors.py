"""Typed errors. Every failure carries a *kind*; exit codes and HTTP statuses are chosen from the kind, in one table.

Stages raise these (or plain ValueError for a bad value); drivers record `kind_of(err)` next to the message, the
endpoint answers `HTTP_STATUS[kind]` and a command exits `exit_code(command_kind(err))` — both columns of the one
table, `KINDS` — never by reading the message text.
"""

from __future__ import annotations

import sys


class PidrayError(Exception):
    """Base of pidray's own errors; `kind` names the class of failure."""

    kind = "internal"


class BadInput(PidrayError, ValueError):
    """The input (file, body, name) cannot be used: not an image, corrupt, unsafe name."""

    kind = "bad_input"


class TooLarge(BadInput):
    """Over a configured limit (pixels, bytes, output side, work per request)."""

    kind = "too_large"


class OutputExists(BadInput):
    """A file is already at an output's name in DST and the job may not replace it (pidray never overwrites a file
    it did not write): found at planning, or appeared before the write."""

    kind = "exists"  # not a bad input: the input is fine, its output's name is taken

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def is_number(value) -> bool:
    """A finite int or float, and not a bool: what every numeric parameter, JSON field and metadata value must be
    before its own range is checked."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class BadParameter(PidrayError, ValueError):
    """A parameter or option out of range or of the wrong type."""

    kind = "bad_parameter"


class Cancelled(PidrayError):
    """The request's deadline passed or its client went away; the work was stopped."""

    kind = "cancelled"


class Refused(PidrayError):
    """An HTTP request refused before any work, for a reason of its own kind (see HTTP_STATUS)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SetupError(PidrayError):
    """The job cannot start: storage not reachable/writable, weights missing, bad device. One line, exit 2."""

    kind = "setup"


# The one table: every kind, with how a command that ends with it exits (the CLI) and the HTTP status a request that
# fails with it gets (the endpoint; None: never an HTTP answer). A user's error (bad input, setup, storage) is one
# line and 2; a bug is 1; a job that finished with some inputs failed is 3 (they are listed and in the manifest).
KINDS: dict[str, tuple[int, int | None]] = {
    "ok": (0, None),
    "skipped": (0, None),  # an input left out at planning (hidden, a link, an output --resume keeps): not a failure
    "internal": (1, 500),
    "bad_input": (2, 400),  # not an image, corrupt, malformed multipart
    "too_large": (2, 413),  # bytes, pixels, output side, work per request
    "bad_parameter": (2, 422),
    "exists": (2, 409),  # an output's name is taken by a file pidray may not replace
    "setup": (2, 500),
    "cancelled": (2, 504),  # the deadline passed; the work was stopped
    "unauthorized": (2, 401),  # missing or wrong bearer token
    "forbidden": (2, 403),  # cross-site Origin, unknown Host
    "slow_client": (2, 408),  # the body did not arrive in time
    "length_required": (2, 411),  # a body without Content-Length (chunked): Serve's proxy would buffer it unbounded
    "unsupported_media": (2, 415),  # a raw body that does not say it is an image
    "busy": (2, 503),  # the endpoint's queue is full (with Retry-After)
    "rows_failed": (3, None),
}
EXIT_CODE = {kind: code for kind, (code, _) in KINDS.items()}
HTTP_STATUS = {kind: status for kind, (_, status) in KINDS.items() if status is not None}

# Exceptions that are not pidray's and end a command as a user's error, by kind: a file or folder named on the command
# line that is missing or not allowed, and S3 failures (botocore's, checked by name: botocore is imported only where
# S3 is used). A request never names a local file: the endpoint keeps them internal (`kind_of`).
COMMAND_KINDS = {FileNotFoundError: "setup", PermissionError: "setup", IsADirectoryError: "setup"}
STORAGE_ERRORS = ("botocore.exceptions.BotoCoreError", "botocore.exceptions.ClientError")


def exit_code(kind: str) -> int:
    """The exit code of a command that ended with this kind (KINDS; an unknown kind is a bug's)."""
    return KINDS.get(kind, KINDS["internal"])[0]


def is_storage_error(err: BaseException) -> bool:
    """A botocore error (STORAGE_ERRORS): S3 could not be used."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__}
    return any(name in names for name in STORAGE_ERRORS)


def storage_failures() -> tuple[type[BaseException], ...]:
    """What a storage call (pipeline.storage) raises when the storage fails, not pidray: an OS error (local files,
    the network), one of pidray's refusals or a bad value (a name, a size, a URI, SRC missing), and botocore's errors
    (STORAGE_ERRORS; once botocore is loaded: no call raised one before). The types an `except` around storage
    catches (`except storage_failures():`); anything else is a bug, and is raised."""
    found: list[type[BaseException]] = [OSError, PidrayError, ValueError]
    bx = sys.modules.get("botocore.exceptions")
    if bx is not None:
        found += [bx.BotoCoreError, bx.ClientError]
    return tuple(found)


def command_kind(err: BaseException) -> str:
    """The kind of a failure that ended a command: ours and a bad value by `kind_of` (a TypeError there is a bug,
    not a value: internal), a missing or forbidden file and a storage failure by COMMAND_KINDS / STORAGE_ERRORS."""
    if isinstance(err, (PidrayError, ValueError)):
        return kind_of(err)
    for cls, kind in COMMAND_KINDS.items():
        if isinstance(err, cls):
            return kind
    return "setup" if is_storage_error(err) else "internal"


def kind_of(err: BaseException) -> str:
    """The kind of any exception: ours carry it; a plain ValueError/TypeError is a bad value; the rest internal."""
    if isinstance(err, PidrayError):
        return err.kind
    if isinstance(err, (ValueError, TypeError)):
        return "bad_parameter"
    return "internal"
