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
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from jobs.manifest import MANIFEST_NAME, load_manifest, manifest_key, manifest_row, write_manifest
from jobs.plan import Plan, output_candidates, plan_job
from jobs.storage import Location, S3Settings, display
from pipeline.errors import SetupError
from pipeline.graph import StageGraph
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
    in_place: bool = False  # DST is SRC: outputs beside the inputs (needs a suffix; inputs are never overwritten)
    follow_symlinks: bool = False  # follow symbolic links inside SRC (noted in the manifest)
    include_hidden: bool = False  # process files whose path has a segment starting with '.'
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
    interrupted: int = 0  # the signal that stopped the job, or 0
    manifest: str = ""  # where the manifest was written

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        head = f"interrupted ({signal.Signals(self.interrupted).name})" if self.interrupted else "done"
        return (
            f"{head}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped in {self.seconds:.1f}s "
            f"({self.images_per_second:.2f} images/s); manifest: {self.manifest}"
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
        except Exception as e:  # missing object, permissions, a file swapped for a link, network after retries
            return failed(row, "read", f"{type(e).__name__}: {e}", kind="bad_input")
        row["in_bytes"] = len(row["bytes"])
        row.setdefault("timings", {})["read"] = round(time.perf_counter() - t0, 4)
        return row


class WriteStage:
    def __init__(self, dst: Location):
        self.dst = dst

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        t0 = time.perf_counter()
        row["output_key"] = row["output_stem"] + row["extension"]  # the stem was made unique and safe by the plan
        try:
            self.dst.write(row["output_key"], row.pop("output"))
        except Exception as e:
            return failed(row, "write", f"{type(e).__name__}: {e}", kind="internal")
        row.setdefault("timings", {})["write"] = round(time.perf_counter() - t0, 4)
        return row


# ---------------------------------------------------------------------- Ray Data adapters
_INSTANCES: dict = {}


def _run_guarded(stage, name: str, row: dict) -> dict:
    try:
        return stage(row)
    except Exception as e:  # a bug or an unforeseen input must cost one row, not the job
        return failed(row, name, f"{type(e).__name__}: {e}", kind="internal")


def stage_task(item: dict, *, name: str, cls, kwargs: dict) -> dict:
    """Ray Data task function for light stages: the instance is cached per worker process."""
    key = (name, cls, repr(kwargs))
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(**kwargs)
    row = _run_guarded(_INSTANCES[key], name, pickle.loads(item["row"]))
    return {"i": item["i"], "row": pickle.dumps(row)}


class StageActor:
    """Ray Data actor for model stages: loads the model once, then maps rows."""

    def __init__(self, name: str, cls, kwargs: dict, threads: int | None = None):
        if threads:  # Ray pins workers to OMP_NUM_THREADS=num_cpus; a CPU-only model stage should use its share
            import torch

            torch.set_num_threads(threads)
        self.name, self.stage = name, cls(**kwargs)

    def __call__(self, item: dict) -> dict:
        row = _run_guarded(self.stage, self.name, pickle.loads(item["row"]))
        return {"i": item["i"], "row": pickle.dumps(row)}


def _stages(cfg: JobConfig, plan: Plan) -> list[tuple[str, type, dict, bool, bool]]:
    """(name, class, kwargs, holds_model, wants_gpu) for the whole job: read + the stage graph + write."""
    graph = StageGraph(cfg.model, cfg.options)
    out = [("read", ReadStage, {"src": plan.src}, False, False)]
    out += [(s.name, s.cls, s.kwargs, s.holds_model, s.wants_gpu) for s in graph.stages]
    out.append(("write", WriteStage, {"dst": plan.dst}, False, False))
    return out


def _iter_local(cfg: JobConfig, plan: Plan, rows: list[dict]) -> Iterator[dict]:
    stages = [(name, cls(**kw)) for name, cls, kw, _, _ in _stages(cfg, plan)]
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


def _iter_ray(cfg: JobConfig, plan: Plan, rows: list[dict]) -> Iterator[dict]:
    ray = _ensure_ray()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress with ETA
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Items carry an index, not the key: keys may hold bytes that are not UTF-8, which Arrow strings cannot.
    ds = ray.data.from_items([{"i": i, "row": pickle.dumps(r)} for i, r in enumerate(rows)])
    for name, cls, kw, holds_model, wants_gpu in _stages(cfg, plan):
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
    """Everything that can make the whole job fail, checked before any worker starts or any model loads.

    In the order a user can act on: the preset's encoder exists, options fit the preset, the device exists,
    SRC can be listed, DST can be written (a probe write + delete), the weights are there. Each failure is one
    SetupError line: what, where, how to fix.
    """
    from pipeline.model.presets import get_preset
    from pipeline.runtime import check_device, check_encoder, net_path
    from pipeline.stages.encode import plan_for

    preset = get_preset(cfg.model.preset)
    check_encoder(preset)  # "not implemented" before asking for weights the preset cannot use anyway
    side = preset.envelope[1] * 3 // max(1, preset.scale)  # an input that needs several tiles checks --overlap
    plan_for(preset, replace(cfg.options, max_output_side=1 << 30), (side, side))
    if cfg.local or not os.environ.get("RAY_ADDRESS"):  # a remote cluster's workers have their own devices
        check_device(cfg.model.device)
    Location(cfg.src, cfg.s3).check_listable()
    if not cfg.dry_run:
        Location(cfg.dst, cfg.s3).check_writable()
    path = net_path(cfg.model)  # raises with the how-to message when the preset's files are missing
    if not os.path.isfile(path):
        raise SetupError(f"checkpoint not found: {path}")
    if preset.text_encoder != "none" and not cfg.model.text_encoder and not cfg.model.allow_download:
        raise SetupError(
            f"preset {preset.name!r} needs the Gemma-2-2B-it caption encoder: pass --text-encoder DIR "
            "(a local copy of Efficient-Large-Model/gemma-2-2b-it) or --allow-download"
        )


class Interrupted(BaseException):
    """SIGINT/SIGTERM during a job: the job stops, writes its manifest, and exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so that no per-row `except Exception` records it as a failed input.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def _on_signals(handler):
    """SIGINT/SIGTERM go to `handler` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_job(cfg: JobConfig, on_row=None) -> Summary:
    """Run the job; returns the summary. The manifest (Parquet) is written at DST whatever happens once planned."""
    t0 = time.time()
    preflight(cfg)
    plan = plan_job(cfg)
    todo = plan.todo
    summary = Summary(skipped=len(plan.skipped))
    if cfg.dry_run:
        summary.failed = len(plan.rejected)
        summary.rows = [{**manifest_row(r, cfg.model.preset), "status": "planned",
                         "output_key": display(r["output_stem"]) + ".*"} for r in todo]  # fmt: skip
        summary.rows += plan.rejected + plan.skipped
        return summary
    results: dict[str, dict] = {}
    previous = load_manifest(plan.dst) if cfg.resume else {}
    fixed = {**{manifest_key(r): r for r in plan.skipped}, **{manifest_key(r): r for r in plan.rejected}}

    def merged() -> list[dict]:
        rows = {**previous, **fixed, **results}
        if summary.interrupted:  # one row per input, whatever happened
            rows.update(_unfinished(cfg, plan, [r for r in todo if r["key"] not in results]))
        return list(rows.values())

    bar = _progress(len(todo), cfg.progress)
    last_flush = time.time()
    try:
        with _on_signals(_raise_interrupted):
            if not cfg.local and todo:
                _ensure_ray()  # start Ray before our handlers matter: its start-up installs handlers of its own
            it: Iterable[dict] = _iter_local(cfg, plan, todo) if cfg.local else _iter_ray(cfg, plan, todo)
            for row in it:
                results[row["key"]] = manifest_row(row, cfg.model.preset)
                bar.update(1)
                if on_row:
                    on_row(row)
                if time.time() - last_flush > MANIFEST_EVERY_S:  # a crash keeps what was done so far on record
                    write_manifest(plan.dst, merged())
                    last_flush = time.time()
    except Interrupted as e:
        summary.interrupted = e.signum
    finally:
        bar.close()
        with _on_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the manifest short
            for r in results.values():
                summary.ok += r["status"] == "ok"
                summary.failed += r["status"] == "failed"
            summary.failed += len(plan.rejected)
            summary.seconds = time.time() - t0
            summary.rows = merged()
            summary.manifest = write_manifest(plan.dst, summary.rows)
            plan.dst.remove_stale_temporaries()
    return summary


def _unfinished(cfg: JobConfig, plan: Plan, rows: list[dict]) -> dict[str, dict]:
    """Manifest rows for inputs an interrupted job did not report: `interrupted`, and whether an output landed.

    A worker may have written an output (atomically: it is complete) that the driver had not heard of yet.
    """
    try:
        existing = {e.key for e in plan.dst.list(images_only=False)}
    except Exception:  # DST not listable now: say nothing about outputs
        existing = set()
    out = {}
    for r in rows:
        hit = next((c for c in output_candidates(r["output_stem"], cfg.options.format) if c in existing), "")
        error = ("interrupted after its output was written (complete; --resume keeps it)" if hit
                 else "interrupted before it finished; --resume does it")  # fmt: skip
        out[r["key"]] = manifest_row({**r, "status": "interrupted", "error": error}, cfg.model.preset)
        out[r["key"]]["output_key"] = display(hit)
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="upscale", disable=not enabled, smoothing=0.1)


__all__ = ["JobConfig", "Summary", "run_job", "plan_job", "MANIFEST_NAME"]
