"""`pidray upscale one.png big.png`: when SRC is one file and DST names an image file, the output is that file.

The job itself only knows folders: DST becomes the file's folder, the one output's name (without extension) is
`output_name`, and the format follows DST's extension. Everything else holds as for a folder: an existing file is
never replaced unless pidray wrote it and --overwrite is given, and SRC itself can never be the output.
"""

from __future__ import annotations

import os
import posixpath
import sys
from dataclasses import replace

from pipeline.errors import SetupError, storage_failures
from pipeline.imageio import EXTENSIONS, FORMATS
from pipeline.storage import Location


def _split(dst: str) -> tuple[str, str, str]:
    """DST -> (its folder, the file's stem, its extension without the dot)."""
    if dst.startswith("s3://"):
        parent, _, name = dst.rstrip("/").rpartition("/")
        parent = parent + "/" if parent.count("/") >= 2 else dst  # s3://bucket/name.png: the bucket's root
    else:
        parent, name = os.path.split(dst)
        parent = parent or "."
    stem, ext = posixpath.splitext(name)
    return parent, stem, ext[1:]


def names_a_file(dst: str) -> bool:
    """DST ends in an image extension (png, jpg, ...) and is not an existing folder."""
    if dst.endswith("/") or (not dst.startswith("s3://") and os.path.isdir(dst)):
        return False
    return _split(dst)[2].lower() in FORMATS


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def file_destination(cfg, note=_note):
    """The job config with a file DST turned into (its folder, the output's name, the format); unchanged when DST
    is a folder. A folder SRC with a DST that looks like a file name gets a one-line note: DST is a folder."""
    if not cfg.flow.reads_images or cfg.in_place or not names_a_file(cfg.dst):
        if getattr(cfg, "manifest", ""):
            raise SetupError("--manifest is for one file to one named file; a folder job's manifest is always "
                             "DST/_pidray_manifest.parquet")  # fmt: skip
        return cfg
    try:
        single = Location(cfg.src, cfg.s3).single()
    except storage_failures():  # SRC cannot be looked at now: preflight says why, in its own words
        return cfg
    if single is None:
        if getattr(cfg, "manifest", ""):
            raise SetupError("--manifest is for one file to one named file; a folder job's manifest is always "
                             "DST/_pidray_manifest.parquet")  # fmt: skip
        note(f"pidray: note: SRC {cfg.src} is a folder, so DST {cfg.dst} is the folder its outputs go into")
        return cfg
    if not cfg.dst.startswith("s3://") and os.path.realpath(cfg.dst) == os.path.realpath(cfg.src):
        raise SetupError(f"DST {cfg.dst} is SRC: the output would overwrite the input; name another file")
    parent, stem, ext = _split(cfg.dst)
    fmt = FORMATS[ext.lower()]
    if cfg.options.format and FORMATS.get(cfg.options.format.lower().lstrip(".")) != fmt:
        raise SetupError(f"DST {cfg.dst} is a {fmt} file name but -f {cfg.options.format} asks for another format; "
                         "drop -f or change DST's extension")  # fmt: skip
    if cfg.suffix:
        raise SetupError(f"DST {cfg.dst} names the output file itself: --suffix does not apply")
    if not stem or stem in (".", ".."):
        raise SetupError(f"DST {cfg.dst}: the output file needs a name before the extension")
    manifest = getattr(cfg, "manifest", "")
    if manifest and (os.path.lexists(manifest) or not os.path.isdir(os.path.dirname(os.path.abspath(manifest)))):
        what = "exists (pidray never writes over a file)" if os.path.lexists(manifest) else "is in no folder there is"
        raise SetupError(f"--manifest {manifest} {what}: name a new file")
    if EXTENSIONS[fmt] != f".{ext}":
        note(f"pidray: note: {fmt} outputs are named {EXTENSIONS[fmt]}: writing {stem}{EXTENSIONS[fmt]} in {parent}")
    return cfg.with_(dst=parent, output_name=stem, options=replace(cfg.options, format=ext.lower()))
