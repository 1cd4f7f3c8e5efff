"""The settings that shape an output, recorded in the manifest's Parquet metadata, and `--resume`'s check of them.

A manifest records, besides its rows, the run's settings (`pidray.settings`, JSON), pidray's version and the
run's start time. `--resume` keeps the outputs already in DST only when they were made with the settings asked for
now: with different ones it refuses in one line, or (`--resume=redo-changed`) redoes them with the new settings.
"""

from __future__ import annotations

import io
import json
import time

from pipeline.errors import SetupError, storage_failures
from pipeline.options import SHAPING_OPTIONS

SETTINGS_KEY, VERSION_KEY, STARTED_KEY = b"pidray.settings", b"pidray.version", b"pidray.started"
REDO_CHANGED = "redo-changed"
# the settings compared by --resume, in the order they are named when they differ: the model, then every option
# declared as shaping the output (pipeline.options)
SHAPING = ("preset", "precision", "generator", *SHAPING_OPTIONS)


def output_settings(cfg) -> dict:
    """What shapes every output of this job, resolved (the preset's defaults filled in) so that an explicit
    default and an omitted flag compare equal."""
    o = cfg.options
    out = {name: getattr(o, name) for name in SHAPING_OPTIONS}
    out.update(preset=cfg.model.preset, format=o.format.lower() if o.format else "keep", tile=o.tile or "auto",
               overlap=o.overlap if o.overlap is not None else "preset")  # fmt: skip
    try:
        from pipeline.options import Resolved

        preset = cfg.flow.preset
        out["preset"] = preset.name  # an alias and its preset are one model
        # against the workflow's own preset, as rows enter an upscale or decode job (a generate job's are recorded
        # against its text-to-image preset, as they always were: earlier manifests compare equal)
        r = Resolved.of(o, preset)
        out["scale"] = r.scale
        out["steps"] = r.steps
        out["ensemble"] = bool(r.ensemble) if preset.upscales else False
    except ValueError:  # options the preset cannot take (BadParameter): preflight refuses the job in its own words
        out.update(scale=o.scale, steps=o.steps, ensemble=o.ensemble)
    out["precision"] = _precision(cfg.model)
    if cfg.flow.takes_prompts:
        out["generate"] = {k: v for k, v in sorted(cfg.gen.items())}
        if cfg.ldm:  # another generator's latents would be other images, whatever the PiD preset
            out["generator"] = cfg.ldm
    return out


def _precision(model) -> str:
    try:
        from pipeline.runtime import pick_device, pick_dtype

        return str(pick_dtype(model.dtype, pick_device(model.device))).replace("torch.", "")
    except (SetupError, ValueError):  # an unknown device or dtype: preflight refuses the job in its own words
        return str(model.dtype)


def run_metadata(cfg, started: float) -> dict[bytes, bytes]:
    """The manifest's Parquet key-value metadata for this run."""
    from pipeline import __version__

    return {
        SETTINGS_KEY: json.dumps(output_settings(cfg), sort_keys=True, default=str).encode(),
        VERSION_KEY: __version__.encode(),
        STARTED_KEY: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)).encode(),
    }


def recorded_settings(dst) -> dict | None:
    """The settings DST's manifest records, or None (no manifest, an older one, or one that cannot be read: the
    job's own reading of the manifest says what is wrong with it)."""
    import pyarrow.parquet as pq

    from jobs.manifest import MAX_MANIFEST_BYTES, manifest_parts

    try:
        parts = manifest_parts(dst)  # the file, or a folder of parts: each part holds the run's settings
        size = dst.size(parts[0]) if parts else -1
        if size < 0 or size > MAX_MANIFEST_BYTES:
            return None
        meta = pq.ParquetFile(io.BytesIO(dst.read(parts[0], MAX_MANIFEST_BYTES + 1))).schema_arrow.metadata
        got = json.loads((meta or {}).get(SETTINGS_KEY, b"null"))
    except Exception:  # a manifest that cannot be read (pyarrow raises many types on a damaged file): none recorded
        return None
    return got if isinstance(got, dict) else None


def _show(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return "the input's" if value == "keep" else "none" if value is None else str(value)


def check_resume(cfg, note=None):
    """The job config for --resume: unchanged when DST's outputs were made with these settings (or nothing says
    how they were made); a SetupError naming what changed; with --resume=redo-changed, a config that replaces
    pidray's earlier outputs instead of keeping them (--overwrite's rules)."""
    if not cfg.resume:
        return cfg
    from pipeline.storage import Location

    try:
        before = recorded_settings(Location(cfg.dst, cfg.s3))
    except storage_failures():  # DST cannot be looked at now: preflight says why
        return cfg
    if before is None:
        return cfg
    now = output_settings(cfg)
    changed = [k for k in SHAPING if (k in before and k in now or k == "generator") and before.get(k) != now.get(k)]
    if now.get("generate") != before.get("generate", now.get("generate")):
        changed.append("generate")
    if not changed:
        return cfg.with_(resume=True)
    if cfg.resume == REDO_CHANGED:
        if note:
            note(f"pidray: note: DST's outputs were made with other settings ({', '.join(changed)}): redoing them")
        return cfg.with_(resume=False, overwrite=True)
    what = ", ".join(f"{k} {_show(before.get(k))} (now {_show(now.get(k))})" for k in changed if k != "generate")
    raise SetupError(
        f"--resume: the outputs in DST were made with {what or 'other prompt settings'}; rerun with those "
        f"settings, or --resume={REDO_CHANGED} to redo them with these, or choose another DST"
    )
