"""Planning a bulk job before any model loads: where SRC and DST are, what each output is called, what is refused.

The rules that keep user data safe live here:
- DST equal to SRC is refused, unless `--in-place` with a `--suffix` (a single file's own folder needs the suffix);
- DST inside SRC is left out of SRC's listing, so a later run never takes its own outputs as inputs;
- every output key is proven safe (no absolute path, no empty/'.'/'..' segment) or its input fails with the reason;
- no output may be an input: an input whose output could overwrite any listed input fails instead;
- outputs are unique: inputs that would share a name (a.png, a.gif, a.bmp -> a.png) keep their source extension in
  the name (a.gif.png, a.bmp.png), and a leftover clash gets a counter; decided from the listing alone, so a
  resumed run names every output the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from jobs.manifest import MANIFEST_NAME, load_manifest, manifest_row
from pipeline.errors import SetupError
from pipeline.imageio import EXTENSIONS, FORMATS, probe
from pipeline.latents import LATENT_EXTENSIONS, header_ids, is_latent_key, npz_ids
from pipeline.noise import file_seed
from pipeline.stages.common import resolve
from pipeline.storage import Entry, Location, display, key_problem

MAX_INPUT_BYTES = 1 << 30  # a file larger than this is refused before it is read (no image we take is that big)
OUTPUT_EXTENSIONS = sorted(set(EXTENSIONS.values()))


@dataclass
class Plan:
    src: Location
    dst: Location
    todo: list[dict] = field(default_factory=list)  # rows to process
    skipped: list[dict] = field(default_factory=list)  # manifest rows: done already (--resume), hidden, links
    rejected: list[dict] = field(default_factory=list)  # manifest rows failed at planning, with the reason
    single: Entry | None = None  # SRC named one file/object: this entry of `src` is the whole listing


def locations(cfg) -> tuple[Location, Location, Entry | None]:
    """(SRC as a folder/prefix, DST, the entry when SRC names a single file); refuses SRC == DST up front."""
    src, dst = Location(cfg.src, cfg.s3, cfg.follow_symlinks), Location(cfg.dst, cfg.s3)
    single = src.single()
    entry = None
    if single is not None:
        src, entry = single
    if dst.real == src.real:
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


def output_stems(keys: list[str], suffix: str) -> dict[str, str]:
    """key -> output key without its extension, unique (ignoring case) across the job."""
    plain = {}
    for k in keys:
        p = PurePosixPath(k)
        parent = "" if str(p.parent) == "." else f"{p.parent}/"
        plain[k] = f"{parent}{p.stem}{suffix}"
    groups = defaultdict(list)
    for k, s in plain.items():
        groups[s.casefold()].append(k)
    out, seen = {}, set()
    for k in sorted(keys):
        base = plain[k] if len(groups[plain[k].casefold()]) == 1 else f"{plain[k]}.{PurePosixPath(k).suffix[1:]}"
        stem, n = base, 1
        while stem.casefold() in seen:
            n += 1
            stem = f"{base}~{n}"
        seen.add(stem.casefold())
        out[k] = stem
    return out


def output_candidates(stem: str, fmt: str | None) -> list[str]:
    """Every output key an input can end up with (the extension follows the decoded image when the format is kept)."""
    if fmt:
        return [stem + EXTENSIONS[FORMATS[fmt.lower().lstrip(".")]]]
    return [stem + e for e in OUTPUT_EXTENSIONS]


def _row(entry: Entry, status: str, cfg, **kw) -> dict:
    return manifest_row({"key": entry.key, "status": status, "in_bytes": entry.size, **kw}, cfg.model.preset)


def _batch_name(key: str, latent_id: str) -> str:
    """The name an output of one latent of a batch file is made from: the file's stem, then the id made safe for a
    file name (`a.npz` id `x/y` -> `a.x_y`); `output_stems` then makes every name in the job unique."""
    p = PurePosixPath(key)
    safe = re.sub(r"[^\w.-]+", "_", latent_id).strip("._")[:80] or "latent"
    parent = "" if str(p.parent) == "." else f"{p.parent}/"
    return f"{parent}{p.stem}.{safe}.latent"


def _latent_inputs(src: Location, entries: list[Entry]):
    """([(entry, key, latent id)], [(entry, reason)]): the latents of each file, read from the safetensors header
    alone (a ranged read), from an .npz's member names, or one per .npy; a file whose latents cannot be listed is
    refused with the reason, and the job goes on."""

    def ids(e: Entry) -> list[str]:
        name = e.key.lower()
        if name.endswith(".npz"):
            return npz_ids(src.read(e.key))
        if name.endswith(".safetensors"):
            got = header_ids(e.key, src.read(e.key, 1 << 16))
            return got if got is not None else header_ids(e.key, src.read(e.key))
        return [""]

    def one(e: Entry):
        try:
            return e, ids(e), None
        except Exception as err:
            return e, None, str(err)

    inputs, bad = [], []
    with ThreadPoolExecutor(8) as pool:
        for e, got, why in pool.map(one, entries):
            if why is not None:
                bad.append((e, why))
            else:
                inputs += [(e, f"{e.key}#{i}" if i else e.key, i) for i in got]
    return inputs, bad


def plan_job(cfg) -> Plan:
    """List SRC, name every output, apply --resume; nothing is read or written beyond listings."""
    src, dst, single = locations(cfg)
    plan = Plan(src, dst, single=single)
    decode = getattr(cfg, "workflow", "upscale") == "decode"
    accept = is_latent_key if decode else None
    listed = [single] if single is not None else src.list(exclude=dst, hidden=cfg.include_hidden, accept=accept)
    if not listed:
        looked = ", ".join(LATENT_EXTENSIONS) if decode else ", ".join(sorted(set(FORMATS)))
        raise SetupError(f"no {'latent files' if decode else 'images'} found under {cfg.src} (looked for {looked})")
    in_place_outputs = set()
    if cfg.in_place:  # earlier outputs sit beside the inputs: they are not inputs
        in_place_outputs = {e.key for e in listed if PurePosixPath(e.key).stem.endswith(cfg.suffix)}
    candidates = [e for e in listed if not e.skip and e.key not in in_place_outputs]
    for e in listed:
        if e.skip:
            plan.skipped.append(_row(e, "skipped", cfg, error=e.skip, error_kind="skipped"))
        elif e.key in in_place_outputs:
            reason = f"name ends with --suffix {cfg.suffix!r}: taken as the output of an earlier in-place run"
            plan.skipped.append(_row(e, "skipped", cfg, error=reason, error_kind="skipped"))
    overlap = (not src.is_s3 and not dst.is_s3) or src.below(dst) or dst.below(src)  # local: links can overlap too
    protected = {src.identity(e.key) for e in listed if e.key not in in_place_outputs} if overlap else set()
    # (entry, input key, latent id): one per image, or one per latent of a latent file (a batch file: several)
    inputs = [(e, e.key, "") for e in candidates]
    if decode:
        inputs, unreadable = _latent_inputs(src, candidates)
        plan.rejected += [_row(e, "failed", cfg, error=f"plan: {why}", error_kind="bad_input") for e, why in unreadable]
    names = {k: (_batch_name(e.key, i) if i else e.key) for e, k, i in inputs}
    stems = output_stems(list(names.values()), cfg.suffix)
    existing, previous = _existing_outputs(cfg, dst)
    unknown = []  # (row, input key, output key) of outputs found by --resume whose sizes are not on record
    for e, key, latent_id in inputs:
        seed = file_seed(cfg.options.seed, key)
        stem = stems[names[key]]
        row = {"key": key, "seed": seed, "in_bytes": e.size, "output_stem": stem}
        if latent_id:
            row.update(src_key=e.key, latent_id=latent_id)
        if decode:
            row.update({k: v for k, v in (("out_size", cfg.out_size), ("sigma", cfg.sigma)) if v is not None})
        if e.note:
            row["notes"] = [e.note]
        if key in cfg.captions:
            row["caption"] = cfg.captions[key]
        row["opts"] = resolve(cfg.options, row)  # the row's options, once, where it enters the job
        reason = _refusal(e, stem, cfg, dst, protected)
        if reason:
            plan.rejected.append(_row(e, "failed", cfg, key=key, error=f"plan: {reason[1]}", error_kind=reason[0]))
            continue
        hit = next((c for c in output_candidates(stem, cfg.options.format) if c in existing), None)
        if hit:
            prev = previous.get(key)
            base = prev if prev and prev.get("status") == "ok" else _row(e, "skipped", cfg, key=key, seed=row["seed"])
            done = {**base, "status": "skipped", "error": "", "error_kind": "", "output_key": display(hit)}
            plan.skipped.append(done)
            if done["out_h"] < 0:
                unknown.append((done, e.key, hit))
            continue
        plan.todo.append(row)
    _fill_sizes(unknown, src, dst)
    return plan


def _refusal(e: Entry, stem: str, cfg, dst: Location, protected: set[str]) -> tuple[str, str] | None:
    """(kind, reason) when this input must not be processed, else None."""
    problem = key_problem(e.key, s3=dst.is_s3)
    if problem:
        return "bad_input", problem
    if e.size > MAX_INPUT_BYTES:
        return "too_large", f"file is {e.size:,} bytes, over the limit of {MAX_INPUT_BYTES:,}"
    for out in output_candidates(stem, cfg.options.format) if protected else ():
        if dst.identity(out) in protected:
            return "bad_input", f"its output {display(out)!r} would overwrite an input; choose another DST or --suffix"
    return None


def _existing_outputs(cfg, dst: Location) -> tuple[set[str], dict[str, dict]]:
    if not cfg.resume:
        return set(), {}
    try:
        existing = {e.key for e in dst.list(images_only=False)}
    except SetupError:  # DST does not exist yet: nothing done
        return set(), {}
    previous = load_manifest(dst) if MANIFEST_NAME in existing else {}
    return existing, previous


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
