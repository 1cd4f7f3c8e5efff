"""The endpoint's parameters: query/form fields and /v1/generate's JSON fields, typed and bounded before any work,
and the cost model that bounds the work one request may ask for (pixels diffused × steps × passes).

Every refusal is a typed error (`pipeline.errors`): BadParameter (422), TooLarge (413), Refused("bad_input") (400).
A row's overrides are the job's own (`pipeline.stages.common.OVERRIDES`), validated by the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import BadParameter, Refused, TooLarge
from pipeline.generate_options import GEN_DEFAULTS, GEN_OPTS, GEN_OVERRIDES, MAX_PROMPT_CHARS, SIZE
from pipeline.imageio import output_format
from pipeline.model.presets import ALIASES
from pipeline.options import Resolved
from pipeline.stages.common import OVERRIDES, UpscaleOptions, parse_size
from pipeline.stages.encode import plan_for
from pipeline.tiling import TilePlan, check_output_side, target_size

ROW_PARAMS = OVERRIDES  # a request's row parameters are the job's row overrides, with their types
# The endpoint's own query/form fields besides the options (their OpenAPI type and description)
ENDPOINT_PARAMS = {
    "preset": ("string", "the preset this endpoint serves, by name (any other is refused)"),
    "store": ("string", "s3: store the output under the endpoint's S3 prefix and answer with its location"),
    "timeout": ("number", "seconds this request may take, at most the endpoint's own limit"),
}
DECODE_FIELDS = {
    "latent_format": ("string", "what the latent holds (default: the file's metadata, else the preset's VAE)"),
    "id": ("string", "which latent of a file holding several"),
    "sigma": ("number", "the latent is x_t captured at this scheduler sigma (default: the file's, else clean)"),
    "size": ("string", "output WIDTHxHEIGHT (default: latent size x the VAE factor x the preset's scale)"),
}
DECODE_PARAMS = tuple(DECODE_FIELDS)  # /v1/decode only
LATENT_INFLATE_FACTOR = 4  # a latent body may inflate (an .npz) to this many times max_bytes
MAX_LATENT_MEMBERS = 1024  # latents one body may hold: its zip directory or header is all that is parsed of others


def openapi_doc(fields: dict, body_field: str) -> dict:
    """The OpenAPI description of a route's query/form fields (every row option with its type, range and default,
    then the endpoint's own and the route's `fields`) and of its body (raw, or the multipart field `body_field`),
    made from the declarations the requests are checked against."""
    from pipeline.options import openapi_parameters

    params = openapi_parameters(ROW_PARAMS) + [
        {"name": name, "in": "query", "required": False, "schema": {"type": kind}, "description": text}
        for name, (kind, text) in {**ENDPOINT_PARAMS, **fields}.items()
    ]
    media = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
             "multipart/form-data": {"schema": {"type": "object", "required": [body_field], "properties": {
                 body_field: {"type": "string", "format": "binary"}}}}}  # fmt: skip
    return {"parameters": params, "requestBody": {"required": True, "content": media}}


def openapi_generate() -> dict:
    """/v1/generate's JSON body as OpenAPI (its fields and their types, as `check_json_fields` takes them)."""
    from pipeline.options import openapi_schema

    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
    props = {}
    for name, types in JSON_FIELDS.items():
        o = GEN_OPTS.get(name) if name in GEN_OVERRIDES else None
        if o is not None and o.kind is not SIZE:
            props[name] = openapi_schema(o, GEN_DEFAULTS.get(name))
        else:
            kinds = [{"type": names[t], **({"items": {"type": "integer"}} if t is list else {})} for t in types]
            props[name] = kinds[0] if len(kinds) == 1 else {"oneOf": kinds}
        props[name]["description"] = JSON_HELP[name]
    schema = {"type": "object", "required": ["prompt"], "properties": props}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def parse_params(params: dict, preset, options: UpscaleOptions, s3_configured: bool, extra: tuple = ()) -> dict:
    """A request's parameters -> its row (the overrides, and `extra`'s fields), validated by the job's own rules
    before any work; BadParameter (422) otherwise. The route then enters the row into its workflow
    (`Workflow.enter`), which resolves its options."""
    unknown = sorted(set(params) - set(ROW_PARAMS) - {"preset", "store", "timeout"} - set(extra))
    if unknown:
        raise BadParameter(f"unknown parameter(s): {unknown}")
    if params.get("preset") and params["preset"] != preset.name and ALIASES.get(params["preset"]) != preset.name:
        # by name only: a preset *file* named by a client would read the server's disk
        raise BadParameter(f"this endpoint serves preset {preset.name!r}, not {str(params['preset'])[:80]!r}")
    store = params.get("store") or None
    if store not in (None, "s3"):
        raise BadParameter(f"store must be 's3' (or absent), got {store!r}")
    if store == "s3" and not s3_configured:
        raise BadParameter("store=s3 is not configured on this endpoint")
    row = {}
    for name, kind in ROW_PARAMS.items():
        if params.get(name) not in (None, ""):
            try:
                row[name] = kind(params[name])
            except ValueError:
                raise BadParameter(f"{name} must be {kind.__name__}, got {params[name]!r}") from None
    if "caption" in row:
        check_text(row["caption"], "caption")
    options.overridden(row)  # checked by the same rules as the job (the seed's range included), before any work
    if "format" in row:
        output_format(None, row["format"])
    if params.get("id"):
        row["latent_id"] = check_text(str(params["id"]), "id")
    if params.get("sigma") not in (None, ""):
        try:
            row["sigma"] = float(params["sigma"])
        except ValueError:
            raise BadParameter(f"sigma must be a number, got {params['sigma']!r}") from None
        if not 0.0 <= row["sigma"] < 1e3:
            raise BadParameter(f"sigma must be >= 0, got {params['sigma']!r}")
    if params.get("size"):
        row["out_size"] = list(parse_size(params["size"]))
    if params.get("latent_format"):
        from pipeline.latents import check_format

        check_format(params["latent_format"], preset)
        row["latent_format"] = params["latent_format"]
    return row


MAX_JSON_BYTES = 256 << 10  # a /v1/generate body: two prompts of MAX_PROMPT_CHARS, even \u-escaped, fit many times
# /v1/generate's fields: the JSON types each may have (bool is never a number here): the prompt, the settings a
# request may set (as declared: pipeline.generate_options), and the endpoint's own
_JSON_KINDS = {int: (int,), float: (int, float), str: (str,), SIZE: (str, list)}
JSON_FIELDS = {"prompt": (str,), **{name: _JSON_KINDS[GEN_OPTS[name].kind] for name in GEN_OVERRIDES},
               "upscale": (bool,), "format": (str,), "quality": (int,), "timeout": (int, float),
               "with": (str,)}  # fmt: skip
JSON_HELP = {"prompt": "the prompt", "upscale": "then upscale the image with the served PiD preset (PixelDiT)",
             "format": "png, jpeg, webp, tiff", "quality": "JPEG/WebP quality, 1-100",
             "timeout": "seconds this request may take, at most the endpoint's own limit",
             "with": "the generator (an endpoint started with generate={with: NAME} serves one)",
             **{name: GEN_OPTS[name].help for name in GEN_OVERRIDES}}  # fmt: skip
JSON_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "[width, height]",
    bool: "true or false",
}


def check_text(value: str, name: str) -> str:
    """A prompt-like text: at most MAX_PROMPT_CHARS, and real text (no lone surrogates, which no encoder takes)."""
    if len(value) > MAX_PROMPT_CHARS:
        raise TooLarge(f"{name} is {len(value):,} characters, over the limit of {MAX_PROMPT_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter(f"{name} is not valid text (it holds a lone UTF-16 surrogate, e.g. an unpaired \\ud800)")
    return value


def check_json_fields(req: dict) -> dict:
    """Every field of a /v1/generate body of its type and finite before anything uses it (BadParameter naming the
    field and what it got); texts bounded and valid; a size list of two integers."""
    for name, value in req.items():
        if value is None:
            continue
        types = JSON_FIELDS[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(JSON_TYPE_NAMES[t] for t in types)
            raise BadParameter(f"{name} must be {want}, got {type(value).__name__} {str(value)[:40]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadParameter(f"{name} must be a finite number, got {value}")
        if isinstance(value, str) and name in ("prompt", "negative_prompt", "format", "with"):
            check_text(value, name)
        if name == "size" and isinstance(value, list):
            if len(value) != 2 or not all(type(v) is int for v in value):
                raise BadParameter(f'size must be "WIDTHxHEIGHT" or [width, height] integers, got {str(value)[:40]}')
    return req


def latent_name(data: bytes) -> str:
    """A file name for a latent body from its first bytes (safetensors, .npy, .npz), else a 400."""
    from pipeline.latents import latent_extension

    ext = latent_extension(data)
    if ext is not None:
        return "request" + ext
    raise Refused("bad_input", "the body is not a latent file (.safetensors, .npy or .npz)")


def upscale_plan(preset, opts: Resolved, in_hw: tuple[int, int], max_cost: float) -> TilePlan:
    """The tile plan of a request (planned once: the encode stage takes it) from its options as it entered, or
    TooLarge when its output side or its work (pixels diffused × steps, × 2 for the ensemble's pass or guidance's
    second forward) is over the limits."""
    plan = plan_for(preset, opts, in_hw)
    check_output_side(target_size(plan.in_hw, plan.sr_scale, opts.scale), opts.max_output_side)
    th, tw = plan.tile_out
    steps = opts.steps
    factor = preset.sampling.work_factor(opts, (th, tw))  # the ensemble's pass, or guidance's second forward
    cost = plan.n_tiles * th * tw * steps * factor / 1e6
    if cost > max_cost:
        raise TooLarge(
            f"this request needs {cost:.1f} Mpx·steps of diffusion ({plan.n_tiles} tiles of {tw}x{th} x "
            f"{steps} steps x {factor:.2f} passes), over this endpoint's limit of {max_cost:g}; send a "
            "smaller image or fewer steps, or use the bulk job (pidray upscale)"
        )
    return plan


def check_generate_cost(o, max_cost: float, guided: bool | None = None) -> None:
    """A text-to-image request's sampling work (pixels × steps run, × 2 when `guided`: by default a CFG scale other
    than 1), TooLarge over the limit."""
    steps = o.stop_at or o.steps  # generate-then-decode's early exit skips the rest
    guided = o.cfg_scale != 1.0 if guided is None else guided
    cost = o.size[0] * o.size[1] * steps * (2 if guided else 1) / 1e6
    if cost > max_cost:
        raise TooLarge(
            f"this request needs {cost:.1f} Mpx·steps of sampling, over this endpoint's limit of "
            f"{max_cost:g}; ask for a smaller size or fewer steps, or use pidray generate --prompts"
        )


@dataclass(frozen=True)
class ServedGenerator:
    """What /v1/generate generates with: a generator (its name and the name or folder the endpoint was started with,
    its defaults) whose latent the served PiD preset decodes, or the text-to-image preset (`spec` None)."""

    spec: object = None
    started_as: str | None = None

    def check(self, asked, stop_at) -> dict | None:
        """A request's `with` and `stop_at` against what is served (BadParameter); the defaults its settings fill from
        (the generator's, or None: the text-to-image preset's)."""
        if self.spec is None:
            if asked is not None or stop_at is not None:
                raise BadParameter("this endpoint generates with its text-to-image preset: `with` and `stop_at` are "
                                   "for an endpoint started with generate={\"with\": NAME}")  # fmt: skip
            return None
        if asked is not None and asked not in (self.spec.name, self.started_as):
            raise BadParameter(f"this endpoint generates with {self.spec.name!r}, not {asked[:60]!r} (each endpoint "
                               "serves one generator)")  # fmt: skip
        return self.spec.defaults()


def served_generator(wf) -> ServedGenerator:
    if wf.generator is None:
        return ServedGenerator()
    from pipeline.generators import generator_spec

    return ServedGenerator(generator_spec(wf.generator)[0], wf.generator)
