"""The Ray Data side of a bulk job: adapters around the graph's stages, and the streaming feed.

Rows travel between Ray Data operators as {"i", "row": pickled stage row}: stage rows hold images, tensors and
metadata of varying shape, which Arrow need not understand. The model stages run as actor pools (model loaded once per
actor, `num_gpus` when the cluster has GPUs); I/O, decode and merge run as CPU tasks. A stage never raises for a bad
input: the row is marked failed with its reason and the job goes on. A crashed actor is restarted by Ray and its rows
retried.

The rows enter as the planner makes them, through the feed (`jobs.feed`); a job planned whole in SMALL_JOB_ROWS
enters at once.
"""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Iterable, Iterator

import numpy as np

from jobs.config import JobConfig
from jobs.feed import RayFeed, feed_task
from jobs.rules import Plan
from pipeline.errors import SetupError
from pipeline.graph import StageGraph, StageSpec, batch_parts
from pipeline.runtime import use_threads
from pipeline.stages import run_stage

# A block is cut as soon as it holds more than this: Ray Data coalesces what a task yields until a block passes the
# target, so at its usual size a feed task held small rows (a few hundred bytes each) until enough had gathered, and
# a job holding fewer rows in flight than that waited forever. Below one row's size, every chunk a feed task yields
# leaves at once (as one-row blocks), and a stage's results go to the driver row by row (rows with images are
# one-row blocks anyway).
TARGET_BLOCK_BYTES = 64
SMALL_JOB_ROWS = 1024  # a job planned whole in this many rows enters Ray Data at once (from_items)


_INSTANCES: dict = {}


def _apply(stage, name: str, batch: dict, node: str | None = None) -> dict:
    """One Ray Data batch through the shared envelope; rows travel pickled (images, tensors: not Arrow data). node:
    the Ray node of a model stage's actor, recorded on its rows (the manifest's `node`: who did the model work)."""
    return _batch(batch["i"], run_stage(stage, name, [pickle.loads(b) for b in batch["row"]]), node)


def _batch(i, rows: list[dict], node: str | None = None) -> dict:
    if node:
        rows = [{**r, "node": node} for r in rows]
    return {"i": i, "row": np.array([pickle.dumps(r) for r in rows], dtype=object)}


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
        use_threads(1 if threads else None)
        self.spec, self.stage = spec, spec.build()
        if hasattr(self.stage, "warmup"):
            self.stage.warmup()
        import ray

        self.node = ray.get_runtime_context().get_node_id()[:12]

    def __call__(self, batch: dict) -> Iterator[dict]:
        """The batch's rows, a part at a time as each is done (`batch_parts`: the diffuse stage's groups of images
        that share network calls): a finished part leaves while the next one runs, so its images are merged and
        written without waiting for the rest of the batch."""
        rows = [pickle.loads(b) for b in batch["row"]]
        for part in batch_parts(self.stage, rows):
            use_threads(self.threads)  # OpenMP's thread count is per calling thread: Ray may call from another one
            done = run_stage(self.stage, self.spec.name, [rows[j] for j in part])
            yield _batch(batch["i"][part], done, self.node if self.spec.records_node else None)


def _graph(cfg: JobConfig, plan: Plan) -> StageGraph:
    graph = StageGraph(workflow=cfg.flow)
    return graph.with_io(plan.src if graph.workflow.reads_files else None, plan.dst)


def _iter_local(cfg: JobConfig, plan: Plan, rows: Iterable[dict]) -> Iterator[dict]:
    return _graph(cfg, plan).run_local(rows)


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a Ray of its own: never a stray local instance (an endpoint's, or one a killed job left behind)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
            _warm_workers(ray, int(ray.cluster_resources().get("CPU", 1)))
    return ray


def _import_stages() -> None:
    """Nothing to do: a worker that runs this has imported this module, and with it torch and the stage classes."""


def _warm_workers(ray, n: int) -> None:
    """Start this node's pooled workers with the stage modules imported, while the job plans and Ray Data starts:
    each stage's first task would otherwise pay for the imports in a fresh worker on the way to the first output
    (seconds a worker on a busy node). Not waited for; a worker that is still importing simply serves later."""
    task = ray.remote(num_cpus=1, max_retries=0)(_import_stages)
    for _ in range(max(1, n)):
        task.remote()


def add_stages(ds, graph: StageGraph, actors: dict[str, int], gpus: int, cpus: int):
    """`ds` (rows as {"i", "row": pickled stage row}) through every stage of `graph`: a model stage as an actor pool
    of `actors[name]` actors (its share of a GPU where the cluster has `gpus`), the others as tasks. Lazy, as Ray
    Data is: also what `pidray.data` adds to a user's own dataset."""
    from ray.data import ActorPoolStrategy

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
    return ds


def _iter_ray(cfg: JobConfig, plan: Plan, rows: Iterable[dict], feed_out: list | None = None) -> Iterator[dict]:
    """Rows through Ray Data as they come from `rows` (a stream); results as Ray Data gives them back. feed_out:
    gets the RayFeed, so the driver can say which rows came back."""
    ray = _ensure_ray()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress with ETA
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    graph = _graph(cfg, plan)
    enter = graph.workflow.enter  # where rows enter: options resolved once, here in the driver
    actors = graph.actors(gpus, cfg.concurrency)
    if gpus and graph.gpus_needed(actors) > gpus:
        raise SetupError(f"the actors asked for ({actors}) need {graph.gpus_needed(actors):g} GPUs; the cluster has "
                         f"{gpus}")  # fmt: skip
    # Small blocks: a task's results leave it a few rows at a time, not in one block at its end (each part the
    # diffuse actor yields goes on to merge and write while it runs the next; the driver, its progress and the
    # manifest hear of each row soon after its output lands); a large row is a block.
    ctx.target_max_block_size = TARGET_BLOCK_BYTES
    rows = (enter(r) for r in rows)
    first = list(itertools.islice(rows, SMALL_JOB_ROWS + 1))
    feed = None
    if len(first) <= SMALL_JOB_ROWS:  # the whole job is planned already: its rows enter at once
        ds = ray.data.from_items([{"i": i, "row": pickle.dumps(r)} for i, r in enumerate(first)])
    else:
        feed = RayFeed(ray, itertools.chain(first, rows))
        if feed_out is not None:
            feed_out.append(feed)
        # On the driver's node, no CPU asked; a remote-args function also keeps Ray Data from fusing the feed with
        # the next stage (a fused stage would inherit the feed's placement).
        here = feed.scheduling
        ds = feed.dataset().map_batches(feed_task, fn_kwargs={"feed": feed.actor}, batch_size=1,
                                        batch_format="numpy", num_cpus=0,
                                        ray_remote_args_fn=lambda: {"scheduling_strategy": here})  # fmt: skip
    ds = add_stages(ds, graph, actors, gpus, cpus)
    if feed is None:
        for item in ds.iter_rows():
            yield pickle.loads(item["row"])
        return
    feed.start()
    try:
        for item in ds.iter_rows():
            if feed.error is not None:
                raise feed.error
            yield pickle.loads(item["row"])
        if feed.error is not None:
            raise feed.error
    finally:
        if ray.is_initialized():  # (after Ctrl-C the driver has shut Ray down: the actor went with it)
            try:
                ray.kill(feed.actor)
            except ray.exceptions.RayError:  # gone already (its node with it)
                pass
