"""Typed errors. Every failure carries a *kind*; exit codes and HTTP statuses are chosen from the kind, in one table.

Stages raise these (or plain ValueError for a bad value); drivers record `kind_of(err)` next to the message, and the
endpoint answers `HTTP_STATUS[kind]` — never by reading the message text.
"""

from __future__ import annotations


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


# How a command ends, by kind: a user's error (bad input, setup, storage) is one line and 2; a bug is 1; a job that
# finished with some inputs failed is 3 (they are listed and in the manifest).
EXIT_CODE = {
    "ok": 0,
    "internal": 1,
    "bad_input": 2,
    "too_large": 2,
    "bad_parameter": 2,
    "setup": 2,
    "cancelled": 2,
    "rows_failed": 3,
}

HTTP_STATUS = {
    "bad_input": 400,  # not an image, corrupt, malformed multipart
    "unauthorized": 401,  # missing or wrong bearer token
    "forbidden": 403,  # cross-site Origin, unknown Host
    "slow_client": 408,  # the body did not arrive in time
    "length_required": 411,  # a body without Content-Length (chunked): Serve's proxy would buffer it unbounded
    "too_large": 413,  # bytes, pixels, output side, work per request
    "unsupported_media": 415,  # a raw body that does not say it is an image
    "bad_parameter": 422,
    "exists": 409,  # an output's name is taken by a file pidray may not replace
    "internal": 500,
    "setup": 500,
    "busy": 503,  # the endpoint's queue is full (with Retry-After)
    "cancelled": 504,  # the deadline passed; the work was stopped
}


def exit_code(kind: str) -> int:
    """The exit code of a command that ended with this kind (EXIT_CODE; any kind of refusal is a user's error)."""
    return EXIT_CODE.get(kind, EXIT_CODE["bad_input"] if kind in HTTP_STATUS else EXIT_CODE["internal"])


def kind_of(err: BaseException) -> str:
    """The kind of any exception: ours carry it; a plain ValueError/TypeError is a bad value; the rest internal."""
    if isinstance(err, PidrayError):
        return err.kind
    if isinstance(err, (ValueError, TypeError)):
        return "bad_parameter"
    return "internal"
