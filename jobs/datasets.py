"""A bulk job over a dataset: `pidray upscale|decode SRC DST --dataset webdataset|parquet`, before anything runs.

SRC is a WebDataset shard (`.tar`) or a Parquet table, or a folder of them; without `--dataset` a SRC that holds only
`.tar` or only `.parquet` files (a local folder or an S3 prefix) is taken as one (said in one line). Here: the
flags, what is refused up front (options that name files), the listing of SRC's shards (a local folder or an S3
prefix), the check of every table's columns and schema, and what becomes of each shard whose output name is taken in
DST (`settle`): the shard, not the sample, is the unit of output and of resume. Running it: `jobs.dataset_run`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline import receipts
from pipeline.errors import BadParameter, SetupError, storage_failures
from pipeline.storage import FileInfo, display, key_problem

EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
FORMAT_NAMES = {"webdataset": "WebDataset shards", "parquet": "Parquet tables"}


@dataclass(frozen=True)
class DatasetJob:
    """What a dataset job reads: the format, and where each sample's image and caption are."""

    format: str  # "webdataset" or "parquet"
    image_key: str | None = None  # WebDataset: the image member's extension (None: the first of jpg/jpeg/png/webp)
    caption_key: str | None = "txt"  # WebDataset: `txt`, `json:FIELD`
    image_column: str = "image"  # Parquet
    caption_column: str | None = None  # Parquet
    latents: bool = False  # `pidray decode`: the member/column holds a latent file (.safetensors, .npy, .npz bytes)

    @property
    def what(self) -> str:
        return "latent" if self.latents else "image"

    def reader_keys(self) -> tuple[str, ...]:
        """WebDataset: the member extensions looked for when none is named, in order."""
        from pipeline.datasets.webdataset import IMAGE_KEYS, LATENT_KEYS

        return LATENT_KEYS if self.latents else IMAGE_KEYS


def add_dataset_arguments(p, latents: bool = False) -> None:
    """The dataset flags of `pidray upscale` (an image member or column), or with `latents` of `pidray decode` (a
    latent member or column: --latent-key, --latent-column)."""
    d = p.add_argument_group("datasets")
    d.add_argument("--dataset", default=None, choices=sorted(EXTENSIONS),
                   help="SRC holds WebDataset .tar shards or Parquet tables: DST gets shards/tables of the same names "
                        "(default: recognised when SRC holds only .tar or only .parquet files)")  # fmt: skip
    what, exts = ("latent", "safetensors, npy, npz") if latents else ("image", "jpg, jpeg, png, webp")
    d.add_argument(f"--{what}-key", dest="image_key", default=None, metavar="EXT",
                   help=f"WebDataset: the {what} member's extension (default: the first of {exts})")  # fmt: skip
    d.add_argument(
        "--caption-key",
        default="txt",
        metavar="KEY",
        help="WebDataset: the caption member, txt or json:FIELD (json:a.b for a nested field)",
    )
    d.add_argument(f"--{what}-column", dest="image_column", default=what, metavar="NAME",
                   help=f"Parquet: the {what} column (binary, or a struct of bytes and path)")  # fmt: skip
    d.add_argument("--caption-column", default=None, metavar="NAME", help="Parquet: the caption column (text)")
    p.set_defaults(dataset_latents=latents)


def dataset_of(args, note=None) -> DatasetJob | None:
    """The dataset job the arguments ask for (named by --dataset, or recognised from SRC and said through `note`),
    or None for a job over files."""
    fmt = getattr(args, "dataset", None)
    if fmt is None and not getattr(args, "in_place", False):
        fmt = detect(args.src, args.dst, _s3_of(args))
        if fmt and note:
            note(f"pidray: {args.src} holds only {EXTENSIONS[fmt]} files: reading them as {FORMAT_NAMES[fmt]} "
                 f"(--dataset {fmt})")  # fmt: skip
    latents = bool(getattr(args, "dataset_latents", False))
    what = "latent" if latents else "image"
    if fmt is None:
        named = [f for f, v in ((f"--{what}-key", args.image_key), ("--caption-column", args.caption_column)) if v]
        if named or args.caption_key != "txt" or args.image_column != what:
            raise BadParameter(f"{(named or [f'--caption-key/--{what}-column'])[0]} is for a dataset job: SRC holds "
                               "other files than .tar or .parquet ones; name the format with --dataset")  # fmt: skip
        return None
    caption_key = None if args.caption_key in ("", "none") else args.caption_key
    if fmt == "webdataset":
        from pipeline.datasets.webdataset import parse_caption_key

        parse_caption_key(caption_key)  # a malformed key is refused here, before anything runs
    return DatasetJob(fmt, args.image_key, caption_key, args.image_column, args.caption_column, latents)


def refuse(cfg) -> None:
    """What a dataset job does not do, each in one line, before anything runs."""
    for flag, value in (("--in-place", cfg.in_place), ("--suffix", cfg.suffix), ("--captions", cfg.captions),
                        ("--manifest", cfg.manifest)):  # fmt: skip
        if value:
            raise SetupError(f"{flag} is for a job over image files: a dataset job writes shards or tables of the "
                             "same names into DST, with each sample's own caption")  # fmt: skip


def detect(src: str, dst: str, s3=None) -> str | None:
    """The format SRC holds when it is a .tar/.parquet file (or S3 object) or a folder (prefix) of only such files
    (hidden files and DST aside; the first other file ends the look); None otherwise."""
    if src.startswith("s3://"):
        return _detect_s3(src, dst, s3)
    if "://" in src:
        return None
    p = Path(src)
    if p.is_file():
        return _format_of(p.name)
    if not p.is_dir():
        return None
    found = set()
    for rel in _walk(p, dst, hidden=False, follow=False):
        fmt = _format_of(rel)
        if fmt is None:
            return None
        found.add(fmt)
        if len(found) > 1:
            return None
    return found.pop() if found else None


def _detect_s3(src: str, dst: str, s3) -> str | None:
    from pipeline.storage import Location, S3Settings

    s3 = s3 or S3Settings()
    found = set()
    try:
        loc = Location(src, s3)
        single = loc.single()
        if single is not None:
            return _format_of(single[1].key)
        for _, entries in loc.folders(images_only=False, exclude=Location(dst, s3)):
            for e in entries:
                if e.skip or e.folder:
                    continue
                found.add(_format_of(e.key))
                if None in found or len(found) > 1:
                    return None
    except storage_failures():  # SRC cannot be listed: the job's own checks say why, in one line
        return None
    return found.pop() if found else None


def _s3_of(args):
    from pipeline.storage import S3Settings

    if not str(getattr(args, "src", "")).startswith("s3://"):
        return None
    a = {k: getattr(args, f"s3_{k}", None) for k in ("endpoint", "region", "profile", "retry_mode")}
    return S3Settings(a["endpoint"], a["region"], a["profile"], a["retry_mode"] or "standard")


def source(root: str, follow: bool, s3=None):
    """SRC's folder or S3 prefix as a location: its shards and tables are opened through it (`LocalLocation.open`:
    only a regular file is read, never a named pipe, socket or device with a shard's name; a link only with
    --follow-symlinks; on S3 a GET). A local folder is made absolute: Ray's workers open it too."""
    from pipeline.storage import Location, S3Settings

    if not root.startswith("s3://"):
        root = os.path.abspath(root)
    return Location(root, s3 or S3Settings(), follow_symlinks=follow)


def _format_of(name: str) -> str | None:
    return next((f for f, ext in EXTENSIONS.items() if name.lower().endswith(ext)), None)


def _walk(root: Path, dst: str, hidden: bool, follow: bool):
    """SRC's files, relative, sorted folder by folder: DST (when inside SRC) and, unless `hidden`, names starting
    with '.' left out; links to files taken only when `follow`, links to folders never entered."""
    from jobs.manifest import MANIFEST_NAME as manifest_name

    skip = os.path.realpath(dst)
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if (hidden or not d.startswith("."))
                         and os.path.realpath(os.path.join(folder, d)) != skip)  # fmt: skip
        rel_folder = os.path.relpath(folder, root)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if (name.startswith(".") and not hidden) or (os.path.islink(path) and not follow):
                continue
            if name == manifest_name and os.path.realpath(folder) == skip:
                continue
            yield name if rel_folder == "." else f"{PurePosixPath(Path(rel_folder))}/{name}"


def list_shards(cfg, ds: DatasetJob) -> tuple[str, list[str], list[str]]:
    """(SRC's folder or prefix, the shards or tables in it as relative keys, the other files); refuses DST = SRC."""
    if str(cfg.src).startswith("s3://"):
        return _list_s3(cfg, ds)
    src = Path(cfg.src)
    if not str(cfg.dst).startswith("s3://") and \
            os.path.realpath(cfg.dst) == os.path.realpath(src if src.is_dir() else src.parent):  # fmt: skip
        raise SetupError(_SAME.format(dst=cfg.dst))
    if src.is_file():
        if _format_of(src.name) != ds.format:
            raise SetupError(f"{cfg.src} is not a {EXTENSIONS[ds.format]} file (--dataset {ds.format})")
        return str(src.parent), [src.name], []
    shards, other = [], []
    for rel in _walk(src, cfg.dst, cfg.include_hidden, cfg.follow_symlinks):
        (shards if _format_of(rel) == ds.format else other).append(rel)
    if not shards:
        raise SetupError(f"no {EXTENSIONS[ds.format]} files found under {cfg.src} (--dataset {ds.format})")
    return str(src), shards, other


_SAME = ("DST {dst} is SRC's folder: a dataset job writes shards or tables of the same names, which would be the "
         "inputs; choose another DST")  # fmt: skip


def _list_s3(cfg, ds: DatasetJob) -> tuple[str, list[str], list[str]]:
    """An S3 SRC: one object, or every object below the prefix (DST left out when it lies inside; names starting
    with '.' left out unless --include-hidden), listed a prefix at a time."""
    from pipeline.storage import Location

    src, dst = Location(cfg.src, cfg.s3), Location(cfg.dst, cfg.s3)
    single = src.single()
    if single is not None:
        folder, entry = single
        if _format_of(entry.key) != ds.format:
            raise SetupError(f"{cfg.src} is not a {EXTENSIONS[ds.format]} object (--dataset {ds.format})")
        src, keys = folder, [entry.key]
    if dst.is_s3 and dst.real == src.real:
        raise SetupError(_SAME.format(dst=cfg.dst))
    if single is not None:
        return src.uri, keys, []
    shards, other = [], []
    for _, entries in src.folders(images_only=False, exclude=dst, hidden=cfg.include_hidden):
        for e in entries:
            if e.skip or e.folder:
                continue
            (shards if _format_of(e.key) == ds.format else other).append(e.key)
    if not shards:
        raise SetupError(f"no {EXTENSIONS[ds.format]} objects found under {cfg.src} (--dataset {ds.format})")
    return src.uri, shards, other


def check_tables(root: str, tables: list[str], ds: DatasetJob, follow: bool = False, s3=None) -> None:
    """Every table's columns usable and one schema for all, read from their footers (on S3 by ranged GETs): one line
    otherwise."""
    import pyarrow.parquet as pq

    from pipeline.datasets.parquet import check_columns, check_same_schema, read_footer_length

    schemas, src = [], source(root, follow, s3)
    for rel in tables:
        try:
            with src.open(rel) as f:
                read_footer_length(f)
                schema = pq.ParquetFile(f).schema_arrow
        except (OSError, ValueError) as e:
            raise SetupError(f"{display(rel)}: {e}") from None
        except Exception as e:  # a footer pyarrow cannot read (it raises many types): the job does not start, in words
            raise SetupError(f"{display(rel)}: not a readable Parquet file ({e})") from None
        try:
            check_columns(schema, display(rel), ds.image_column, ds.caption_column, ds.what)
        except ValueError as e:
            raise SetupError(str(e)) from None
        schemas.append((display(rel), schema))
    try:
        check_same_schema(schemas)
    except ValueError as e:
        raise SetupError(str(e)) from None


class Outputs:
    """What is at each shard's output name in DST, and whether a pidray job is proven to have written it: the
    shard's own row in DST's manifest (key = the shard's name, its proof and size), or a receipt."""

    def __init__(self, dst, previous):
        self.dst, self.previous = dst, previous
        self._listings: dict[str, dict[str, FileInfo]] = {}
        self._receipts: dict | None = None

    def found(self, rel: str) -> FileInfo | None:
        folder = rel.rpartition("/")[0]
        if folder not in self._listings:
            try:
                self._listings[folder] = self.dst.files(folder)
            except storage_failures():  # DST (or that folder) does not exist yet
                self._listings[folder] = {}
        return self._listings[folder].get(rel)

    def proof(self, rel: str, found: FileInfo) -> dict | None:
        """The manifest fields that prove the file at `rel` is a pidray job's output (`written_by`, `out_bytes`)."""
        row = self.previous.rows.get(rel)
        from jobs.manifest import proof
        from jobs.rules import proven  # the bulk job's own proof (it loads the job's modules: not at parse time)

        if row is not None and proven(rel, row, found):
            return {"written_by": row.get("written_by") or "earlier", "out_bytes": found.size}
        if row is not None and proof(row):
            return None  # the row that names it says otherwise (changed since, not a regular file)
        if self.dst.is_s3:  # the object's own metadata: the id of the job that wrote it, and its key here
            job = receipts.s3_job(self.dst, rel)
            return {"written_by": job, "out_bytes": found.size} if job else None
        if self._receipts is None:
            self._receipts = receipts.read(self.dst)
        job, size = self._receipts.get(rel, ("", -1))
        return {"written_by": job, "out_bytes": size} if job and found.regular and size == found.size else None


def settle(cfg, outputs: Outputs, rel: str) -> tuple[str, dict | None]:
    """What becomes of shard `rel`: ("todo" | "replace" | "skipped" | "earlier" | "rejected", proof or reason)."""
    problem = key_problem(rel)
    if problem:
        return "rejected", {"error": f"plan: {problem}", "error_kind": "bad_input"}
    found = outputs.found(rel)
    if found is None:
        return "todo", None
    by = outputs.proof(rel, found)
    if by is not None:
        return ("skipped" if cfg.resume else "replace" if cfg.overwrite else "earlier"), by
    what = ("is in DST but is not a regular file" if not found.regular
            else "already exists in DST and was not written by pidray (no manifest row, no receipt)")  # fmt: skip
    return "rejected", {
        "error": f"plan: its output {display(rel)!r} {what}: it is kept, and neither --resume nor "
        "--overwrite touches it; move it away or choose another DST",
        "error_kind": "exists",
    }
