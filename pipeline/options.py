"""The per-job and per-request options, declared once: each field of `UpscaleOptions` carries what it is (`Opt`:
type, range or choices, help, command-line flags, whether a row or request may set it, whether it shapes the output
and so belongs to `--resume`'s settings), and everything else is made from that declaration — the validation, the
command-line arguments of `pidray upscale`/`decode`, the row overrides, the endpoint's query/form fields and their
OpenAPI description, and the settings `--resume` compares. A new option is its field here plus the stage that reads
it.

Imports nothing heavy (no torch, no PIL at module level): `pidray --help` builds its parsers from it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from pipeline.errors import BadParameter
from pipeline.values import SEED_LIMIT, check_seed, strict_from_dict

DEFAULT_MAX_PIXELS = 64_000_000  # input pixels; configurable per job / endpoint
DEFAULT_MAX_OUTPUT_SIDE = 16384  # output pixels on a side
MAX_STEPS = 200  # sampler steps a job or request may ask for (distilled presets: at most their schedule's)


@dataclass(frozen=True)
class Opt:
    """What an option is. `kind`: int, float, str or bool; `lo`/`hi`: its range (numbers); `choices`: its values
    (texts); `flags`: its command-line flags (none: not on the command line); `row`: a job's row or a request may
    set it over the job's or endpoint's value; `shapes`: it changes the output (compared by --resume); `preset`:
    None means "the preset's" (said in the help); `cli`: "negate" for a flag that turns a default-on option off
    (--no-fusion), "both" for --x/--no-x; `label`: how errors name it."""

    kind: type
    help: str
    flags: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    row: bool = False
    shapes: bool = True
    cli: str = ""
    metavar: str | None = None
    label: str = ""


def _opt(default, kind, help, **kw):
    return field(default=default, metadata={"opt": Opt(kind, help, **kw)})


@dataclass
class UpscaleOptions:
    """Per-job (or per-request) settings; a row may override those marked `row`. None: the preset's value."""

    scale: float | None = _opt(None, float, "output scale (default: the model's native 4x)", flags=("-s", "--scale"),
                               lo=0.25, hi=16, row=True)  # fmt: skip
    steps: int | None = _opt(None, int, "sampler steps (default: the preset's: 4 distilled (at most 4), 25 "
                             "undistilled, 1 small)", flags=("--steps",), lo=1, hi=MAX_STEPS, row=True)  # fmt: skip
    cfg_scale: float | None = _opt(None, float, "guidance scale of the undistilled presets (default: the preset's, 5)",
                                   flags=("--cfg-scale",), lo=0.0, hi=50.0, row=True)  # fmt: skip
    shift: float | None = _opt(None, float, "flow shift of the undistilled presets (default: dynamic, "
                               "6 x sqrt(sqrt(H*W)/2048))", flags=("--shift",), lo=0.1, hi=100.0, row=True)  # fmt: skip
    seed: int = _opt(0, int, "run seed; each file's seed derives from it and its key", flags=("--seed",),
                     lo=0, hi=SEED_LIMIT - 1, row=True)  # fmt: skip
    caption: str = _opt("", str, "caption for every image", flags=("--caption",), row=True)
    degrade_sigma: float = _opt(0.0, float, "noise added to the LQ latent before diffusion",
                                flags=("--degrade-sigma",), lo=0.0, hi=1.0, row=True)  # fmt: skip
    sampler: str = _opt("sde", str, "fresh noise each step (sde) or none (ode)", flags=("--sampler",),
                        choices=("sde", "ode"))  # fmt: skip
    ensemble: bool | None = _opt(None, bool, "average with the prediction on a half-patch-shifted grid (default: the "
                                 "preset's; on for small, ~2x work; RGB-conditioned models only)",
                                 flags=("--ensemble",), cli="both")  # fmt: skip
    tile: int | None = _opt(None, int, "tile side in output pixels (default: the preset's)", flags=("-t", "--tile"),
                            lo=16, label="tile (--tile)")  # fmt: skip
    overlap: int | None = _opt(None, int, "tile overlap in latent pixels (default: the preset's, 5 for released "
                               "presets, 8 for small)", flags=("--overlap",), lo=0,
                               label="overlap (--overlap)")  # fmt: skip
    fusion: bool = _opt(True, bool, "blend tiles only at the end", flags=("--no-fusion",), cli="negate")
    tile_buckets: bool = _opt(False, bool, "every tile one of six fixed shapes per model, whatever the image size: few "
                              "shapes to compile and warm up, ~8-13%% more pixels diffused", flags=("--tile-buckets",),
                              shapes=False)  # fmt: skip
    format: str | None = _opt(None, str, "png, jpeg, webp, tiff, bmp (default: keep the input's)",
                              flags=("-f", "--format"), row=True)  # fmt: skip
    quality: int = _opt(95, int, "JPEG/WebP quality, 1-100", flags=("-q", "--quality"), lo=1, hi=100, row=True)
    background: str = _opt("white", str, "what a transparent image is flattened onto when the format has no alpha "
                           "(JPEG): a name or #rrggbb (default: white)", flags=("--background",), row=True,
                           metavar="COLOR")  # fmt: skip
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, int, "refuse larger inputs (pixels)", flags=("--max-pixels",), lo=1,
                           shapes=False)  # fmt: skip
    max_output_side: int = _opt(DEFAULT_MAX_OUTPUT_SIDE, int, "refuse outputs longer than this on a side",
                                flags=("--max-output-side",), lo=1, shapes=False)  # fmt: skip

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UpscaleOptions:
        return strict_from_dict(cls, d)

    def overridden(self, row: dict) -> UpscaleOptions:
        """These options with a row's (or request's) overrides (`OVERRIDES`: those it sets), each checked as declared
        (BadParameter otherwise); these very options when it sets none."""
        over = {k: row[k] for k in OVERRIDES if row.get(k) is not None}
        return replace(self, **over) if over else self


OPTS: dict[str, Opt] = {f.name: f.metadata["opt"] for f in fields(UpscaleOptions)}
DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(UpscaleOptions) if f.default is not MISSING}
# The options a row (a job's row, a request's parameters) may set over the defaults, with their types; the typed rows
# (`stages.rows.Overrides`) and the endpoint's parameters are made from it.
OVERRIDES: dict[str, type] = {name: o.kind for name, o in OPTS.items() if o.row}
SHAPING_OPTIONS: tuple[str, ...] = tuple(name for name, o in OPTS.items() if o.shapes)

_KIND_NAMES = {int: "an integer", float: "a number", str: "a text", bool: "true or false"}


@dataclass(frozen=True)
class Resolved:
    """A row's options as it enters (`pipeline.workflow.Workflow.enter`, the one way a row comes in): the row's
    overrides over the job's (or endpoint's) options, and every value the workflow's PiD preset decides filled in
    and checked against its sampler (`preset.sampling.settle`). No field is None-meaning-"the preset's"; two stay
    open because the input decides them: `format` (None: the input's own; the merge stage, from the decoded source)
    and, for a guided preset, `shift` (None: the dynamic shift of the output's size; the diffuse stage, from the tile
    plan: `preset.sampling.guidance`). A workflow without a PiD model (generate without an upscale) writes its image
    at its own size: scale 1 unless asked, and 0 for the PiD sampler's steps, ensemble, tile and overlap.

    The fields are `UpscaleOptions`' in its order; stages read them as they are."""

    scale: float  # the output scale: the asked one, else the preset's native one
    steps: int  # the sampler's steps (the asked ones or the preset's), within what the sampler can do
    cfg_scale: float | None  # the guidance scale of a guided preset; None: the preset samples without guidance
    shift: float | None  # a guided preset's flow shift; None: dynamic, from the output's size (or not guided)
    seed: int
    caption: str
    degrade_sigma: float
    sampler: str
    ensemble: int  # the shifted-grid ensemble's shift in output pixels; 0: off
    tile: int  # the tile side in output pixels
    overlap: int  # the tile overlap in latent pixels
    fusion: bool
    tile_buckets: bool
    format: str | None  # None: the input's own format
    quality: int
    background: str
    max_pixels: int
    max_output_side: int

    def __post_init__(self):
        # what a stage may set after entry (a latent file's caption and sigma, replace()) is checked as declared
        for name in _FREE:
            object.__setattr__(self, name, check(name, getattr(self, name)))

    @classmethod
    def of(cls, options: UpscaleOptions | Resolved, preset) -> Resolved:
        """`options` resolved against `preset`, the PiD model that samples (None: a workflow without one); options
        resolved already are returned as they are. BadParameter for what the preset's sampler or network cannot do
        (more steps than a distilled schedule has, guidance settings for a distilled preset, an ensemble the model
        cannot shift). `Workflow.enter` resolves each row with it; stages built without a workflow, and the callers
        that plan without a row, resolve their options with it too."""
        if isinstance(options, Resolved):
            return options
        values = asdict(options)
        if preset is None:
            values.update(scale=1.0 if options.scale is None else options.scale, steps=0, cfg_scale=None, shift=None,
                          ensemble=0, tile=0, overlap=0)  # fmt: skip
            return cls(**values)
        values.update(preset.sampling.settle(options))  # steps, cfg_scale, shift, ensemble
        values.update(scale=float(preset.scale) if options.scale is None else options.scale,
                      tile=options.tile or preset.default_tile or preset.envelope[1],
                      overlap=preset.tile_overlap if options.overlap is None else options.overlap)  # fmt: skip
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


_FREE = ("seed", "caption", "degrade_sigma", "format", "quality", "background")  # Resolved's fields as declared


def declared(cls) -> tuple[dict[str, Opt], dict[str, object]]:
    """An options dataclass's declarations: ({name: Opt}, {name: default})."""
    fs = fields(cls)
    return {f.name: f.metadata["opt"] for f in fs}, {f.name: f.default for f in fs if f.default is not MISSING}


def check(name: str, value, opts: dict[str, Opt] | None = None, defaults: dict | None = None):
    """`value` as option `name` of `opts` (default: the upscale options) takes it (an int given for a float becomes a
    float), or BadParameter naming the option, what it takes and what it got. None is taken where the option's
    default is None."""
    opts, defaults = (OPTS, DEFAULTS) if opts is None else (opts, defaults)
    o, label = opts[name], opts[name].label or name
    if value is None and defaults.get(name) is None:
        return None
    if name == "seed":
        return check_seed(value)
    if o.kind is bool:
        if not isinstance(value, bool):
            raise BadParameter(f"{label} must be true or false, got {value!r}")
        return value
    if o.kind is str:
        if not isinstance(value, str):
            raise BadParameter(f"{label} must be a text, got {value!r}")
        if o.choices and value not in o.choices:
            raise BadParameter(f"{label} must be {' or '.join(repr(c) for c in o.choices)}, got {value!r}")
        if name == "background" and opts is OPTS:
            parse_color(value)
        return value
    number = isinstance(value, int) if o.kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or (isinstance(value, float) and not math.isfinite(value)):
        raise BadParameter(f"{label} must be {_range_text(o)}, got {value!r}")
    if (o.lo is not None and value < o.lo) or (o.hi is not None and value > o.hi):
        raise BadParameter(f"{label} must be {_range_text(o)}, got {value!r}")
    return float(value) if o.kind is float else value


def _range_text(o: Opt) -> str:
    if o.kind is int:
        if o.hi is None:
            return f"an integer >= {o.lo:g}"
        return f"an integer in {o.lo:g}..{o.hi:g}" if o.hi < 1e9 else "an integer in [0, 2^63)"
    return f"in [{o.lo:g}, {o.hi:g}]" if o.hi is not None else f"a number >= {o.lo:g}"


def parse_color(value) -> tuple[int, int, int]:
    """A colour as users write it (`white`, `#202020`, `rgb(32,32,32)`: any name or form PIL knows) -> (r, g, b)."""
    from PIL import ImageColor

    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise BadParameter(f"background must be a colour such as white, black or #202020, got {value!r}")
    try:
        rgb = ImageColor.getrgb(value.strip())
    except ValueError:
        raise BadParameter(f"background must be a colour such as white, black or #202020, got {value!r}") from None
    return tuple(rgb[:3])


def add_arguments(group, parse=None, opts: dict[str, Opt] | None = None, defaults: dict | None = None,
                  names=None) -> None:  # fmt: skip
    """The options' command-line arguments, in their declared order, into an argparse group. `parse`: option name
    -> the argparse `type` to use instead of the plain one (e.g. the seed's, which explains its range); `opts`,
    `defaults`: another options class's declarations (`declared`); `names`: only these."""
    import argparse

    parse = parse or {}
    opts, defaults = (OPTS, DEFAULTS) if opts is None else (opts, defaults)
    for name, o in opts.items():
        if not o.flags or (names is not None and name not in names):
            continue
        default = defaults[name]
        if o.cli == "negate":
            group.add_argument(*o.flags, dest=name, action="store_false", help=o.help)
        elif o.cli == "both":
            group.add_argument(*o.flags, dest=name, action=argparse.BooleanOptionalAction, default=default,
                               help=o.help)  # fmt: skip
        elif o.kind is bool:
            group.add_argument(*o.flags, dest=name, action="store_true", help=o.help)
        else:
            group.add_argument(*o.flags, dest=name, type=parse.get(name, o.kind), default=default,
                               choices=list(o.choices) or None, metavar=o.metavar, help=o.help)  # fmt: skip


def from_args(args, opts: dict[str, Opt] | None = None) -> dict:
    """The options an argparse namespace made by `add_arguments` holds (those it has: a parser may leave some out)."""
    return {name: getattr(args, name) for name, o in (opts or OPTS).items() if o.flags and hasattr(args, name)}


def openapi_schema(o: Opt, default=None) -> dict:
    """An option's OpenAPI schema: its type, range, choices and default."""
    types = {int: "integer", float: "number", str: "string", bool: "boolean"}
    schema = {"type": types[o.kind]}
    if o.lo is not None:
        schema["minimum"] = o.lo
    if o.hi is not None and o.hi < 1e9:
        schema["maximum"] = o.hi
    if o.choices:
        schema["enum"] = list(o.choices)
    if default is not None:
        schema["default"] = default
    return schema


def openapi_parameters(names=None) -> list[dict]:
    """The row options as OpenAPI query parameters (type, range, choices, default, help), for the endpoint's schema;
    `names`: those to describe (default: every row option)."""
    out = []
    for name in names or OVERRIDES:
        o, schema = OPTS[name], openapi_schema(OPTS[name], DEFAULTS.get(name))
        out.append({"name": name, "in": "query", "required": False, "schema": schema,
                    "description": o.help.replace("%%", "%")})  # fmt: skip
    return out
