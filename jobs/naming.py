"""Output names: which extension an input's output takes, so that inputs whose outputs cannot collide keep their
plain names; the unique output keys of a folder's inputs (`output_stems`); the names a latent or a prompt gives its
output; and the limits a name must keep (`output_name_problem`).

With formats kept, `x.png` and `x.jpg` become `x.png` and `x.jpg`: their outputs differ by extension. Names on one
stem keep their source extension in the output's name (`a.png.png`, `a.gif.png`) only when their outputs would share
one (a GIF and a BMP are written as PNG), or when `-f` gives them all one format.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import PurePosixPath

from pipeline.imageio import EXTENSIONS, FORMATS
from pipeline.storage import Location, display

OUTPUT_EXTENSIONS = sorted(set(EXTENSIONS.values()))


def natural_extension(name: str, fmt: str | None) -> str:
    """The output extension of an input named `name`: -f's, else the one its own format keeps (JPEG stays .jpg,
    TIFF .tif, WebP .webp); PNG for a GIF, a BMP or anything else. A file whose content belies its extension may
    still come out otherwise: the plan never relies on this for safety, only for names."""
    if fmt:
        return EXTENSIONS[FORMATS[fmt.lower().lstrip(".")]]
    kind = FORMATS.get(PurePosixPath(name).suffix.lower().lstrip("."))
    return ".png" if kind in (None, "BMP") else EXTENSIONS[kind]


def sibling_extensions(names: dict[str, str], stems: dict[str, str], fmt: str | None) -> dict[str, list[str]]:
    """id -> the natural output extensions of the other inputs named on the same output stem: outputs that are
    theirs, never this input's (a rerun finds `x.jpg` as x.jpg's output, not x.png's)."""
    by_stem: dict[str, set[tuple[str, str]]] = {}
    for i, stem in stems.items():
        by_stem.setdefault(stem.casefold(), set()).add((i, natural_extension(names[i], fmt)))
    return {i: sorted({e for j, e in by_stem[stem.casefold()] if j != i}) for i, stem in stems.items()}


def output_stems(names: list[tuple[str, str]], suffix: str, fmt: str | None = None,
                 taken: set[str] | frozenset = frozenset()) -> dict[str, str]:  # fmt: skip
    """(id, name) pairs, in the order that decides clashes -> id -> output key without its extension, unique
    (ignoring case) across the job with the output's extension (`natural_extension`). `name` is what the output is named
    after (an input key; a batch latent's or a prompt's name); ids are unique, names need not be. Different names
    on one stem whose outputs would share an extension keep their own (a.png, a.gif -> a.png.png, a.gif.png), names
    whose outputs differ by extension keep the plain stem (x.png, x.jpg -> x.png, x.jpg); any clash left (same
    name, or only the case differs) gets ~2, ~3 in the order given (two prompts both named pet -> pet, pet~2).
    taken: output keys (stem + extension, casefolded) already given out elsewhere, which a clash here avoids too."""
    plain = {}
    for i, k in names:
        p = PurePosixPath(k)
        parent = "" if str(p.parent) == "." else f"{p.parent}/"
        plain[i] = f"{parent}{p.stem}{suffix}"
    groups = defaultdict(lambda: defaultdict(set))  # stem -> output extension -> the source extensions on it
    for i, k in names:
        groups[plain[i].casefold()][natural_extension(k, fmt)].add(PurePosixPath(k).suffix.casefold())
    out, seen = {}, set(taken)
    for i, k in names:
        ext = natural_extension(k, fmt)
        keep_ext = len(groups[plain[i].casefold()][ext]) > 1  # names on one stem whose outputs would share ext
        base = f"{plain[i]}.{PurePosixPath(k).suffix[1:]}" if keep_ext else plain[i]
        stem, n = base, 1
        while (stem + ext).casefold() in seen:
            n += 1
            stem = f"{base}~{n}"
        seen.add((stem + ext).casefold())
        out[i] = stem
    return out


def output_candidates(stem: str, fmt: str | None, theirs=()) -> list[str]:
    """Every output key an input can end up with (the extension follows the decoded image when the format is kept),
    leaving out `theirs`: the extensions of other inputs' outputs on the same stem (`natural_extension`)."""
    if fmt:
        return [stem + EXTENSIONS[FORMATS[fmt.lower().lstrip(".")]]]
    return [stem + e for e in OUTPUT_EXTENSIONS if e not in theirs]


def safe_name(text: str) -> str:
    """A user-given name (a latent id, a prompt's `name`) as one file-name segment: every run of characters other
    than word characters, '.' and '-' becomes '_'."""
    return re.sub(r"[^\w.-]+", "_", text)


def batch_name(key: str, latent_id: str) -> str:
    """The name an output of one latent of a batch file is made from: the file's stem, then the id made safe for a
    file name (`a.npz` id `x/y` -> `a.x_y`); `output_stems` then makes every name in the job unique."""
    p = PurePosixPath(key)
    safe = safe_name(latent_id).strip("._")[:80] or "latent"
    parent = "" if str(p.parent) == "." else f"{p.parent}/"
    return f"{parent}{p.stem}.{safe}.latent"


def latent_key(file_key: str, latent_id: str = "") -> str:
    """The manifest key of a latent: its file's key, then `#id` for one latent of a batch file. A '%' or '#' in the
    file's own name is written %25 / %23, so the first '#' always starts the id and no file name can pass for a
    latent of another file (`x.npz#b.npy`, a file, is `x.npz%23b.npy`; member `b.npy` of `x.npz` is `x.npz#b.npy`)."""
    escaped = file_key.replace("%", "%25").replace("#", "%23")
    return f"{escaped}#{latent_id}" if latent_id else escaped


MAX_NAME_BYTES = 255  # one file or folder name, on the file systems outputs are written to
MAX_PATH_BYTES = 4095  # a whole local path (Linux's PATH_MAX, less its NUL)
MAX_S3_KEY_BYTES = 1024


def output_name_problem(stem: str, fmt: str | None, dst: Location) -> str | None:
    """Why the output of `stem` cannot be written at DST, whichever extension it takes, else None: a file or folder
    name over 255 bytes, a local path over 4,095 bytes or an S3 key over 1,024 bytes (counted in UTF-8, as the file
    system and S3 count them), said at planning instead of failing the write after the model ran."""

    def _nbytes(text: str) -> int:
        try:
            return len(os.fsencode(text))  # a name read from disk: its own bytes
        except UnicodeEncodeError:
            return len(text.encode("utf-8", "surrogatepass"))

    out = max(output_candidates(stem, fmt), key=_nbytes)  # the longest extension
    how = "choose a shorter --suffix, or give the input (the latent's id, the prompt's name) a shorter name"
    if dst.is_s3:
        prefix = dst.bucket_prefix[1]
        n = _nbytes(f"{prefix}/{out}" if prefix else out)
        if n > MAX_S3_KEY_BYTES:
            return f"its output's S3 key would be {n:,} bytes, over S3's limit of {MAX_S3_KEY_BYTES:,}: {how}"
        return None
    parts = out.split("/")
    for i, part in enumerate(parts):
        n = _nbytes(part)
        if n > MAX_NAME_BYTES:
            name = display(stem.split("/")[i])  # without the extension, which depends on what the image turns out
            short = name if len(name) <= 60 else f"{name[:40]}...{name[-16:]}"
            what = "file name" if i == len(parts) - 1 else "folder name"
            return (f"its output's {what} ({short!r}, with its extension) would be up to {n:,} bytes, over the limit "
                    f"of {MAX_NAME_BYTES} bytes a name may have: {how}")  # fmt: skip
    n = _nbytes(os.path.join(os.path.abspath(dst.uri), out))
    if n > MAX_PATH_BYTES:
        return f"its output's path in DST would be {n:,} bytes, over the limit of {MAX_PATH_BYTES:,}: {how}"
    return None
