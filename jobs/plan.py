"""Planning a bulk job before any model loads: where SRC and DST are, what each output is called, what is refused
(the rules: `jobs.rules`), as a stream: SRC is listed one folder/prefix at a time and each folder is planned as soon
as it is listed, so the first images are diffused while the listing goes on and the driver holds one folder, not the
job. `plan_job` returns the stream; `Plan.todo` (and `skipped`, `rejected`) gather it for small jobs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from jobs.latent_plan import _latent_inputs
from jobs.manifest import MANIFEST_NAME
from jobs.naming import (
    OUTPUT_EXTENSIONS,
    batch_name,
    latent_key,
    natural_extension,
    output_candidates,
    output_stems,
    sibling_extensions,
)
from jobs.previous import PreviousIndex, has_manifest
from jobs.prompts import _plan_prompts, read_prompts
from jobs.rules import (
    NOT_AN_IMAGE,
    Inputs,
    Plan,
    _refusal,
    _row,
    existing_outputs,
    locations,
    recorded_outputs,
    settle_taken,
    with_non_images,
)
from pipeline.errors import SetupError
from pipeline.imageio import FORMATS, probe
from pipeline.latents import LATENT_EXTENSIONS, is_latent_key
from pipeline.noise import file_seed
from pipeline.storage import Entry, FileInfo, Location, display, is_image_key

__all__ = ["MANIFEST_NAME", "NOT_AN_IMAGE", "OUTPUT_EXTENSIONS", "Plan", "latent_key", "locations",
           "output_candidates", "output_stems", "plan_job", "read_prompts", "recorded_outputs",
           "with_non_images"]  # fmt: skip


def plan_job(cfg) -> Plan:
    """List SRC, name every output, apply --resume; nothing is read or written beyond listings. The rows come as a
    stream (`Plan.items()`); SRC is listed up to its first file before this returns, so a SRC with nothing in it
    fails here (SetupError), before any worker starts."""
    if cfg.flow.takes_prompts:
        return _plan_prompts(cfg)
    src, dst, single = locations(cfg)
    plan = Plan(src, dst, single=single)
    decode = cfg.flow.reads_latents
    if cfg.resume or cfg.in_place or cfg.overwrite or has_manifest(dst):
        plan.previous = PreviousIndex.load(dst)  # kept and added to: the record of what pidray wrote in DST
    stream = _stream(cfg, plan, decode)
    before = []  # files that are not images, planned before the first input (skipped: on record, nothing to do)
    for item in stream:
        before.append(item)
        if item[1].get("error") != NOT_AN_IMAGE:
            break
    else:
        looked = ", ".join(LATENT_EXTENSIONS) if decode else ", ".join(sorted(set(FORMATS)))
        raise SetupError(f"no {'latent files' if decode else 'images'} found under {cfg.src} (looked for {looked})")

    def rest():
        yield from before
        yield from stream

    plan.stream = rest()
    return plan


def _stream(cfg, plan: Plan, decode: bool):
    src, dst = plan.src, plan.dst
    if plan.single is not None:
        folders = iter([("", [plan.single])])
    elif decode:
        folders = src.folders(exclude=dst, hidden=cfg.include_hidden, accept=is_latent_key)
    else:  # one listing; the files that are not images are on record too, as skipped
        listing = src.folders(images_only=False, exclude=dst, hidden=cfg.include_hidden)
        folders = ((folder, with_non_images(entries)) for folder, entries in listing)
    overlap = (not src.is_s3 and not dst.is_s3) or src.below(dst) or dst.below(src)  # local: links can overlap too
    protected = Inputs(src, dst, overlap, only={plan.single.key} if plan.single is not None else None)
    twins = _Twins(src, cfg.suffix, decode, cfg.options.format)
    for folder, listed in folders:
        yield from _plan_folder(cfg, plan, folder, listed, protected, twins, decode)


def _plan_folder(cfg, plan: Plan, folder: str, listed: list[Entry], protected: Inputs, twins, decode: bool):
    """One folder of SRC (its files, sorted by name): every rule of the job applied to it, with the listing of the
    same folder of DST; yields (kind, row) sorted by key within the folder."""
    src, dst = plan.src, plan.dst
    out: list[tuple[str, dict]] = []
    previous, recorded = plan.previous.rows, recorded_outputs(plan.previous)
    existing = existing_outputs(dst, folder) if plan.single is None else existing_outputs(dst, "")
    in_place_outputs = set()
    if cfg.in_place:  # earlier outputs sit beside the inputs: they are not inputs -- when a manifest says so
        in_place_outputs = {e.key for e in listed if PurePosixPath(e.key).stem.endswith(cfg.suffix)
                            and (display(e.key) in recorded or plan.receipt(e.key, FileInfo(e.size, 0.0)))}  # fmt: skip
    candidates = [e for e in listed if not e.skip and e.key not in in_place_outputs]
    for e in listed:
        if e.skip:
            out.append(("skipped", _row(e, "skipped", cfg, error=e.skip, error_kind="skipped")))
        elif e.key in in_place_outputs:
            reason = f"name ends with --suffix {cfg.suffix!r}: the output of an earlier in-place run (in the manifest)"
            out.append(("skipped", _row(e, "skipped", cfg, error=reason, error_kind="skipped", output_key=e.key)))
    protected.add_folder(folder, listed, in_place_outputs)
    # (entry, input key, latent id): one per image, or one per latent of a latent file (a batch file: several)
    inputs = [(e, e.key, "") for e in candidates]
    if decode:
        inputs, unreadable = _latent_inputs(src, candidates)
        out += [("rejected", _row(e, "failed", cfg, error=f"plan: {why}", error_kind=kind))
                for e, (kind, why) in unreadable]  # fmt: skip
    names = {k: (batch_name(e.key, i) if i else e.key) for e, k, i in inputs}
    order = sorted(((k, n) for k, n in names.items()), key=lambda kn: (kn[1], kn[0]))
    stems = output_stems(order, cfg.suffix, cfg.options.format, twins.taken(folder))
    theirs = sibling_extensions(names, stems, cfg.options.format)  # x.jpg's output is never taken for x.png's
    if plan.single is not None and getattr(cfg, "output_name", "") and len(stems) == 1:  # DST named the output
        stems = {k: cfg.output_name for k in stems}
    unknown = []  # (row, input key, output key) of outputs found by --resume whose sizes are not on record
    for e, key, latent_id in inputs:
        seed = file_seed(cfg.options.seed, key)
        stem = stems[key]
        row = {"key": key, "seed": seed, "in_bytes": e.size, "output_stem": stem}
        if key != e.key:  # a latent of a batch file, or a latent file's name written with escapes: the file to read
            row["src_key"] = e.key
        if latent_id:
            row["latent_id"] = latent_id
        if decode:
            row.update(cfg.latent_fields())
        if e.note:
            row["notes"] = [e.note]
        if key in cfg.captions:
            row["caption"] = cfg.captions[key]
        reason = _refusal(e, stem, cfg, dst, protected)
        if reason:
            out.append(("rejected", _row(e, "failed", cfg, key=key, error=f"plan: {reason[1]}",
                                         error_kind=reason[0])))  # fmt: skip
            continue
        if theirs.get(key):
            row["theirs"] = theirs[key]
        hits = [c for c in output_candidates(stem, cfg.options.format, theirs.get(key, ())) if c in existing]
        if hits:
            failed, skipped = _row(e, "failed", cfg, key=key, seed=seed), _row(e, "skipped", cfg, key=key, seed=seed)
            kind, got = settle_taken(plan, cfg, hits, existing, previous.get(key), recorded, failed, skipped)
            if kind != "replace":
                out.append((kind, got))
                if kind == "skipped" and got["out_h"] < 0:
                    unknown.append((got, e.key, next(h for h in hits if display(h) == got["output_key"])))
                continue
            row["replace"] = got
        out.append(("todo", row))
    _fill_sizes(unknown, src, dst)
    out.sort(key=lambda kr: kr[1]["key"])
    yield from out


class _Twins:
    """Folders whose keys differ only in case (`A/` and `a/`) are planned apart; outputs are unique ignoring case,
    so a folder with an earlier twin avoids the stems its twin gave out (its names are read again: one listing)."""

    def __init__(self, src: Location, suffix: str, decode: bool, fmt: str | None = None):
        self.src, self.suffix, self.decode, self.fmt = src, suffix, decode, fmt
        self.seen: dict[str, list[str]] = {}  # casefolded folder key -> the folder keys planned with it

    def taken(self, folder: str) -> set[str]:
        fold = folder.casefold()
        earlier = self.seen.setdefault(fold, [])
        taken: set[str] = set()
        for twin in earlier if folder not in earlier else ():
            keys = sorted(k for k in self.src.names(twin) if self.decode or is_image_key(k))
            stems = output_stems([(k, k) for k in keys], self.suffix, self.fmt)
            taken |= {(stems[k] + natural_extension(k, self.fmt)).casefold() for k in keys}
        if folder not in earlier:
            earlier.append(folder)
        return taken


def _fill_sizes(items: list[tuple[dict, str, str]], src: Location, dst: Location) -> None:
    """Input and output sizes of outputs found by --resume without a manifest row, from the files' headers."""

    def fill(item):
        row, key, out = item
        for loc, k, names in ((src, key, ("in_h", "in_w")), (dst, out, ("out_h", "out_w"))):
            try:
                try:
                    h, w = probe(loc.read(k, 1 << 20), max_pixels=1 << 62)
                except ValueError:  # the header runs past the first MiB (a large ICC profile): read it all
                    h, w = probe(loc.read(k), max_pixels=1 << 62)
            except Exception:  # unreadable now: the size stays unknown (-1)
                continue
            row[names[0]], row[names[1]] = h, w

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fill, items))
