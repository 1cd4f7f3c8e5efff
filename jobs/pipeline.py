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
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from jobs.lease import Lease
from jobs.manifest import MANIFEST_NAME, manifest_key, manifest_row, set_aside, write_manifest
from jobs.plan import Plan, output_candidates, plan_job
from pipeline.errors import SetupError
from pipeline.graph import StageGraph, StageSpec
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions, run_stage
from pipeline.storage import Location, S3Settings, display
from pipeline.workflow import DEFAULT_WORKFLOW, Ldm, Workflow, resolve_workflow

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
    overwrite: bool = False  # replace outputs already in DST -- only those DST's manifest records as pidray's own
    dry_run: bool = False
    local: bool | None = None  # True: the in-process loop; False: Ray Data; None: the loop for small jobs, no cluster
    verbose: bool = False  # let Ray's own start-up and worker messages through to the terminal
    concurrency: dict[str, int] = field(default_factory=dict)  # stage name -> actors (model stages)
    progress: bool = True
    workflow: str = DEFAULT_WORKFLOW  # a name in pipeline.workflow.WORKFLOWS, e.g. "decode": SRC holds latents
    latent_format: str | None = None  # decode: what the latents are (flux, zimage, sd3, sdxl, flux2, qwenimage)
    out_size: tuple[int, int] | None = None  # decode: an explicit output size (H, W) instead of latent × factors
    sigma: float | None = None  # decode: the latents are captured x_t at this scheduler sigma
    gen: dict = field(default_factory=dict)  # generate: GenerateOptions fields (SRC is a prompt file)
    upscale: ModelOptions | None = None  # generate: upscale each image with this PiD model
    ldm: str | None = None  # generate-then-decode: the latent diffusion model (name or folder); `model` decodes
    output_name: str = ""  # SRC is one file, DST named a file: the output's name in DST without its extension


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the job, or 0
    runner: str = ""  # "local loop" or "Ray Data"
    manifest: str = ""  # where the manifest was written
    failures_shown: bool = False  # each failed input was said on the terminal as it happened

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        head = f"interrupted ({signal.Signals(self.interrupted).name})" if self.interrupted else "done"
        return (
            f"{head}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped in {self.seconds:.1f}s "
            f"({self.images_per_second:.2f} images/s, {self.runner or 'nothing to run'}); manifest: {self.manifest}"
        )


# ---------------------------------------------------------------------- Ray Data adapters around the graph's stages
_INSTANCES: dict = {}


def _apply(stage, name: str, batch: dict, node: str | None = None) -> dict:
    """One Ray Data batch through the shared envelope; rows travel pickled (images, tensors: not Arrow data). node:
    the Ray node of a model stage's actor, recorded on its rows (the manifest's `node`: who did the model work)."""
    rows = run_stage(stage, name, [pickle.loads(b) for b in batch["row"]])
    if node:
        rows = [{**r, "node": node} for r in rows]
    return {"i": batch["i"], "row": np.array([pickle.dumps(r) for r in rows], dtype=object)}


def stage_task(batch: dict, *, spec: StageSpec) -> dict:
    """Ray Data task function for stages that hold no model: the instance is cached per worker process."""
    key = (spec.name, spec.cls, repr(spec.kwargs))
    if key not in _INSTANCES:
        _INSTANCES[key] = spec.build()
    return _apply(_INSTANCES[key], spec.name, batch)


class StageActor:
    """Ray Data actor for stages that hold a model: loads it once, then takes batches of rows."""

    def __init__(self, spec: StageSpec, threads: int | None = None):
        self.threads = threads  # a CPU-only model stage: its share of the machine's cores
        # Build on one thread: an OpenMP team started here would keep spinning beside the pool thread's team
        # (measured: 23 s instead of 11 s for one 256² image with both teams spinning on two cores).
        _set_threads(1 if threads else None)
        self.spec, self.stage = spec, spec.build()
        if hasattr(self.stage, "warmup"):
            self.stage.warmup()
        import ray

        self.node = ray.get_runtime_context().get_node_id()[:12]

    def __call__(self, batch: dict) -> dict:
        _set_threads(self.threads)  # OpenMP's thread count is per calling thread: Ray may call from another one
        return _apply(self.stage, self.spec.name, batch, self.node if self.spec.records_node else None)


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads for the calling thread: OpenMP keeps the count per thread, and Ray Data runs a
    batch on a pool thread, not the constructor's (which builds the stage on one thread: an OpenMP team started
    there would stay beside the pool thread's, and with more OpenMP threads than cores libgomp stops spinning and
    sleeps between every op). Measured on one 256² image, diffuse in the Ray Data actor: 14.5 s with the count set
    only in the constructor, 13.3 s like this, 11.5 s in the plain loop; an actor-level runtime_env with
    OMP_NUM_THREADS and OMP_WAIT_POLICY=ACTIVE reached 11.2 s but made Ray Data hang with two CPU model actors on
    two cores (and ACTIVE spins idle threads forever), so it is not used; PASSIVE made a plain Ray task 26% slower."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def job_workflow(cfg: JobConfig) -> Workflow:
    """The job's workflow, resolved once where the job enters (its preset looked up here)."""
    return resolve_workflow(cfg.workflow, cfg.model, cfg.options, latent_format=cfg.latent_format, gen=cfg.gen,
                            upscale=cfg.upscale, ldm=cfg.ldm)  # fmt: skip


def _graph(cfg: JobConfig, plan: Plan) -> StageGraph:
    graph = StageGraph(workflow=job_workflow(cfg))
    return graph.with_io(plan.src if graph.workflow.reads_files else None, plan.dst)


def _iter_local(cfg: JobConfig, plan: Plan, rows: list[dict]) -> Iterator[dict]:
    return _graph(cfg, plan).run_local(rows)


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
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress with ETA
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Items carry an index, not the key: keys may hold bytes that are not UTF-8, which Arrow strings cannot.
    ds = ray.data.from_items([{"i": i, "row": pickle.dumps(r)} for i, r in enumerate(rows)])
    graph = _graph(cfg, plan)
    actors = graph.actors(gpus, cfg.concurrency)
    if gpus and graph.gpus_needed(actors) > gpus:
        raise SetupError(f"the actors asked for ({actors}) need {graph.gpus_needed(actors):g} GPUs; the cluster has "
                         f"{gpus}")  # fmt: skip
    for spec in graph.stages:
        common = {"batch_size": spec.batch_rows, "batch_format": "numpy", **spec.ray_options(gpus)}
        if spec.holds_model:
            on_gpu = common["num_gpus"] > 0
            n = actors[spec.name]
            threads = None if on_gpu else max(1, cpus // n)
            ds = ds.map_batches(
                StageActor, fn_constructor_kwargs={"spec": spec, "threads": threads},
                # one batch in flight per actor: a batch is already 16 rows, and one queued behind a busy actor
                # would wait while another actor (maybe on another node) idles
                compute=ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1), **common,
            )  # fmt: skip
        else:
            ds = ds.map_batches(stage_task, fn_kwargs={"spec": spec}, **common)
    for item in ds.iter_rows():
        yield pickle.loads(item["row"])


def preflight(cfg: JobConfig) -> Workflow:
    """Everything that can make the whole job fail, checked before any worker starts or any model loads.

    In the order a user can act on: the preset's encoder exists, options fit the preset, the device exists,
    SRC can be listed, DST can be written (a probe write + delete), the weights are there. Each failure is one
    SetupError line: what, where, how to fix. Returns the job's workflow, resolved.
    """
    from pipeline.runtime import check_device, check_encoder, net_path
    from pipeline.stages.encode import plan_for
    from pipeline.weights import WeightsNotFound, resolve

    if cfg.overwrite and cfg.resume:
        raise SetupError("--overwrite and --resume contradict each other: --resume keeps the outputs already in DST, "
                         "--overwrite replaces them; choose one")  # fmt: skip
    wf = job_workflow(cfg)
    preset = wf.preset
    decode = wf.enters == "latents"
    if not wf.reads_files:
        _preflight_generate(cfg, wf)
        return wf
    if preset.task != "upscale":
        raise SetupError(f"preset {preset.name!r} is a text-to-image model: use pidray generate")
    if decode:  # latents replace the LQ encoder: the preset must take them, in the format named
        from pipeline.latents import check_decodes, check_format

        try:
            check_decodes(preset)
        except ValueError as e:
            raise SetupError(str(e)) from None
        check_format(cfg.latent_format, preset)
        _check_decode_flags(cfg, preset)
    else:
        check_encoder(preset)  # "not implemented" before asking for weights the preset cannot use anyway
    side = preset.envelope[1] * 3 // max(1, preset.scale)  # an input that needs several tiles checks --overlap
    plan_for(preset, replace(cfg.options, max_output_side=1 << 30), (side, side))
    if cfg.local or not os.environ.get("RAY_ADDRESS"):  # a remote cluster's workers have their own devices
        check_device(cfg.model.device)
    Location(cfg.src, cfg.s3).check_listable()
    if not cfg.dry_run:
        Location(cfg.dst, cfg.s3).check_writable()
    missing = []  # everything the preset needs that is not here, said at once: the network + VAE, the captioner
    try:
        if not decode and not preset.bundled and not str(cfg.model.weights or "").endswith((".safetensors", ".pth")):
            # the network and the LQ encoder's files, all missing ones at once (a decode job needs no encoder)
            resolve(preset, cfg.model.weights, allow_download=cfg.model.allow_download)
        path = net_path(cfg.model, preset)
        if not os.path.isfile(path):
            missing.append(f"checkpoint not found: {path}")
    except WeightsNotFound as e:
        missing.append(str(e))
    _raise_missing(missing, cfg, preset)
    return wf


def _check_decode_flags(cfg: JobConfig, preset) -> None:
    """`pidray decode --sigma` and `--size`, checked for the preset before any model loads (SetupError naming the
    flag): every row would fail with them otherwise."""
    from pipeline.latents import check_sigma
    from pipeline.stages.encode import given_latent_in_hw

    try:
        if cfg.sigma is not None:
            check_sigma(cfg.sigma, preset, "--sigma")
        if cfg.out_size is not None:
            h, w = cfg.out_size
            if max(h, w) > cfg.options.max_output_side:
                raise ValueError(f"output side {max(h, w)} is over --max-output-side {cfg.options.max_output_side}")
            given_latent_in_hw(preset, None, cfg.out_size)
    except ValueError as e:
        flag = "" if str(e).startswith("--") else f"--size {cfg.out_size[1]}x{cfg.out_size[0]}: "
        raise SetupError(f"{flag}{e}") from None


def _raise_missing(missing: list[str], cfg: JobConfig, preset) -> None:
    """One SetupError naming everything missing at once (weights, and the caption encoder), each with its command."""
    from pipeline.weights import caption_encoder_missing, missing_message

    if preset.text_encoder != "none" and not cfg.model.text_encoder and not cfg.model.allow_download:
        missing.append(caption_encoder_missing(preset.name))
    if missing:
        raise SetupError(missing_message(missing))


def _preflight_generate(cfg: JobConfig, wf: Workflow) -> None:
    """A prompt job: the preset generates, its (and the upscaler's) weights and caption encoder are here, DST is
    writable — each missing thing said at once."""
    from pipeline.runtime import check_device, net_path
    from pipeline.t2i import GenerateOptions
    from pipeline.weights import WeightsNotFound

    preset = wf.preset
    if isinstance(wf, Ldm):  # generate-then-decode: a PiD preset that decodes the model's latents
        from pipeline.latents import check_format
        from pipeline.stages.ldm import ldm_spec

        spec, _ = ldm_spec(wf.ldm)
        if preset.task != "upscale":
            raise SetupError(f"--with decodes with a PiD preset (-m), not {preset.name!r}")
        try:
            check_format(spec.latent_format, preset)
        except ValueError as e:
            raise SetupError(str(e)) from None
        GenerateOptions.from_dict(cfg.gen).resolved(preset, spec.defaults())
    elif preset.task != "t2i":
        raise SetupError(
            f"preset {preset.name!r} does not generate images: pidray generate takes pixeldit-2k (or a "
            "preset file with task 't2i'), or --with MODEL to decode a latent diffusion model's latents"
        )
    else:
        GenerateOptions.from_dict(cfg.gen).resolved(preset)  # size, steps, ... fit the preset
    if cfg.local or not os.environ.get("RAY_ADDRESS"):
        check_device(cfg.model.device)
    if not cfg.dry_run:
        Location(cfg.dst, cfg.s3).check_writable()
    missing = []
    for model, model_preset in wf.models():
        try:
            path = net_path(model, model_preset)
            if not os.path.isfile(path):
                missing.append(f"checkpoint not found: {path}")
        except WeightsNotFound as e:
            missing.append(str(e))
    _raise_missing(missing, cfg, preset)


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
    """Run the job; returns the summary. The manifest (Parquet) is written at DST whatever happens once planned.

    A job holds DST's lease from before planning to after its manifest (a dry run writes nothing and takes none):
    a DST in use by another live job is refused up front."""
    t0 = time.time()
    preflight(cfg)
    if cfg.dry_run:
        return _run(cfg, None, on_row, t0)
    lease = Lease(Location(cfg.dst, cfg.s3))
    lease.acquire()
    try:
        lease.start_heartbeat()
        return _run(cfg, lease, on_row, t0)
    finally:
        lease.release()


def _warn(message: str) -> None:
    print(f"pidray: warning: {message}", file=sys.stderr, flush=True)


def _run(cfg: JobConfig, lease: Lease | None, on_row, t0: float) -> Summary:
    plan = plan_job(cfg)
    if lease is not None:
        plan.dst.tag = lease.owner  # its temporaries carry the job's id: it removes only its own
        if lease.taken_over:
            n = plan.dst.remove_temporaries(lease.taken_over)
            _warn(f"took over DST's lease from job {lease.taken_over}, which is gone"
                  + (f"; removed its {n} unfinished temporary file(s)" if n else ""))  # fmt: skip
    if plan.previous.problem:
        where = f"{plan.dst.uri.rstrip('/')}/{MANIFEST_NAME}"
        kept = "it would be kept beside it as a backup"
        if not cfg.dry_run:
            try:
                kept = f"it is kept as {set_aside(plan.dst, plan.previous)}"
            except Exception as e:
                kept = f"it could not be kept as a backup ({type(e).__name__}: {e})"
        what = "its rows were" if plan.previous.set_aside < 0 else f"{plan.previous.set_aside} row(s) were"
        _warn(f"the manifest {where} does not fit ({plan.previous.problem}): {what} set aside and {kept}; outputs "
              "already in DST are still trusted, and a new manifest is written")  # fmt: skip
    todo = plan.todo
    summary = Summary(skipped=len(plan.skipped))
    if cfg.dry_run:
        summary.failed = len(plan.rejected)
        summary.rows = [{**manifest_row(r, cfg.model.preset), "status": "planned",
                         "output_key": display(r["output_stem"]) + ".*"} for r in todo]  # fmt: skip
        summary.rows += plan.rejected + plan.skipped
        return summary
    results: dict[str, dict] = {}
    previous = plan.previous.rows  # read once, checked row by row, by the plan (--resume, --in-place)
    fixed = {**{manifest_key(r): r for r in plan.skipped}, **{manifest_key(r): r for r in plan.rejected}}

    stopped_early = True  # until the loop has seen every row: a signal or an error that ends the job

    def merged(final: bool) -> list[dict]:
        rows = {**previous, **fixed, **results}
        if stopped_early:  # one row per input, whatever happened (mid-job flushes do not list DST each minute)
            rows.update(_unfinished(cfg, plan, [r for r in todo if r["key"] not in results], look=final))
        return list(rows.values())

    local = use_local_loop(cfg, len(todo))
    summary.runner = "local loop" if local else "Ray Data"
    quiet = _RayQuiet(enabled=not local and not cfg.verbose)
    from jobs.progress import JobProgress, estimate
    from jobs.settings import run_metadata

    meta = run_metadata(cfg, t0)  # the settings, pidray's version and the start, in the Parquet metadata

    bar = JobProgress(estimate(cfg, plan, todo), quiet.terminal, cfg.progress, name=cfg.workflow)
    for r in plan.rejected:  # refused at planning: said before the work starts, one line each
        bar.say(f"failed  {r['key']}: {r['error']}")
    summary.failures_shown = True
    last_flush = time.time()
    try:
        with _on_signals(_raise_interrupted), quiet, bar.listen():
            if not local and todo:
                _ensure_ray()  # start Ray before our handlers matter: its start-up installs handlers of its own
            it: Iterable[dict] = _iter_local(cfg, plan, todo) if local else _iter_ray(cfg, plan, todo)
            for row in it:
                results[row["key"]] = manifest_row(row, cfg.model.preset)
                bar.row_done(row)
                if on_row:
                    on_row(row)
                if lease is not None:
                    lease.check()  # never two jobs writing one DST: stop if another job took the lease
                if time.time() - last_flush > MANIFEST_EVERY_S:  # a crash keeps what was done so far on record
                    write_manifest(plan.dst, merged(final=False), meta)
                    last_flush = time.time()
        stopped_early = False
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
            summary.rows = merged(final=True)
            summary.manifest = write_manifest(plan.dst, summary.rows, meta)
            plan.dst.remove_temporaries(plan.dst.tag)  # this job's own, never another job's
    return summary


def _unfinished(cfg: JobConfig, plan: Plan, rows: list[dict], look: bool = True) -> dict[str, dict]:
    """Manifest rows for inputs the job has not reported: `interrupted`, and (when `look`) whether an output landed.

    A worker may have written an output (atomically: it is complete) that the driver had not heard of yet.
    """
    existing = set()
    try:
        existing = {e.key for e in plan.dst.list(images_only=False)} if look else set()
    except Exception:  # DST not listable now: say nothing about outputs
        pass
    out = {}
    for r in rows:
        outs = output_candidates(r["output_stem"], cfg.options.format, r.get("theirs", ()))
        hit = next((c for c in outs if c in existing), "")
        error = ("interrupted after its output was written (complete; --resume keeps it)" if hit
                 else "interrupted before it finished; --resume does it" if look
                 else "not finished when this manifest was written; --resume does it if the job stops")  # fmt: skip
        out[r["key"]] = manifest_row({**r, "status": "interrupted", "error": error}, cfg.model.preset)
        out[r["key"]]["output_key"] = display(hit)
    return out


AUTO_LOCAL_MAX = 16  # inputs: below this, with no cluster configured, Ray's start-up costs more than it saves


def use_local_loop(cfg: JobConfig, n: int) -> bool:
    """--local / --ray decide; otherwise the in-process loop for small jobs when no cluster is configured."""
    if cfg.local is not None:
        return cfg.local
    return not os.environ.get("RAY_ADDRESS") and n <= AUTO_LOCAL_MAX


class _RayQuiet:
    """Keep Ray's start-up notices and worker messages (written straight to file descriptor 2) out of the user's
    terminal: fd 2 goes to a log file while Ray runs; our own progress and messages use the saved terminal."""

    LOG = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pidray-ray.log")

    def __init__(self, enabled: bool):
        self.enabled, self.saved = enabled, None
        self.terminal = sys.stderr
        if enabled:
            self.saved = os.dup(2)
            self.terminal = os.fdopen(os.dup(2), "w", buffering=1)

    def __enter__(self):
        if self.enabled:
            with open(self.LOG, "ab") as log:
                os.dup2(log.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.terminal.flush()
        return False


__all__ = ["JobConfig", "Summary", "run_job", "plan_job", "MANIFEST_NAME"]
