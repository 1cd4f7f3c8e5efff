"""The Ray Data side of a bulk job: adapters around the graph's stages, and the streaming feed.

Rows travel between Ray Data operators as {"i", "row": pickled stage row}: stage rows hold images, tensors and
metadata of varying shape, which Arrow need not understand. The model stages run as actor pools (model loaded once per
actor, `num_gpus` when the cluster has GPUs); I/O, decode and merge run as CPU tasks. A stage never raises for a bad
input: the row is marked failed with its reason and the job goes on. A crashed actor is restarted by Ray and its rows
retried.

The rows enter as the planner makes them: the driver hands chunks of rows to a small feed actor on its own node, and
a few feed tasks (also on the driver's node, no CPU asked) take them from it and hand them to the first stage. A
chunk is named by (feed task, its number in that task), so a feed task that Ray runs again (to rebuild lost blocks)
gets the same chunks again; a chunk whose rows the driver has all heard back is forgotten (an empty block then).
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from jobs.config import JobConfig
from jobs.rules import Plan
from pipeline.errors import SetupError
from pipeline.graph import StageGraph, StageSpec
from pipeline.stages import run_stage

TARGET_BLOCK_BYTES = 64 << 10
SMALL_JOB_ROWS = 1024  # a job planned whole in this many rows enters Ray Data at once (from_items)
FEED_TASKS = 2  # feed tasks: each pulls chunks of rows from the feed actor
CHUNK_ROWS = 4  # rows per chunk handed to Ray Data: small blocks, so results come back as they are done


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
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


class Feed:
    """The feed actor: chunks of pickled rows from the driver, handed out by (feed task, chunk number)."""

    def __init__(self):
        self.queue: deque = deque()  # (chunk id, rows) not handed out yet
        self.given: dict[tuple[int, int], tuple[int, list]] = {}  # (task, n) -> (chunk id, rows)
        self.done: set[int] = set()  # chunk ids the driver has every row of
        self.closed = False

    def put(self, chunk_id: int, rows: list) -> int:
        self.queue.append((chunk_id, rows))
        return len(self.queue)

    def close(self) -> None:
        self.closed = True

    def forget(self, chunk_ids: list[int]) -> None:
        self.done.update(chunk_ids)
        for k in [k for k, (c, _) in self.given.items() if c in self.done]:
            self.given[k] = (self.given[k][0], [])

    def take(self, task: int, n: int):
        """(chunk id, rows) for chunk n of feed task `task`; "wait" while nothing is queued; None at the end."""
        if (task, n) in self.given:
            return self.given[(task, n)]
        if self.queue:
            self.given[(task, n)] = self.queue.popleft()
            return self.given[(task, n)]
        return None if self.closed else "wait"


def feed_task(batch: dict, *, feed) -> Iterator[dict]:
    """Ray Data task function: the rows of one feed task, chunk by chunk, as the driver plans them."""
    import ray

    task = int(batch["task"][0])
    n = 0
    while True:
        got = ray.get(feed.take.remote(task, n))
        if got is None:
            return
        if isinstance(got, str):
            time.sleep(0.05)
            continue
        chunk_id, rows = got
        n += 1
        yield {"i": np.full(len(rows), chunk_id, dtype=np.int64), "row": np.array(rows, dtype=object)}


class RayFeed:
    """The driver's end: a thread takes rows from `rows` (the planner's stream; it may block on backpressure) and
    puts them into the feed actor in chunks; `done(chunk_id)` is told by the driver as results come back."""

    def __init__(self, ray, rows: Iterable[dict]):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(self.node, soft=False)
        self.scheduling = here
        self.actor = ray.remote(num_cpus=0, scheduling_strategy=here)(Feed).remote()
        self.ray, self.rows = ray, rows
        self.chunk_of: dict[str, int] = {}  # key -> chunk id, for rows in flight
        self.left: dict[int, int] = {}  # chunk id -> rows not heard back yet
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="pidray-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            chunk, next_id, since = [], 0, time.time()
            it = iter(self.rows)
            for row in it:
                chunk.append(row)
                if len(chunk) >= CHUNK_ROWS or time.time() - since > 0.5:
                    self._put(next_id, chunk)
                    chunk, next_id, since = [], next_id + 1, time.time()
            if chunk:
                self._put(next_id, chunk)
        except BaseException as e:  # the planner failed: the driver raises it
            self.error = e
        finally:
            if self.ray.is_initialized():
                self.actor.close.remote()

    def _put(self, chunk_id: int, rows: list[dict]) -> None:
        with self.lock:
            for r in rows:
                self.chunk_of[r["key"]] = chunk_id
            self.left[chunk_id] = len(rows)
        self.ray.get(self.actor.put.remote(chunk_id, [pickle.dumps(r) for r in rows]))

    def done(self, key: str) -> None:
        with self.lock:
            chunk_id = self.chunk_of.pop(key, None)
            if chunk_id is None:
                return
            self.left[chunk_id] -= 1
            if self.left[chunk_id]:
                return
            del self.left[chunk_id]
        self.actor.forget.remote([chunk_id])

    def dataset(self):
        return self.ray.data.from_items([{"task": t} for t in range(FEED_TASKS)], override_num_blocks=FEED_TASKS)


def _iter_ray(cfg: JobConfig, plan: Plan, rows: Iterable[dict], feed_out: list | None = None) -> Iterator[dict]:
    """Rows through Ray Data as they come from `rows` (a stream); results as Ray Data gives them back. feed_out:
    gets the RayFeed, so the driver can say which rows came back."""
    ray = _ensure_ray()
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress with ETA
    ctx.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    graph = _graph(cfg, plan)
    actors = graph.actors(gpus, cfg.concurrency)
    if gpus and graph.gpus_needed(actors) > gpus:
        raise SetupError(f"the actors asked for ({actors}) need {graph.gpus_needed(actors):g} GPUs; the cluster has "
                         f"{gpus}")  # fmt: skip
    rows = iter(rows)
    first = list(itertools.islice(rows, SMALL_JOB_ROWS + 1))
    feed = None
    if len(first) <= SMALL_JOB_ROWS:  # the whole job is planned already: its rows enter at once
        ds = ray.data.from_items([{"i": i, "row": pickle.dumps(r)} for i, r in enumerate(first)])
    else:
        # Small blocks: a task's results leave it a few rows at a time, not in one block at its end (the driver,
        # its progress and the manifest hear of each row soon after its output lands); a large row is a block.
        ctx.target_max_block_size = TARGET_BLOCK_BYTES
        feed = RayFeed(ray, itertools.chain(first, rows))
        if feed_out is not None:
            feed_out.append(feed)
        # On the driver's node, no CPU asked; a remote-args function also keeps Ray Data from fusing the feed with
        # the next stage (a fused stage would inherit the feed's placement).
        here = feed.scheduling
        ds = feed.dataset().map_batches(feed_task, fn_kwargs={"feed": feed.actor}, batch_size=1,
                                        batch_format="numpy", num_cpus=0,
                                        ray_remote_args_fn=lambda: {"scheduling_strategy": here})  # fmt: skip
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
            except Exception:
                pass
