"""Planning a bulk job before any model loads: where SRC and DST are, what each output is called, what is refused.

The rules that keep user data safe live here:
- DST equal to SRC is refused, unless `--in-place` with a `--suffix` (a single file's own folder needs the suffix);
- DST inside SRC is left out of SRC's listing, so a later run never takes its own outputs as inputs;
- every output key is proven safe (no absolute path, no empty/'.'/'..' segment) or its input fails with the reason;
- no output may be an input: an input whose output could overwrite any listed input fails instead;
- outputs are unique: inputs that would share a name (a.png, a.gif, a.bmp -> a.png) keep their source extension in
  the name (a.gif.png, a.bmp.png), and a leftover clash gets a counter; decided from the listing alone, so a
  resumed run names every output the same way;
- no output replaces a file already in DST: from one listing of DST, an input whose output name is taken fails with
  the reason (--resume keeps the file as its output instead); --overwrite replaces only files that DST's pidray
  manifest records as outputs of a pidray job, and the write itself refuses a file that appears after planning.
"""

from __future__ import annotations

import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from jobs.manifest import MANIFEST_NAME, Previous, manifest_row, read_previous
from jobs.naming import natural_extension, sibling_extensions
from pipeline.errors import BadParameter, SetupError, TooLarge, is_number
from pipeline.imageio import EXTENSIONS, FORMATS, probe
from pipeline.latents import LATENT_EXTENSIONS, header_ids, is_latent_key, npz_ids, st_header_bytes
from pipeline.noise import file_seed
from pipeline.stages.common import parse_size, resolve
from pipeline.storage import MAX_INPUT_BYTES, Entry, Location, display, key_problem
from pipeline.workflow import DEFAULT_LDM, DEFAULT_WORKFLOW, Ldm, workflow_class

OUTPUT_EXTENSIONS = sorted(set(EXTENSIONS.values()))


@dataclass
class Plan:
    src: Location
    dst: Location
    todo: list[dict] = field(default_factory=list)  # rows to process
    skipped: list[dict] = field(default_factory=list)  # manifest rows: done already (--resume), hidden, links
    rejected: list[dict] = field(default_factory=list)  # manifest rows failed at planning, with the reason
    single: Entry | None = None  # SRC named one file/object: this entry of `src` is the whole listing
    previous: Previous = field(default_factory=Previous)  # the manifest found at DST (--resume, --in-place)


def locations(cfg) -> tuple[Location, Location, Entry | None]:
    """(SRC as a folder/prefix, DST, the entry when SRC names a single file); refuses SRC == DST up front."""
    src, dst = Location(cfg.src, cfg.s3, cfg.follow_symlinks), Location(cfg.dst, cfg.s3)
    single = src.single()
    entry = None
    if single is not None:
        src, entry = single
    prompts = workflow_class(getattr(cfg, "workflow", DEFAULT_WORKFLOW)).enters == "prompts"
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


def output_stems(names: list[tuple[str, str]], suffix: str, fmt: str | None = None) -> dict[str, str]:
    """(id, name) pairs, in the order that decides clashes -> id -> output key without its extension, unique
    (ignoring case) across the job with the output's extension (jobs/naming.py). `name` is what the output is named
    after (an input key; a batch latent's or a prompt's name); ids are unique, names need not be. Different names
    on one stem whose outputs would share an extension keep their own (a.png, a.gif -> a.png.png, a.gif.png), names
    whose outputs differ by extension keep the plain stem (x.png, x.jpg -> x.png, x.jpg); any clash left (same
    name, or only the case differs) gets ~2, ~3 in the order given (two prompts both named pet -> pet, pet~2)."""
    plain = {}
    for i, k in names:
        p = PurePosixPath(k)
        parent = "" if str(p.parent) == "." else f"{p.parent}/"
        plain[i] = f"{parent}{p.stem}{suffix}"
    groups = defaultdict(lambda: defaultdict(set))  # stem -> output extension -> the source extensions on it
    for i, k in names:
        groups[plain[i].casefold()][natural_extension(k, fmt)].add(PurePosixPath(k).suffix.casefold())
    out, seen = {}, set()
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
    leaving out `theirs`: the extensions of other inputs' outputs on the same stem (jobs/naming.py)."""
    if fmt:
        return [stem + EXTENSIONS[FORMATS[fmt.lower().lstrip(".")]]]
    return [stem + e for e in OUTPUT_EXTENSIONS if e not in theirs]


NOT_AN_IMAGE = "not an image"


def with_non_images(entries: list[Entry]) -> list[Entry]:
    """A listing of every file under SRC -> the images (and unreadable folders), plus each other file marked
    skipped as "not an image" (notes.txt, a name without an extension); never pidray's own files, and hidden
    files that are not images stay out as before."""
    from pipeline.storage import RESERVED_PREFIX, is_image_key

    out = []
    for e in entries:
        if e.folder or e.key.startswith(RESERVED_PREFIX):
            if e.folder:
                out.append(e)
            continue
        if is_image_key(e.key):
            out.append(e)
        elif not e.skip:  # a hidden non-image (.DS_Store) is no input anyone meant
            out.append(Entry(e.key, e.size, skip=NOT_AN_IMAGE))
    return out


def _row(entry: Entry, status: str, cfg, **kw) -> dict:
    return manifest_row({"key": entry.key, "status": status, "in_bytes": entry.size, **kw}, cfg.model.preset)


def _safe_name(text: str) -> str:
    """A user-given name (a latent id, a prompt's `name`) as one file-name segment: every run of characters other
    than word characters, '.' and '-' becomes '_'."""
    return re.sub(r"[^\w.-]+", "_", text)


def _batch_name(key: str, latent_id: str) -> str:
    """The name an output of one latent of a batch file is made from: the file's stem, then the id made safe for a
    file name (`a.npz` id `x/y` -> `a.x_y`); `output_stems` then makes every name in the job unique."""
    p = PurePosixPath(key)
    safe = _safe_name(latent_id).strip("._")[:80] or "latent"
    parent = "" if str(p.parent) == "." else f"{p.parent}/"
    return f"{parent}{p.stem}.{safe}.latent"


def _latent_inputs(src: Location, entries: list[Entry]):
    """([(entry, key, latent id)], [(entry, reason)]): the latents of each file, read from the safetensors header
    alone (ranged reads), from an .npz's zip directory, or one per .npy; a file whose latents cannot be listed (or
    that is over the size limit, which is refused from the listing before anything is read) is refused with the
    reason, and the job goes on."""

    def ids(e: Entry) -> list[str]:
        name = e.key.lower()
        if e.size > MAX_INPUT_BYTES:
            raise TooLarge(f"file is {e.size:,} bytes, over the limit of {MAX_INPUT_BYTES:,}")
        if name.endswith(".npz"):
            with src.open(e.key) as f:
                return npz_ids(f)
        if name.endswith(".safetensors"):
            head = src.read(e.key, 1 << 16)
            got = header_ids(e.key, head, e.size)
            return got if got is not None else header_ids(e.key, src.read(e.key, st_header_bytes(head)), e.size)
        return [""]

    def one(e: Entry):
        try:
            got = ids(e)
        except Exception as err:
            return e, None, ("too_large" if isinstance(err, TooLarge) else "bad_input", str(err))
        twice = sorted({i for i in got if got.count(i) > 1}) if len(set(got)) != len(got) else []
        if twice:  # a crafted archive: two latents under one name would share a manifest row and an output
            return e, None, ("bad_input", f"the file holds latent id(s) {twice[:5]} more than once")
        if len(got) > 1 and "" in got:
            return e, None, ("bad_input", "the file holds a latent with an empty name among others")
        return e, got, None

    inputs, bad = [], []
    with ThreadPoolExecutor(8) as pool:
        for e, got, why in pool.map(one, entries):
            if why is not None:
                bad.append((e, why))
            else:
                inputs += [(e, latent_key(e.key, i), i) for i in got]
    return inputs, bad


def latent_key(file_key: str, latent_id: str = "") -> str:
    """The manifest key of a latent: its file's key, then `#id` for one latent of a batch file. A '%' or '#' in the
    file's own name is written %25 / %23, so the first '#' always starts the id and no file name can pass for a
    latent of another file (`x.npz#b.npy`, a file, is `x.npz%23b.npy`; member `b.npy` of `x.npz` is `x.npz#b.npy`)."""
    escaped = file_key.replace("%", "%25").replace("#", "%23")
    return f"{escaped}#{latent_id}" if latent_id else escaped


def plan_job(cfg) -> Plan:
    """List SRC, name every output, apply --resume; nothing is read or written beyond listings."""
    if workflow_class(getattr(cfg, "workflow", DEFAULT_WORKFLOW)).enters == "prompts":
        return _plan_prompts(cfg)
    src, dst, single = locations(cfg)
    plan = Plan(src, dst, single=single)
    decode = workflow_class(getattr(cfg, "workflow", DEFAULT_WORKFLOW)).enters == "latents"
    accept = is_latent_key if decode else None
    if single is not None:
        listed = [single]
    elif decode:
        listed = src.list(exclude=dst, hidden=cfg.include_hidden, accept=accept)
    else:  # one listing; the files that are not images are on record too, as skipped
        listed = with_non_images(src.list(images_only=False, exclude=dst, hidden=cfg.include_hidden))
    if not [e for e in listed if e.skip != NOT_AN_IMAGE]:
        looked = ", ".join(LATENT_EXTENSIONS) if decode else ", ".join(sorted(set(FORMATS)))
        raise SetupError(f"no {'latent files' if decode else 'images'} found under {cfg.src} (looked for {looked})")
    existing = _existing_outputs(cfg, dst)
    if cfg.resume or cfg.in_place or cfg.overwrite or MANIFEST_NAME in existing:
        plan.previous = read_previous(dst)  # kept and added to: the record of what pidray wrote in DST
    in_place_outputs = set()
    if cfg.in_place:  # earlier outputs sit beside the inputs: they are not inputs -- when a manifest says so
        written = recorded_outputs(plan.previous)
        in_place_outputs = {e.key for e in listed if PurePosixPath(e.key).stem.endswith(cfg.suffix)
                            and display(e.key) in written}  # fmt: skip
    candidates = [e for e in listed if not e.skip and e.key not in in_place_outputs]
    for e in listed:
        if e.skip:
            plan.skipped.append(_row(e, "skipped", cfg, error=e.skip, error_kind="skipped"))
        elif e.key in in_place_outputs:
            reason = f"name ends with --suffix {cfg.suffix!r}: the output of an earlier in-place run (in the manifest)"
            plan.skipped.append(_row(e, "skipped", cfg, error=reason, error_kind="skipped", output_key=e.key))
    overlap = (not src.is_s3 and not dst.is_s3) or src.below(dst) or dst.below(src)  # local: links can overlap too
    protected = {src.identity(e.key) for e in listed if e.key not in in_place_outputs} if overlap else set()
    # (entry, input key, latent id): one per image, or one per latent of a latent file (a batch file: several)
    inputs = [(e, e.key, "") for e in candidates]
    if decode:
        inputs, unreadable = _latent_inputs(src, candidates)
        plan.rejected += [
            _row(e, "failed", cfg, error=f"plan: {why}", error_kind=kind) for e, (kind, why) in unreadable
        ]
    names = {k: (_batch_name(e.key, i) if i else e.key) for e, k, i in inputs}
    order = sorted(((k, n) for k, n in names.items()), key=lambda kn: (kn[1], kn[0]))
    stems = output_stems(order, cfg.suffix, cfg.options.format)
    theirs = sibling_extensions(names, stems, cfg.options.format)  # x.jpg's output is never taken for x.png's
    if single is not None and getattr(cfg, "output_name", "") and len(stems) == 1:  # DST named the output file
        stems = {k: cfg.output_name for k in stems}
    previous, recorded = plan.previous.rows, recorded_outputs(plan.previous)
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
        if theirs.get(key):
            row["theirs"] = theirs[key]
        hits = [c for c in output_candidates(stem, cfg.options.format, theirs.get(key, ())) if c in existing]
        hit = hits[0] if hits and cfg.resume else None
        if hits and not cfg.resume:
            taken = _taken(hits, recorded, cfg)
            if taken is not None:
                plan.rejected.append(_exists_row(_row(e, "failed", cfg, key=key, seed=seed), taken, recorded))
                continue
            row["replace"] = hits  # --overwrite: each of these is an output a pidray job wrote
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


def _existing_outputs(cfg, dst: Location) -> set[str]:
    """Every key at DST, from one listing: --resume trusts an output found there (writes are atomic); otherwise an
    output name that is taken is refused, or (--overwrite) replaced when it is pidray's own."""
    try:
        return {e.key for e in dst.list(images_only=False)}
    except SetupError:  # DST does not exist yet: nothing done
        return set()


def recorded_outputs(previous: Previous) -> set[str]:
    """The output keys (printable form) that DST's manifest records as written by a pidray job."""
    return {r["output_key"] for r in previous.rows.values() if r.get("output_key")}


def _taken(hits: list[str], recorded: set[str], cfg) -> tuple[str, str] | None:
    """(the existing output name, why the input fails) when files at its output names may not be replaced; None
    when --overwrite may replace them all (each one recorded by DST's manifest as a pidray output)."""
    theirs = [h for h in hits if display(h) not in recorded]
    name = display((theirs or hits)[0])
    if not theirs and cfg.overwrite:
        return None
    if not theirs:
        return name, (f"its output {name!r} already exists in DST (an earlier pidray job wrote it, as DST's manifest "
                      "records): --resume keeps it, --overwrite replaces it")  # fmt: skip
    if cfg.overwrite:
        return name, (
            f"its output {name!r} already exists in DST and DST's pidray manifest does not record it as a "
            "pidray output, so --overwrite does not replace it (it replaces only pidray's own outputs): "
            "--resume keeps it as this input's output; or move it away, or choose another DST or --suffix"
        )
    return name, (f"its output {name!r} already exists in DST (not written by pidray, as far as DST's manifest "
                  "shows): it is kept; --resume keeps it as this input's output, or move it away, or choose another "
                  "DST or --suffix (--overwrite replaces only outputs a pidray job wrote)")  # fmt: skip


def _exists_row(row: dict, taken: tuple[str, str], recorded: set[str]) -> dict:
    """The manifest row of an input refused because its output name is taken. When the file there is pidray's own
    output, the row still names it, so the manifest keeps recording it as one (a later --overwrite may replace it)."""
    name, reason = taken
    row = {**row, "error": f"plan: {reason}", "error_kind": "bad_input"}
    if name in recorded:
        row["output_key"] = name
    return row


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


# ------------------------------------------------------------------------------------------------ prompt files
PROMPT_FIELDS = ("prompt", "seed", "size", "steps", "shift", "cfg_scale", "negative_prompt", "name")
MAX_PROMPTS = 1_000_000
MAX_PROMPT_FILE_BYTES = 64 << 20
MAX_FIELD_CHARS = 1 << 17  # a prompt, negative prompt or name longer than this fails its line


def read_prompts(name: str, text: str) -> list[tuple[int, dict | str]]:
    """(line number, fields) per prompt, or (line number, reason) for a line that cannot be one. Text: one prompt a
    line; CSV: a `prompt` column (+ seed, size, steps, shift, cfg_scale, negative_prompt, name); JSONL: objects with
    those keys."""
    import csv
    import io
    import json

    ext = PurePosixPath(name).suffix.lower()
    out: list[tuple[int, dict | str]] = []
    if ext in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                out.append((n, f"not JSON ({e})"))
                continue
            except RecursionError:
                out.append((n, "JSON nested too deeply"))
                continue
            if not isinstance(item, dict):
                out.append((n, "expected a JSON object with a prompt"))
                continue
            unknown = sorted(set(item) - set(PROMPT_FIELDS))
            out.append((n, f"unknown field(s) {unknown}" if unknown else item))
    elif ext == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), MAX_PROMPT_FILE_BYTES))  # a long field fails its line alone
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise SetupError(f"{name}: a CSV prompt file needs a 'prompt' column; got {reader.fieldnames}")
        unknown = sorted(set(reader.fieldnames) - set(PROMPT_FIELDS))
        if unknown:
            raise SetupError(f"{name}: unknown CSV column(s) {unknown}; known: {', '.join(PROMPT_FIELDS)}")
        n = 1
        try:
            for r in reader:
                n = reader.line_num  # the line the record ends on (a quoted field may span lines)
                if None in r:
                    out.append((n, f"{len(reader.fieldnames) + len(r[None])} fields, the header has "
                                   f"{len(reader.fieldnames)}"))  # fmt: skip
                    continue
                long = [k for k, v in r.items() if v is not None and len(v) > MAX_FIELD_CHARS]
                if long:
                    out.append((n, f"field {long[0]!r} is over {MAX_FIELD_CHARS:,} characters"))
                    continue
                out.append((n, {k: v for k, v in r.items() if v not in (None, "")}))
        except csv.Error as e:  # malformed quoting: the lines after it cannot be told apart
            out.append((reader.line_num or n, f"not CSV from here on ({e})"))
    else:
        out = [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(out) > MAX_PROMPTS:
        raise SetupError(f"{name}: {len(out):,} prompts, over the limit of {MAX_PROMPTS:,} per job")
    return out


def _gen_fields(item: dict, text: bool = False) -> dict:
    """A prompt line's settings as GenerateOptions fields (size 'WxH' -> (H, W)), each checked for its type and
    magnitude: a JSON number (text: a CSV field's digits), never a bool, a fraction where a whole number is meant,
    NaN or inf. BadParameter naming the field otherwise."""
    gen = {}
    for k in ("seed", "steps"):
        if k in item:
            gen[k] = _whole(item[k], k, text)
    for k in ("shift", "cfg_scale"):
        if k in item:
            gen[k] = _number(item[k], k, text)
    if "negative_prompt" in item:
        gen["negative_prompt"] = _text(item["negative_prompt"], "negative_prompt")
    if "size" in item:
        size = item["size"]
        if isinstance(size, list) and len(size) == 2:
            size = [_whole(v, "size", text) for v in size]
        elif not isinstance(size, str):
            raise BadParameter(f"size must be 'WIDTHxHEIGHT' or [width, height], got {_short(size)}")
        gen["size"] = parse_size(size)
    return gen


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _whole(value, what: str, text: bool = False) -> int:
    if text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,19}\s*", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadParameter(f"{what} must be a whole number, got {_short(value)}")


def _number(value, what: str, text: bool = False) -> float:
    if text and isinstance(value, str) and len(value) <= 40:
        try:
            value = float(value)
        except ValueError:
            pass
    if not is_number(value):
        raise BadParameter(f"{what} must be a finite number, got {_short(value)}")
    return float(value)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadParameter(f"{what} must be text, got {_short(value)}")
    if len(value) > MAX_FIELD_CHARS:
        raise BadParameter(f"{what} is {len(value):,} characters, over the limit of {MAX_FIELD_CHARS:,}")
    return value


def _prompt_name(n: int, item: dict) -> str:
    """What line n's output is named after: its `name` made safe for a file name, else its number and prompt."""
    name = item.get("name")
    if isinstance(name, str) and name.strip(" ._"):
        return _safe_name(name).strip(" ._")[:96] or f"{n:06d}-image"
    prompt = item.get("prompt") if isinstance(item.get("prompt"), str) else ""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt[:1000].lower()).strip("-")[:48] or "image"
    return f"{n:06d}-{slug}"


def _ldm_defaults(cfg) -> dict | None:
    if workflow_class(getattr(cfg, "workflow", DEFAULT_WORKFLOW)) is not Ldm:
        return None
    from pipeline.stages.ldm import ldm_spec

    return ldm_spec(cfg.ldm or DEFAULT_LDM)[0].defaults()


def _plan_prompts(cfg) -> Plan:
    from pipeline.model.presets import get_preset
    from pipeline.t2i import GenerateOptions

    src, dst, single = locations(cfg)
    if single is None:
        raise SetupError(f"{cfg.src}: pidray generate --prompts takes a prompt file (.txt, .csv or .jsonl)")
    if single.size > MAX_PROMPT_FILE_BYTES:
        raise SetupError(f"{cfg.src}: prompt file is {single.size:,} bytes, over the limit of "
                         f"{MAX_PROMPT_FILE_BYTES:,}")  # fmt: skip
    try:
        text = src.read(single.key, MAX_PROMPT_FILE_BYTES + 1).decode("utf-8-sig")  # a spreadsheet's BOM too
    except UnicodeDecodeError:
        raise SetupError(f"{cfg.src}: the prompt file is not UTF-8 text") from None
    plan = Plan(src, dst, single=single)
    preset = get_preset(cfg.model.preset)
    base = GenerateOptions.from_dict(cfg.gen)
    entries = read_prompts(single.key, text)
    names = {n: _prompt_name(n, item) for n, item in entries if isinstance(item, dict)}
    stems = output_stems([(n, f"{v}.prompt") for n, v in names.items()], cfg.suffix)  # in line order: pet, pet~2
    protected = {src.identity(single.key)}  # the prompt file itself, when DST is its folder
    existing = _existing_outputs(cfg, dst)
    if cfg.resume or cfg.overwrite or MANIFEST_NAME in existing:
        plan.previous = read_previous(dst)
    previous, recorded = plan.previous.rows, recorded_outputs(plan.previous)
    for n, item in entries:
        key = f"{single.key}:{n}"
        if isinstance(item, str):
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error": f"plan: line {n}: {item}",
                                               "error_kind": "bad_input"}, cfg.model.preset))  # fmt: skip
            continue
        try:
            prompt = item.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("no prompt")
            _text(prompt, "prompt")
            if item.get("name") is not None:
                _text(item["name"], "name")
            gen = _gen_fields(item, text=single.key.lower().endswith(".csv"))
            gen.setdefault("seed", file_seed(base.seed, key))
            GenerateOptions.from_dict({**base.to_dict(), **gen}).resolved(preset, _ldm_defaults(cfg))
        except (ValueError, TypeError, OverflowError) as e:
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error": f"plan: line {n}: {e}",
                                               "error_kind": "bad_parameter"}, cfg.model.preset))  # fmt: skip
            continue
        stem = stems[n]
        if any(dst.identity(c) in protected for c in output_candidates(stem, cfg.options.format)):
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error_kind": "bad_input",
                                               "error": f"plan: line {n}: its output {display(stem)}.* would "
                                                        "overwrite the prompt file"}, cfg.model.preset))  # fmt: skip
            continue
        row = {"key": key, "prompt": prompt, "gen": gen, "seed": gen["seed"], "output_stem": stem, "in_bytes": 0}
        row["opts"] = resolve(cfg.options, {"seed": gen["seed"]})
        hits = [c for c in output_candidates(stem, cfg.options.format) if c in existing]
        hit = hits[0] if hits and cfg.resume else None
        if hits and not cfg.resume:
            taken = _taken(hits, recorded, cfg)
            if taken is not None:
                failed = manifest_row({"key": key, "status": "failed", "seed": gen["seed"]}, cfg.model.preset)
                plan.rejected.append(_exists_row(failed, (taken[0], f"line {n}: {taken[1]}"), recorded))
                continue
            row["replace"] = hits
        if hit:
            prev = previous.get(key)
            done = prev if prev and prev.get("status") == "ok" else manifest_row({**row, "status": "skipped"},
                                                                                 cfg.model.preset)  # fmt: skip
            plan.skipped.append({**done, "status": "skipped", "error": "", "error_kind": "",
                                 "output_key": display(hit)})  # fmt: skip
            continue
        plan.todo.append(row)
    return plan
