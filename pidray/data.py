"""pidray as a step of your own Ray Data pipeline.

    import ray
    import pidray.data

    ds = ray.data.read_parquet("s3://bucket/train/")
    ds = ds.filter(lambda row: row["width"] >= 256)
    ds = pidray.data.upscale(ds, preset="small", image_column="image", caption_column="text")
    ds.write_parquet("s3://bucket/train-upscaled/")

`upscale` adds the bulk job's stage graph (the same stage classes, actor pools and GPU shares: `jobs.raydata`) to the
dataset, lazily, and returns it with the image column holding the upscaled files' bytes and two more columns:
`pidray_status` ("ok" or "failed") and `pidray_error` (why a row failed, else null). A row that fails keeps its
place with a null image; every other column is kept as it was. The arguments are checked before anything runs.
`decode` does the same for a column of latent files (`pidray decode`'s workflow).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import fields

import numpy as np

from pipeline.errors import BadInput, BadParameter, SetupError, is_number
from pipeline.runtime import ModelOptions
from pipeline.stages.common import UpscaleOptions

STATUS_COLUMN, ERROR_COLUMN = "pidray_status", "pidray_error"
_MODEL = [f.name for f in fields(ModelOptions) if f.name != "preset"]
_MODEL_FLAGS = ("allow_download", "compile")  # the model's options that are switches; the others are text
_OPTIONS = [f.name for f in fields(UpscaleOptions)]
_REST = "pidray_rest"  # what a stage row carries of its dataset row (stages pass it on), put back when it leaves
ENTER_ROWS = 8  # rows per call where the dataset's rows become stage rows


def upscale(ds, preset: str = "small", image_column: str = "image", caption_column: str | None = None, *,
            key_column: str | None = None, concurrency: dict[str, int] | None = None, **options):  # fmt: skip
    """`ds` with each row's image upscaled: the `image_column` (binary, or a struct of {bytes, path}) holds the
    output file's bytes (a struct's path takes the output format's extension), `pidray_status` and `pidray_error`
    say how each row went; lazy, like every Ray Data step.

    preset: a preset name or preset file; caption_column: text PiD conditions on (else the `caption` option);
    key_column: a column naming each row (its noise seed is drawn from it; by default from the image's bytes);
    concurrency: actors per model stage (by default one per GPU, one on a CPU cluster); options: those of
    `pidray upscale` (scale, steps, seed, format, quality, background, max_pixels, ...) and of the model (weights,
    device, dtype, ...). BadParameter for an unknown option or column, before anything runs."""
    from pipeline.workflow import resolve_workflow

    model, opts = _options(preset, options)
    workflow = resolve_workflow(model=model, options=opts)  # the preset looked up once, here
    _check_steps(workflow)
    layout = _check_columns(ds, image_column, caption_column, key_column)
    return _with_graph(
        ds,
        workflow,
        concurrency,
        image_column,
        {"image_column": image_column, "layout": layout, "caption_column": caption_column, "key_column": key_column},
    )


def decode(ds, preset: str, latent_column: str = "latent", caption_column: str | None = None, *,
           key_column: str | None = None, sigma_column: str | None = None, latent_format: str | None = None,
           concurrency: dict[str, int] | None = None, **options):  # fmt: skip
    """`ds` with each row's latent decoded by PiD in place of its VAE decoder: the `latent_column` (a latent file's
    bytes — .safetensors, .npy or .npz, as `pidray decode` reads them — binary or a struct of {bytes, path}) holds
    the image file's bytes, with `pidray_status` and `pidray_error`; lazy.

    preset: a PiD preset that decodes latents (flux-2k, sd3-2k, ...); caption_column: text PiD conditions on (else
    the file's own caption, else the `caption` option); sigma_column: a captured x_t's scheduler sigma per row
    (else the file's own; null: a clean latent); latent_format: what the latents are (default: each file's metadata,
    else the preset's VAE; e.g. flux-packed); key_column, concurrency, options: as `upscale`'s."""
    from pipeline.latents import check_decodes, check_format
    from pipeline.workflow import resolve_workflow

    model, opts = _options(preset, options)
    workflow = resolve_workflow("decode", model, opts, latent_format=latent_format)
    check_decodes(workflow.preset)
    check_format(latent_format, workflow.preset)
    _check_steps(workflow)
    layout = _check_columns(ds, latent_column, caption_column, key_column, sigma_column)
    return _with_graph(
        ds,
        workflow,
        concurrency,
        latent_column,
        {
            "image_column": latent_column,
            "layout": layout,
            "caption_column": caption_column,
            "key_column": key_column,
            "sigma_column": sigma_column,
            "latents": True,
        },
    )


# ------------------------------------------------------------------------------------ checks before anything runs
def _options(preset, options: dict) -> tuple[ModelOptions, UpscaleOptions]:
    if not isinstance(preset, str) or not preset:
        raise BadParameter(f"preset must be a preset name or file, got {preset!r}")
    unknown = sorted(set(options) - set(_MODEL) - set(_OPTIONS))
    if unknown:
        raise BadParameter(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(_OPTIONS + _MODEL)}")
    model = {k: v for k, v in options.items() if k in _MODEL}
    for k, v in model.items():
        want = (bool, type(None)) if k in _MODEL_FLAGS else (str, type(None))
        if not isinstance(v, want):
            raise BadParameter(f"{k} must be {'True or False' if k in _MODEL_FLAGS else 'text'}, got {v!r}")
    opts = UpscaleOptions.from_dict({k: v for k, v in options.items() if k in _OPTIONS})
    if opts.format is not None:
        from pipeline.imageio import FORMATS

        if not isinstance(opts.format, str) or opts.format.lower().lstrip(".") not in FORMATS:
            raise BadParameter(f"unknown output format {opts.format!r}; choose one of {sorted(set(FORMATS))}")
    return ModelOptions(preset=preset, **model), opts


def _check_steps(workflow) -> None:
    preset = workflow.preset
    if not preset.upscales:  # as the bulk job's preflight says it
        raise BadParameter(f"preset {preset.name!r} is a text-to-image model: it does not upscale")
    workflow.resolved  # the options against the preset (steps, guidance, ensemble): refused before anything runs


def _check_columns(ds, image_column: str, caption_column: str | None, key_column: str | None,
                   sigma_column: str | None = None) -> str:  # fmt: skip
    """The image column's layout ("binary" or "struct"); BadParameter naming the columns there are for one that is
    not, BadInput for a column of the wrong type."""
    import pyarrow as pa

    from pipeline.datasets.parquet import check_columns

    if not hasattr(ds, "map_batches") or not hasattr(ds, "schema"):
        raise BadParameter(f"pidray.data.upscale takes a ray.data.Dataset, got {type(ds).__name__}")
    named = {"image_column": image_column, "caption_column": caption_column, "key_column": key_column,
             "sigma_column": sigma_column}  # fmt: skip
    for what, col in named.items():
        if col is not None and (not isinstance(col, str) or not col):
            raise BadParameter(f"{what} must be a column name, got {col!r}")
    schema = ds.schema()
    if schema is None:  # an empty dataset: nothing to check, nothing will run
        return "binary"
    names = list(schema.names)
    for col in named.values():
        if col is not None and col not in names:
            raise BadParameter(f"the dataset has no column {col!r}; its columns are: {', '.join(names) or 'none'}")
    taken = [c for c in (STATUS_COLUMN, ERROR_COLUMN) if c in names]
    if taken:
        raise BadParameter(f"the dataset already has a column {taken[0]!r} (pidray adds it): drop or rename it first")
    base = getattr(schema, "base_schema", None)
    if isinstance(base, pa.Schema):  # Arrow blocks: the types are known
        if sigma_column is not None and not (pa.types.is_floating(t := base.field(sigma_column).type)
                                             or pa.types.is_integer(t) or pa.types.is_null(t)):  # fmt: skip
            raise BadInput(f"sigma column {sigma_column!r} of the dataset is {t}, not a number")
        return check_columns(base, "the dataset", image_column, caption_column)
    return "binary"


# ------------------------------------------------------------------------------------ the graph on the dataset
def _with_graph(ds, workflow, concurrency, image_column: str, enter: dict):
    import ray

    from jobs.raydata import add_stages
    from pipeline.graph import StageGraph

    graph = StageGraph(workflow=workflow)
    model_stages = [s.name for s in graph.model_stages()]
    concurrency = dict(concurrency or {})
    for name, n in concurrency.items():
        if name not in model_stages:
            raise BadParameter(f"concurrency names the model stages ({', '.join(model_stages)}), not {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BadParameter(f"concurrency[{name!r}] must be a whole number of actors >= 1, got {n!r}")
    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = graph.actors(gpus, concurrency)
    if gpus and graph.gpus_needed(actors) > gpus:
        raise SetupError(f"the actors asked for ({actors}) need {graph.gpus_needed(actors):g} GPUs; the cluster has "
                         f"{gpus}")  # fmt: skip
    ds = ds.map_batches(_enter, batch_format="pyarrow", batch_size=ENTER_ROWS, zero_copy_batch=True,
                        fn_kwargs={**enter, "workflow": workflow})  # fmt: skip
    ds = add_stages(ds, graph, actors, gpus, cpus)
    return ds.map_batches(_leave, batch_format="numpy", batch_size=ENTER_ROWS, fn_kwargs={"image_column": image_column})


def _ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _enter(batch, *, workflow, image_column: str, layout: str, caption_column: str | None, key_column: str | None,
           sigma_column: str | None = None, latents: bool = False) -> dict:  # fmt: skip
    """A batch of the dataset's rows -> stage rows ({"i", "row": pickled}) entered into `workflow` (its options
    resolved, `Workflow.enter`): the image's (or latent file's) bytes, its caption, sigma and key, and the rest of
    the row (every column, the image's bytes left out) to be put back when it leaves. A latent's key takes its file's
    extension, from its first bytes (the latent stage reads by name)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.datasets.parquet import output_table
    from pipeline.stages import failed

    col = batch.column(image_column)
    n = batch.num_rows
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:  # whatever `layout` guessed
        data = pc.struct_field(col, "bytes").to_pylist()
    else:
        data = col.to_pylist()
    captions = batch.column(caption_column).to_pylist() if caption_column else [None] * n
    keys = batch.column(key_column).to_pylist() if key_column else [None] * n
    sigmas = batch.column(sigma_column).to_pylist() if sigma_column else [None] * n
    rest = output_table(batch, image_column, [b""] * n)  # the image's bytes travel once, in the stage row
    rows = []
    for j in range(n):
        image = data[j]
        cell = isinstance(image, (bytes, bytearray, memoryview))
        key = str(keys[j]) if keys[j] is not None else _digest(image if cell else None)
        row = {"key": key, "bytes": image, _REST: _ipc(rest.slice(j, 1))}
        if isinstance(captions[j], str) and captions[j]:
            row["caption"] = captions[j]
        if sigmas[j] is not None:
            row["sigma"] = sigmas[j]  # checked with the latent (`_latent_row`): a number, else the row fails
        what = "latent" if latents else "image"
        if image is None:
            row = failed(row, "input", BadInput(f"no {what}: the {image_column!r} cell is null"))
        elif not cell:  # a dataset of pandas blocks: its column's type was not checked up front
            row = failed(row, "input", BadInput(f"the {image_column!r} cell is {type(image).__name__}, not bytes"))
        elif latents:
            row = _latent_row(row, image)
        rows.append(pickle.dumps(workflow.enter(row)))
    return {"i": np.arange(n), "row": np.array(rows, dtype=object)}


def _latent_row(row: dict, data: bytes) -> dict:
    """A latent cell's row: its key named as the file its first bytes say it is, or failed when they say none; a
    sigma that is not a finite number >= 0 fails the row."""
    from pipeline.stages import failed

    sigma = row.get("sigma")
    if sigma is not None and not (is_number(sigma) and 0.0 <= sigma < 1e3):  # NaN, text, a list too
        return failed(row, "input", BadInput(f"sigma must be a number >= 0, got {str(sigma)[:40]!r}"))
    from pipeline.latents import latent_extension

    ext = latent_extension(data)
    if ext is None:
        return failed(row, "input", BadInput("not a latent file (.safetensors, .npy or .npz bytes)"))
    sigma = {} if sigma is None else {"sigma": float(sigma)}
    return {**row, **sigma, "key": row["key"] + ext, "src_key": "latent" + ext}  # read by its bytes' name, not the key


def _digest(data: bytes | None) -> str:
    return hashlib.blake2b(data or b"", digest_size=8).hexdigest()


def _leave(batch: dict, *, image_column: str):
    """Stage rows as they leave the merge stage -> the dataset's rows again, the image column holding the output's
    bytes (null for a failed row), with `pidray_status` and `pidray_error`."""
    import pyarrow as pa

    from pipeline.datasets.parquet import output_table

    rows = [pickle.loads(b) for b in batch["row"]]
    rest = pa.concat_tables([pa.ipc.open_stream(r[_REST]).read_all() for r in rows], promote_options="default")
    done = [r.get("status") == "ok" and r.get("output") is not None for r in rows]
    images = [r["output"] if ok else None for r, ok in zip(rows, done)]
    exts = [r.get("extension") if ok else None for r, ok in zip(rows, done)]
    out = output_table(rest, image_column, images, exts)
    out = out.append_column(STATUS_COLUMN, pa.array(["ok" if ok else "failed" for ok in done], pa.string()))
    errors = [None if ok else (r.get("error") or "failed") for r, ok in zip(rows, done)]
    return out.append_column(ERROR_COLUMN, pa.array(errors, pa.string()))
