"""The rules that keep user data safe when a bulk job is planned: each decided from one folder/prefix of SRC and the
same folder of DST, so a listing of millions of files is planned as it streams.

- DST equal to SRC is refused, unless `--in-place` with a `--suffix` (a single file's own folder needs the suffix);
- DST inside SRC is left out of SRC's listing, so a later run never takes its own outputs as inputs;
- every output key is proven safe (no absolute path, no empty/'.'/'..' segment) or its input fails with the reason;
- no output may be an input: an input whose output could overwrite any input fails instead (`Inputs`);
- outputs are unique: inputs that would share a name (a.png, a.gif, a.bmp -> a.png) keep their source extension in
  the name (a.gif.png, a.bmp.png), and a leftover clash gets a counter; decided from the folder's listing alone, so
  a resumed run names every output the same way;
- no output replaces a file already in DST: from the listing of its DST folder, an input whose output name is taken
  fails with the reason (--resume keeps the file as its output instead); --overwrite replaces only files that DST's
  pidray manifest records as outputs of a pidray job, and the write itself refuses a file that appears after
  planning.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from jobs.manifest import Previous, manifest_row, proof
from jobs.naming import output_candidates, output_name_problem
from pipeline import receipts
from pipeline.errors import SetupError
from pipeline.imageio import probe
from pipeline.storage import MAX_INPUT_BYTES, Entry, FileInfo, Location, display, key_problem


class Plan:
    """A planned job: SRC, DST, and its rows as a stream (`items()`: ("todo", stage row), ("skipped" or "rejected",
    manifest row)), one folder of SRC at a time. `todo`, `skipped` and `rejected` gather the whole stream into
    lists (for small jobs and tests; a large job never asks). previous: the manifest found at DST."""

    def __init__(self, src: Location, dst: Location, single: Entry | None = None, stream=None):
        self.src, self.dst, self.single = src, dst, single  # single: SRC named one file, this entry of `src`
        self.previous = Previous()
        self.stream = stream  # an iterator of (kind, row), or None once gathered
        self.lists: dict[str, list[dict]] = {"todo": [], "skipped": [], "rejected": []}
        self._receipts: dict[str, tuple[str, int]] | None = None  # DST's receipts, read when first needed

    def add(self, kind: str, row: dict) -> None:
        self.lists[kind].append(row)

    def receipt(self, hit: str, found: FileInfo) -> dict | None:
        """The proof that a pidray job wrote the file `hit` of DST when no manifest row carries it (a job stopped
        before its manifest's next part): its receipt (pipeline/receipts.py), for a regular file of the size it
        wrote. -> the manifest fields that keep that proof, or None."""
        if not found.regular:
            return None
        if self.dst.is_s3:
            job = receipts.s3_job(self.dst, hit)
            return {"written_by": job, "out_bytes": found.size} if job else None
        if self._receipts is None:
            self._receipts = receipts.read(self.dst)
        job, size = self._receipts.get(hit, ("", -1))
        return {"written_by": job, "out_bytes": size} if job and size == found.size else None

    def items(self):
        """Every row once, as planned (the rows gathered so far, then the rest of the stream)."""
        for kind in ("rejected", "skipped", "todo"):
            for row in self.lists[kind]:
                yield kind, row
        self.lists = {"todo": [], "skipped": [], "rejected": []}
        stream, self.stream = self.stream, None
        if stream is not None:
            yield from stream

    def _gathered(self, kind: str) -> list[dict]:
        if self.stream is not None:
            for k, row in self.stream:
                self.lists[k].append(row)
            self.stream = None
        return self.lists[kind]

    @property
    def todo(self) -> list[dict]:
        return self._gathered("todo")

    @property
    def skipped(self) -> list[dict]:
        return self._gathered("skipped")

    @property
    def rejected(self) -> list[dict]:
        return self._gathered("rejected")


def existing_outputs(dst: Location, folder: str) -> dict[str, FileInfo]:
    """The files in one folder of DST (key -> size, time, regular), from one listing of it: an output name that is
    taken is kept as this input's output by --resume, or replaced by --overwrite, only when it is proven pidray's
    own (`proven`); otherwise its input fails with the reason."""
    try:
        return dst.files(folder)
    except SetupError:  # DST does not exist yet: nothing done
        return {}


def proven(hit: str, row: dict | None, found: FileInfo | None, dst: Location | None = None) -> bool:
    """Whether the file `hit` found in DST is the output a pidray job wrote, as `row` (the input's row in DST's
    manifest, or the row recording that output) proves: the row names it, and it is still a regular file of the
    size that job wrote (a link, a FIFO, or a file replaced since by another of a different size is not). A row with
    no size on record (an older pidray's manifest, a damaged row) proves it only when the image in `dst` has the
    height and width the row records, read from its header."""
    if found is None or not found.regular or proof(row) != display(hit):
        return False
    wrote = row.get("out_bytes")
    if type(wrote) is int and wrote >= 0:
        return wrote == found.size
    h, w = row.get("out_h"), row.get("out_w")
    if dst is None or type(h) is not int or type(w) is not int or h <= 0 or w <= 0:
        return False
    try:
        return probe(dst.read(hit, 1 << 20), max_pixels=1 << 62) == (h, w)
    except Exception:  # not an image (any more), a header past its first MiB, unreadable: not proven
        return False


def locations(cfg) -> tuple[Location, Location, Entry | None]:
    """(SRC as a folder/prefix, DST, the entry when SRC names a single file); refuses SRC == DST up front."""
    src, dst = Location(cfg.src, cfg.s3, cfg.follow_symlinks), Location(cfg.dst, cfg.s3)
    single = src.single()
    entry = None
    if single is not None:
        src, entry = single
    prompts = cfg.flow.takes_prompts  # the input is one prompt file, not images
    renamed = entry is not None and getattr(cfg, "output_name", "")  # DST names the output file: never SRC (below)
    if dst.real == src.real and not prompts and not renamed:  # a prompt file's own folder: outputs are named anew
        if not cfg.suffix:
            what, how = ("the folder of SRC", "--suffix _x4") if entry else ("SRC", "--in-place --suffix _x4")
            raise SetupError(
                f"DST {cfg.dst} is {what}: the outputs would overwrite the inputs. Choose another DST, or keep both "
                f"side by side with {how}"
            )
        if entry is None and not cfg.in_place:
            raise SetupError(
                f"DST {cfg.dst} is SRC: pass --in-place (with --suffix {cfg.suffix}) to write the outputs next to the "
                "inputs; no input is ever overwritten"
            )
    elif cfg.in_place:
        raise SetupError("--in-place writes next to the inputs, so DST must be SRC")
    return src, dst, entry


NOT_AN_IMAGE = "not an image"


def with_non_images(entries: list[Entry]) -> list[Entry]:
    """A listing of every file in a folder of SRC -> the images (and unreadable folders), plus each other file
    marked skipped as "not an image" (notes.txt, a name without an extension); never pidray's own files, and hidden
    files that are not images stay out as before."""
    from pipeline.storage import RESERVED_PREFIX, is_hidden, is_image_key

    out = []
    for e in entries:
        if e.folder or e.key.startswith(RESERVED_PREFIX):
            if e.folder:
                out.append(e)
            continue
        if is_image_key(e.key):
            out.append(e)
        elif not e.skip:
            out.append(Entry(e.key, e.size, skip=NOT_AN_IMAGE))
        elif not is_hidden(e.key):  # a FIFO or a link: on record with its reason; a hidden file (.DS_Store) is not
            out.append(e)
    return out


def _row(entry: Entry, status: str, cfg, **kw) -> dict:
    return manifest_row({"key": entry.key, "status": status, "in_bytes": entry.size, **kw}, cfg.model.preset)


def _refusal(e: Entry, stem: str, cfg, dst: Location, protected: Inputs) -> tuple[str, str] | None:
    """(kind, reason) when this input must not be processed, else None."""
    problem = key_problem(e.key, s3=dst.is_s3)
    if problem:
        return "bad_input", problem
    if e.size > MAX_INPUT_BYTES:
        return "too_large", f"file is {e.size:,} bytes, over the limit of {MAX_INPUT_BYTES:,}"
    problem = output_name_problem(stem, cfg.options.format, dst)
    if problem:
        return "bad_input", problem
    for out in output_candidates(stem, cfg.options.format) if protected else ():
        if protected.hit(out):
            return "bad_input", f"its output {display(out)!r} would overwrite an input; choose another DST or --suffix"
    return None


def recorded_outputs(previous):
    """The outputs (printable keys) that DST's manifest says a pidray job wrote, with the rows that say so:
    `name in recorded`, `recorded.get(name)`, `recorded.all(name)` (the on-disk index's `outputs`, or the same
    for a manifest in memory)."""
    if hasattr(previous, "outputs"):
        return previous.outputs
    out = _Recorded()
    for r in previous.rows.values():
        if proof(r):
            out.setdefault(proof(r), []).append(r)
    return out


class _Recorded(dict):
    """output name -> the rows naming it, asked as the on-disk index is (`get`: the first; `all`)."""

    def get(self, name, default=None):
        rows = super().get(name)
        return rows[0] if rows else default

    def all(self, name) -> list[dict]:
        return super().get(name, [])


def _taken(hits: list[str], ours: dict[str, dict], cfg, why_not) -> tuple[str, str] | None:
    """(the existing output's key, why the input fails) when files at its output names may not be replaced; None
    when --overwrite may replace them all. ours: the hits proven outputs of a pidray job (-> the proof); why_not:
    hit -> why it is not proven one (`_not_ours`)."""
    theirs = [h for h in hits if h not in ours]
    hit = (theirs or hits)[0]
    name = display(hit)
    if not theirs and cfg.overwrite:
        return None
    if not theirs:
        return hit, (f"its output {name!r} already exists in DST (an earlier pidray job wrote it, as DST's manifest "
                     "records): --resume keeps it, --overwrite replaces it")  # fmt: skip
    flags = "--overwrite does not replace it" if cfg.overwrite else "neither --resume nor --overwrite touches it"
    return hit, (f"its output {name!r} {why_not(hit)}, so {flags} (they keep or replace only outputs a pidray job "
                 "wrote): it is kept; move it away, or choose another DST or --suffix")  # fmt: skip


def _not_ours(found: FileInfo, name: str, row: dict | None) -> str:
    """Why the file `name` found in DST is not proven an output of a pidray job (`proven`), for a message."""
    if not found.regular:
        return "is in DST but is not a regular file (a link, a FIFO, a device)"
    if proof(row) == name:
        return (f"already exists in DST and was changed since a pidray job wrote it ({found.size:,} bytes now, "
                f"{row.get('out_bytes'):,} then)")  # fmt: skip
    return "already exists in DST and was not written by pidray (no row of DST's manifest records it, no receipt)"


def _exists_row(row: dict, taken: tuple[str, str], ours: dict[str, dict]) -> dict:
    """The manifest row of an input refused because its output name is taken. When the file there is pidray's own
    output, the row still names it with its proof, so the manifest keeps recording it as one (a later --overwrite
    may replace it)."""
    hit, reason = taken
    row = {**row, "error": f"plan: {reason}", "error_kind": "exists"}
    if hit in ours:
        row.update(output_key=display(hit), **ours[hit])
    return row


def settle_taken(
    plan: Plan,
    cfg,
    hits: list[str],
    existing: dict[str, FileInfo],
    prev: dict | None,
    recorded,
    failed: dict,
    skipped: dict,
    line: str = "",
) -> tuple[str, dict | list[str]]:
    """What becomes of an input whose output names `hits` are taken in DST (by the rules above):
    ("skipped", its row: --resume keeps a proven output), ("rejected", its failed row), or ("replace", the hits
    --overwrite may replace). prev: the input's row in DST's manifest; failed/skipped: its rows to build on; line:
    said before the reason ("line 3: " of a prompt file)."""
    dst = plan.dst
    # DST named this one output file: the user named the very file, so --resume keeps and --overwrite replaces it
    # (a regular file only), whoever wrote it
    named = plan.single is not None and bool(getattr(cfg, "output_name", "")) and existing[hits[0]].regular
    if cfg.resume and named and not proven(hits[0], prev, existing[hits[0]], dst):
        return "skipped", {**skipped, "output_key": display(hits[0]), "error": "DST names this file, which exists: "
                           "--resume keeps it as it is", "error_kind": "skipped"}  # fmt: skip
    if cfg.resume:  # kept only when proven pidray's: this input's manifest row, or (where no row claims it) a receipt
        hit = next((h for h in hits if proven(h, prev, existing[h], dst)), None)
        base = prev
        if hit is None:
            unclaimed = [h for h in hits if proof(prev) != display(h) and not recorded.all(display(h))]
            hit, by = next(((h, by) for h in unclaimed if (by := plan.receipt(h, existing[h]))), (None, None))
            base = {**skipped, **(by or {})}
        if hit is None:
            row = _unproven_row(failed, hits, existing, prev)
            return "rejected", {**row, "error": row["error"].replace("plan: ", f"plan: {line}", 1)}
        return "skipped", already_done(base, display(hit))
    ours = {}  # the hits proven pidray's -> the proof, carried into the input's row
    for h in hits:
        rows = recorded.all(display(h))  # every row that names it (an input renamed since leaves an older one)
        by = next((r for r in rows if proven(h, r, existing[h], dst)), None)
        if by is not None:
            ours[h] = {"written_by": by.get("written_by") or "earlier", "out_bytes": existing[h].size}
        elif not rows and (proof_of := plan.receipt(h, existing[h])):  # a row that names it and fails decides
            ours[h] = proof_of
        elif named:
            ours[h] = {}
    taken = _taken(hits, ours, cfg, lambda h: _not_ours(existing[h], display(h), recorded.get(display(h)) or prev))
    if taken is not None:
        return "rejected", _exists_row(failed, (taken[0], f"{line}{taken[1]}"), ours)
    # --overwrite: each of these is an output a pidray job wrote, replaced only while it is still the file planned
    return "replace", {h: existing[h].identity() for h in hits}


DONE_EARLIER = "done by an earlier run (kept by --resume)"


def already_done(base: dict, output_key: str) -> dict:
    """The row of an input whose output an earlier run wrote, carried into this run's manifest as it was: `ok`,
    with its sizes, timings and proof, and a note saying so; the manifest describes the whole job, not the last run.
    (A job's summary counts these as skipped: this run did nothing for them.)"""
    notes = base.get("notes") or ""
    if DONE_EARLIER not in notes:
        notes = f"{notes}; {DONE_EARLIER}" if notes else DONE_EARLIER
    return {**base, "status": "ok", "error": "", "error_kind": "", "output_key": output_key, "notes": notes}


def _unproven_row(row: dict, hits: list[str], existing: dict[str, FileInfo], prev: dict | None) -> dict:
    """The manifest row of an input --resume cannot finish: a file is at its output name, and nothing proves a
    pidray job wrote it (the input's manifest row, or a receipt), so it is neither kept as the output nor replaced."""
    name = display(hits[0])
    why = _not_ours(existing[hits[0]], name, prev)
    return {**row, "error": f"plan: its output {name!r} {why}, so --resume does not keep it as this input's output "
            "(it keeps only outputs a pidray job wrote): it is kept as it is; move it away, or choose another DST "
            "or --suffix", "error_kind": "exists"}  # fmt: skip


class Inputs:
    """Which output keys would land on an input of SRC, asked one output at a time (`hit`) from the output's own
    folder: its real path is compared with SRC's, and an output inside SRC with the listing of that one folder
    (a few folders' listings cached), never with a set of every input. Inputs reached through links (a followed
    link, or one left out, which still names a file) are remembered by their targets, one per link. False when SRC
    and DST cannot overlap (two S3 prefixes apart)."""

    def __init__(self, src: Location, dst: Location, active: bool, only: set[str] | None = None):
        self.src, self.dst, self.active = src, dst, active
        self.only = only  # SRC named one file: that file is the only input (its folder's others are not)
        self.src_real = src.real.rstrip("/")
        inside = dst.real != src.real and dst.below(src)
        self.excluded = dst.real.rstrip("/") + "/" if inside else None  # DST inside SRC: never listed as input
        self.targets: set[str] = set()  # real paths of inputs named through links
        self.linked: dict[str, str] = {}  # the real path of a folder reached through a link -> its key in SRC
        self._names: OrderedDict[str, set[str]] = OrderedDict()
        self._folder: tuple[str, str] = ("\0", "")  # (DST folder key, its real path)
        self.not_inputs: set[str] = frozenset()

    def __bool__(self) -> bool:
        return self.active

    def add_folder(self, folder: str, entries: list[Entry], not_inputs: set[str] = frozenset()) -> None:
        """A folder of SRC as it is planned: the targets of its links, where it really is, and its files that are
        not inputs (the outputs of an earlier in-place run, as DST's manifest records them)."""
        self.not_inputs = not_inputs
        if not self.active:
            return
        for e in entries:
            if e.target:
                self.targets.add(e.target)
        if not self.src.is_s3 and folder:
            real = os.path.realpath(os.path.join(self.src.uri, folder))
            if real != f"{self.src_real}/{folder}":
                self.linked[real] = folder

    def hit(self, out: str) -> bool:
        parent, _, name = out.rpartition("/")
        if self.dst.is_s3:
            ident = self.dst.identity(out)
        else:
            if self._folder[0] != parent:
                self._folder = (parent, os.path.realpath(os.path.join(self.dst.uri, parent)))
            ident = f"{self._folder[1]}/{name}"
            if os.path.islink(ident):  # a link at the output's name: what it points to
                ident = os.path.realpath(ident)
        if ident in self.targets:
            return True
        if self.excluded and ident.startswith(self.excluded):
            return False
        real_parent, _, name = ident.rpartition("/")
        if real_parent in self.linked:
            return f"{self.linked[real_parent]}/{name}" in self._listing(self.linked[real_parent])
        if ident.startswith(self.src_real + "/"):
            rel_parent = real_parent[len(self.src_real) + 1 :] if real_parent != self.src_real else ""
            key = f"{rel_parent}/{name}" if rel_parent else name
            return key in self._listing(rel_parent) and key not in self.not_inputs
        return False

    def _listing(self, folder: str) -> set[str]:
        if self.only is not None:
            return self.only
        if folder not in self._names:
            self._names[folder] = self.src.names(folder)
            if len(self._names) > 8:
                self._names.popitem(last=False)
        return self._names[folder]
