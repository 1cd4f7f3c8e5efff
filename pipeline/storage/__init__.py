"""Where inputs come from and outputs go: a local folder or an s3:// prefix (boto3).

Safety rules, enforced here and relied on by the planner:
- a key is '/'-separated and relative; one with an empty, '.' or '..' segment, a NUL, or (for S3) a name that is not
  valid UTF-8 is refused (`key_problem`), and a local write is also checked to land inside DST after resolving
  symlinks, so nothing is ever written outside DST;
- listings skip symbolic links unless asked to follow them, report hidden files instead of dropping them silently,
  and leave out DST when it lies inside SRC;
- writes are atomic for readers: local files go to a temporary name and are linked/renamed into place; S3 objects
  are one PUT, or a multipart upload completed only once every part is in;
- writes never replace an existing file unless asked (`overwrite=True`): locally the temporary is hard-linked to
  the final name (which fails when the name exists), on S3 the PUT or the multipart completion carries
  If-None-Match: * — so a file that appears between planning and writing is never clobbered.
Clients are built lazily inside each worker from plain settings, so a `Location` pickles cheaply.

The modules: `base` (`Location`, the interface, and what is the same for both backends), `local` (`LocalLocation`),
`s3` (`S3Location`), `common` (key rules, listing entries, S3 settings, how a failure is told) and `lease` (DST's
lease check). `Location(uri, ...)` is the backend the URI names; the names below are what other modules import.
"""

from pipeline.storage.base import Location
from pipeline.storage.common import (
    IMAGE_EXTENSIONS,
    MAX_INPUT_BYTES,
    RESERVED_PREFIX,
    Entry,
    FileInfo,
    NotAFile,
    S3Settings,
    display,
    explain_storage_error,
    is_hidden,
    is_image_key,
    key_problem,
    shown,
    temp_prefix,
    what_is,
)
from pipeline.storage.lease import LEASE_KEY, LeaseLost, check_lease
from pipeline.storage.local import LocalLocation
from pipeline.storage.s3 import BUCKET_NAME, PART_BYTES, S3Location

__all__ = [
    "BUCKET_NAME",
    "IMAGE_EXTENSIONS",
    "LEASE_KEY",
    "MAX_INPUT_BYTES",
    "PART_BYTES",
    "RESERVED_PREFIX",
    "Entry",
    "FileInfo",
    "LeaseLost",
    "LocalLocation",
    "Location",
    "NotAFile",
    "S3Location",
    "S3Settings",
    "check_lease",
    "display",
    "explain_storage_error",
    "is_hidden",
    "is_image_key",
    "key_problem",
    "shown",
    "temp_prefix",
    "what_is",
]
