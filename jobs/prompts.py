"""Prompt files for `pidray generate --prompts`: read (text, CSV, JSONL), each line checked, and planned whole
(a prompt file is at most 64 MiB and 1,000,000 lines)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from jobs.manifest import manifest_row
from jobs.naming import output_candidates, output_name_problem, output_stems, safe_name
from jobs.previous import PreviousIndex, has_manifest
from jobs.rules import (
    Plan,
    existing_outputs,
    locations,
    recorded_outputs,
    settle_taken,
)
from pipeline.errors import BadParameter, SetupError, is_number
from pipeline.generate_options import GEN_OPTS, GEN_OVERRIDES, SIZE
from pipeline.noise import file_seed
from pipeline.stages.common import parse_size
from pipeline.storage import display

PROMPT_FIELDS = ("prompt", *GEN_OVERRIDES, "name")  # a line's: its prompt, the settings a row may set, its name
MAX_PROMPTS = 1_000_000
MAX_PROMPT_FILE_BYTES = 64 << 20
MAX_FIELD_CHARS = 1 << 17  # a prompt, negative prompt or name longer than this fails its line
MAX_NAME_CHARS, MAX_NAME_BYTES = 96, 192  # what an output is named after, of a name's (in UTF-8: 4 bytes a character
# at most), leaving room for --suffix, a counter and the extension within a file name's 255 bytes


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
    for k in GEN_OVERRIDES:
        if k not in item:
            continue
        kind = GEN_OPTS[k].kind
        if kind is SIZE:
            size = item[k]
            if isinstance(size, list) and len(size) == 2:
                size = [_whole(v, k, text) for v in size]
            elif not isinstance(size, str):
                raise BadParameter(f"{k} must be 'WIDTHxHEIGHT' or [width, height], got {_short(size)}")
            gen[k] = parse_size(size)
        else:
            gen[k] = {int: _whole, float: _number}.get(kind, lambda v, what, _: _text(v, what))(item[k], k, text)
    return gen


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _whole(value, what: str, text: bool = False) -> int:
    if text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,19}\s*", value):  # ASCII digits only
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadParameter(f"{what} must be a whole number, got {_short(value)}")


def _number(value, what: str, text: bool = False) -> float:
    if text and isinstance(value, str) and len(value) <= 40 and value.isascii() and "_" not in value:  # not 1_0
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
    """What line n's output is named after: its `name` made safe for a file name, else its number and prompt. A long
    name is cut to its first 96 characters and then to at most 192 bytes in UTF-8 (on a character boundary: never
    half a character), so that its file name fits; with --suffix, a name still too long fails its line."""
    name = item.get("name")
    if isinstance(name, str) and name.strip(" ._"):
        safe = safe_name(name).strip(" ._")[:MAX_NAME_CHARS]
        safe = safe.encode("utf-8", "surrogatepass")[:MAX_NAME_BYTES].decode("utf-8", "ignore").strip(" ._")
        return safe or f"{n:06d}-image"
    prompt = item.get("prompt") if isinstance(item.get("prompt"), str) else ""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt[:1000].lower()).strip("-")[:48] or "image"
    return f"{n:06d}-{slug}"


def _ldm_defaults(flow) -> dict | None:
    """A latent diffusion model's own defaults (steps, size, ...) under the prompt file's settings; None for others."""
    if flow.generator is None:
        return None
    from pipeline.generators import generator_spec

    return generator_spec(flow.generator)[0].defaults()


def _plan_prompts(cfg) -> Plan:
    from pipeline.generate_options import GenerateOptions

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
    preset = cfg.flow.preset
    base = GenerateOptions.from_dict(cfg.gen)
    entries = read_prompts(single.key, text)
    names = {n: _prompt_name(n, item) for n, item in entries if isinstance(item, dict)}
    stems = output_stems([(n, f"{v}.prompt") for n, v in names.items()], cfg.suffix)  # in line order: pet, pet~2
    protected = {src.identity(single.key)}  # the prompt file itself, when DST is its folder
    existing = existing_outputs(dst, "")  # outputs are named at DST's top
    if cfg.resume or cfg.overwrite or has_manifest(dst):
        plan.previous = PreviousIndex.load(dst)
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
            defaults = _ldm_defaults(cfg.flow)
            if defaults is None and "stop_at" in gen:
                raise BadParameter("stop_at is for a generator's latent (pidray generate --with MODEL)")
            GenerateOptions.from_dict({**base.to_dict(), **gen}).resolved(preset, defaults)
        except (ValueError, TypeError, OverflowError) as e:
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error": f"plan: line {n}: {e}",
                                               "error_kind": "bad_parameter"}, cfg.model.preset))  # fmt: skip
            continue
        stem = stems[n]
        problem = output_name_problem(stem, cfg.options.format, dst)
        if problem:
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error_kind": "bad_input",
                                               "error": f"plan: line {n}: {problem}"}, cfg.model.preset))  # fmt: skip
            continue
        if any(dst.identity(c) in protected for c in output_candidates(stem, cfg.options.format)):
            plan.rejected.append(manifest_row({"key": key, "status": "failed", "error_kind": "bad_input",
                                               "error": f"plan: line {n}: its output {display(stem)}.* would "
                                                        "overwrite the prompt file"}, cfg.model.preset))  # fmt: skip
            continue
        row = {"key": key, "prompt": prompt, "gen": gen, "seed": gen["seed"], "output_stem": stem, "in_bytes": 0}
        hits = [c for c in output_candidates(stem, cfg.options.format) if c in existing]
        if hits:
            failed = manifest_row({"key": key, "status": "failed", "seed": gen["seed"]}, cfg.model.preset)
            skipped = manifest_row({**row, "status": "skipped"}, cfg.model.preset)
            kind, got = settle_taken(plan, cfg, hits, existing, previous.get(key), recorded, failed, skipped,
                                     line=f"line {n}: ")  # fmt: skip
            if kind != "replace":
                (plan.skipped if kind == "skipped" else plan.rejected).append(got)
                continue
            row["replace"] = got
        plan.todo.append(row)
    return plan
