"""The bulk upscaling job: list → read → decode → encode → diffuse → merge → write, on Ray Data or a plain loop.

Rows travel between Ray Data operators as {"key", "row": pickled stage row}: stage rows hold
images, tensors and metadata of varying shape, which Arrow need not understand. The model stages
run as actor pools (model loaded once per actor, `num_gpus` when the cluster has GPUs); I/O, decode
and merge run as CPU tasks. A stage never raises for a bad input: the row is marked failed with
its reason and the job goes on. A crashed actor is restarted by Ray and its rows retried.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from jobs.manifest import MANIFEST_NAME, load_manifest, manifest_row, write_manifest
from jobs.storage import Location, S3Settings, output_key
from pipeline.graph import StageGraph
from pipeline.noise import file_seed
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions, failed, is_failed

MANIFEST_EVERY_S = 60.0


@dataclass
class JobConfig:
    src: str
    dst: str
    model: ModelOptions = field(default_factory=ModelOptions)
    options: UpscaleOptions = field(default_factory=UpscaleOptions)
    s3: S3Settings = field(default_factory=S3Settings)
    suffix: str = ""
    captions: dict[str, str] = field(default_factory=dict)  # key -> caption (from a manifest CSV/JSONL)
    resume: bool = False
    dry_run: bool = False
    local: bool = False  # plain in-process loop instead of Ray Data
    concurrency: dict[str, int] = field(default_factory=dict)  # stage name -> actors (model stages)
    progress: bool = True


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"done: {self.ok} ok, {self.failed} failed, {self.skipped} skipped in {self.seconds:.1f}s "
            f"({self.images_per_second:.2f} images/s)"
        )


# ---------------------------------------------------------------------- I/O stages (job-side, not model stages)
class ReadStage:
    def __init__(self, src: Location):
        self.src = src

    def __call__(self, row: dict) -> dict:
        row = dict(row)
        t0 = time.perf_counter()
        try:
            row["bytes"] = self.src.read(row["key"])
        except Exception as e:  # missing object, permissions, network after boto3's retries
            return failed(row, "read", f"{type(e).__name__}: {e}")
        row["in_bytes"] = len(row["bytes"])
        row.setdefault("timings", {})["read"] = round(time.perf_counter() - t0, 4)
        return row


class WriteStage:
    def __init__(self, dst: Location, suffix: str = ""):
        self.dst, self.suffix = dst, suffix

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        t0 = time.perf_counter()
        row["output_key"] = output_key(row["key"], row["extension"], self.suffix)
        try:
            self.dst.write(row["output_key"], row.pop("output"))
        except Exception as e:
            return failed(row, "write", f"{type(e).__name__}: {e}")
        row.setdefault("timings", {})["write"] = round(time.perf_counter() - t0, 4)
        return row


# ---------------------------------------------------------------------- Ray Data adapters
_INSTANCES: dict = {}


def _run_guarded(stage, name: str, row: dict) -> dict:
    try:
        return stage(row)
    except Exception as e:  # a bug or an unforeseen input must cost one row, not the job
        return failed(row, name, f"{type(e).__name__}: {e}")


def stage_task(item: dict, *, name: str, cls, kwargs: dict) -> dict:
    """Ray Data task function for light stages: the instance is cached per worker process."""
    key = (name, cls, repr(kwargs))
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(**kwargs)
    row = _run_guarded(_INSTANCES[key], name, pickle.loads(item["row"]))
    return {"key": item["key"], "row": pickle.dumps(row)}


class StageActor:
    """Ray Data actor for model stages: loads the model once, then maps rows."""

    def __init__(self, name: str, cls, kwargs: dict, threads: int | None = None):
        if threads:  # Ray pins workers to OMP_NUM_THREADS=num_cpus; a CPU-only model stage should use its share
            import torch

            torch.set_num_threads(threads)
        self.name, self.stage = name, cls(**kwargs)

    def __call__(self, item: dict) -> dict:
        row = _run_guarded(self.stage, self.name, pickle.loads(item["row"]))
        return {"key": item["key"], "row": pickle.dumps(row)}


# ---------------------------------------------------------------------- planning
def candidate_outputs(key: str, cfg: JobConfig) -> list[str]:
    """Output keys this input can have (the extension depends on the decoded image when the format is kept)."""
    from pipeline.imageio import EXTENSIONS, FORMATS

    if cfg.options.format:
        return [output_key(key, EXTENSIONS[FORMATS[cfg.options.format.lower().lstrip(".")]], cfg.suffix)]
    same = FORMATS.get(key.rsplit(".", 1)[-1].lower())
    exts = dict.fromkeys([EXTENSIONS.get(same, ".png"), ".png"])
    return [output_key(key, e, cfg.suffix) for e in exts]


def plan_job(cfg: JobConfig) -> tuple[list[dict], list[dict]]:
    """(rows to process, manifest rows skipped by --resume). Each row: key, seed, caption override.

    --resume trusts what is in DST: outputs are written atomically, so an output that exists is
    complete. It works after a crash that left no manifest.
    """
    src, dst = Location(cfg.src, cfg.s3), Location(cfg.dst, cfg.s3)
    listed = src.list()
    if not listed:
        raise FileNotFoundError(f"no images found under {cfg.src}")
    existing, previous = set(), {}
    if cfg.resume:
        try:
            existing = {k for k, _ in dst.list(images_only=False)}
        except FileNotFoundError:
            existing = set()
        previous = load_manifest(dst) if MANIFEST_NAME in existing else {}
    todo, skipped = [], []
    for key, size in listed:
        row = {"key": key, "seed": file_seed(cfg.options.seed, key), "in_bytes": size}
        if key in cfg.captions:
            row["caption"] = cfg.captions[key]
        hit = next((c for c in candidate_outputs(key, cfg) if c in existing), None)
        if hit:
            base = previous.get(key) or manifest_row({**row, "status": "skipped"}, cfg.model.preset)
            skipped.append({**base, "status": "skipped", "error": "", "output_key": hit})
            continue
        todo.append(row)
    return todo, skipped


def _stages(cfg: JobConfig) -> list[tuple[str, type, dict, bool, bool]]:
    """(name, class, kwargs, holds_model, wants_gpu) for the whole job: read + the stage graph + write."""
    graph = StageGraph(cfg.model, cfg.options)
    src, dst = Location(cfg.src, cfg.s3), Location(cfg.dst, cfg.s3)
    out = [("read", ReadStage, {"src": src}, False, False)]
    out += [(s.name, s.cls, s.kwargs, s.holds_model, s.wants_gpu) for s in graph.stages]
    out.append(("write", WriteStage, {"dst": dst, "suffix": cfg.suffix}, False, False))
    return out


def _iter_local(cfg: JobConfig, rows: list[dict]) -> Iterator[dict]:
    stages = [(name, cls(**kw)) for name, cls, kw, _, _ in _stages(cfg)]
    for row in rows:
        for name, stage in stages:
            row = _run_guarded(stage, name, row)
        yield row


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _iter_ray(cfg: JobConfig, rows: list[dict]) -> Iterator[dict]:
    ray = _ensure_ray()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress with ETA
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items([{"key": r["key"], "row": pickle.dumps(r)} for r in rows])
    for name, cls, kw, holds_model, wants_gpu in _stages(cfg):
        if holds_model:
            n = cfg.concurrency.get(name) or (max(1, gpus) if wants_gpu else 1)
            threads = None if (wants_gpu and gpus) else max(1, cpus // n)
            ds = ds.map(
                StageActor,
                fn_constructor_kwargs={"name": name, "cls": cls, "kwargs": kw, "threads": threads},
                concurrency=n,
                num_gpus=1 if (wants_gpu and gpus) else 0,
            )
        else:
            ds = ds.map(stage_task, fn_kwargs={"name": name, "cls": cls, "kwargs": kw})
    for item in ds.iter_rows():
        yield pickle.loads(item["row"])


def preflight(cfg: JobConfig) -> None:
    """Fail before any worker starts when the model's files are missing (a clear message, not an actor crash)."""
    from pipeline.model.presets import get_preset
    from pipeline.runtime import net_path

    preset = get_preset(cfg.model.preset)
    path = net_path(cfg.model)  # raises with the how-to message when the preset's files are missing
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if preset.text_encoder != "none" and not cfg.model.text_encoder and not cfg.model.allow_download:
        raise FileNotFoundError(
            f"preset {preset.name!r} needs the Gemma-2-2B-it caption encoder: pass --text-encoder DIR "
            "(a local copy of Efficient-Large-Model/gemma-2-2b-it) or --allow-download"
        )


def run_job(cfg: JobConfig, on_row=None) -> Summary:
    """Run the job; returns the summary and writes the manifest (Parquet) at DST."""
    t0 = time.time()
    preflight(cfg)
    todo, skipped = plan_job(cfg)
    summary = Summary(skipped=len(skipped))
    if cfg.dry_run:
        summary.rows = [{**r, "status": "planned"} for r in todo] + skipped
        return summary
    model_name = cfg.model.preset
    results: list[dict] = []
    it: Iterable[dict] = _iter_local(cfg, todo) if cfg.local else _iter_ray(cfg, todo)
    dst = Location(cfg.dst, cfg.s3)
    previous = load_manifest(dst) if cfg.resume else {}

    def merged() -> list[dict]:
        return list({**previous, **{r["key"]: r for r in skipped}, **{r["key"]: r for r in results}}.values())

    bar = _progress(len(todo), cfg.progress)
    last_flush = time.time()
    for row in it:
        results.append(manifest_row(row, model_name))
        bar.update(1)
        if on_row:
            on_row(row)
        if time.time() - last_flush > MANIFEST_EVERY_S:  # a crash keeps what was done so far on record
            write_manifest(dst, merged())
            last_flush = time.time()
    bar.close()
    for r in results:
        summary.ok += r["status"] == "ok"
        summary.failed += r["status"] == "failed"
    summary.seconds = time.time() - t0
    summary.rows = merged()
    write_manifest(dst, summary.rows)
    dst.remove_stale_temporaries()
    return summary


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="upscale", disable=not enabled, smoothing=0.1)


__all__ = ["JobConfig", "Summary", "run_job", "plan_job", "MANIFEST_NAME"]
