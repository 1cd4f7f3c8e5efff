"""--ray for a dataset job: several shards at once, each read, assembled and published on a worker.

- **Shards** run in `ShardWorker` actors (no CPU asked; spread over the cluster's nodes when SRC and DST are on S3,
  on the driver's node when either is a local folder), each `Shard` in a thread of its own (`jobs.dataset_shard`:
  the same code as the local loop's). A shard's reader hands its samples to the pipeline at most `budget` at a time
  (twice the rows the stages batch together, so the stages' batches always fill and nothing waits for rows that
  cannot come); its writer takes the results back in any order and assembles the output in input order, results
  that come early waiting on the worker's local disk; it publishes the shard whole.
- **The stages** are one Ray Data pipeline for the whole job, the same as a job over files (`jobs.raydata.add_stages`:
  each model stage an actor pool that loads its model once per actor): a feed actor on the driver's node hands the
  samples on (each chunk as a reference into Ray's object store: the images go from the worker that read them to the
  stage that decodes them, never through the driver), and a last step hands each finished row, with its output, to
  the worker that assembles its shard.
- **The driver** keeps `at_once` shards reading (and a few more that wait for their last results, `open_max`), takes
  each finished shard's manifest rows a page at a time, and hears of each sample as a small row (for its progress).
- **Stopping** (Ctrl-C, SIGTERM, DST's lease lost): every open shard is told to stop; one that is not published yet
  publishes nothing and records its samples as interrupted, one being published finishes and is recorded as done.
  Then the workers and the feed go, and with the feed the pipeline; Ray itself is stopped when the job started it
  (the CLI), as for a job over files, not when it runs on the caller's Ray.
"""

from __future__ import annotations

import gc
import itertools
import pickle
import queue
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager

from jobs.dataset_feed import FEED_TASKS, deliver, feed_task
from jobs.dataset_shard import Context, RowSpill, Shard

CHUNK_ROWS = 4  # samples per chunk a shard hands to the feed: small, so the first results come back soon
AT_ONCE_MAX = 8  # shards read at once, at most (by default twice the diffuse actors, at least 2)
WORKER_THREADS = 128  # a worker's threads: two per open shard, and the calls that bring results back
PAGE_ROWS = 2048  # manifest rows the driver takes from a worker per call
STOP_WAIT_S = 60.0  # how long a stopping job waits for its shards to record themselves
PROGRESS_EVERY_S = 30.0


class _Stop(BaseException):
    """The job is stopping: the shard publishes nothing more (raised in its thread on the worker)."""


def run_on_ray(run, todo: list[tuple[str, bool, str]]) -> None:
    """The shards of `todo` ((shard, replace, etag), as `jobs.dataset_run._Run` settled them) on Ray; every row
    is recorded through `run`."""
    import ray

    from jobs.raydata import _ensure_ray
    from jobs.terminal import _RayQuiet

    run.summary.runner = "Ray Data"
    quiet = _RayQuiet(enabled=not run.cfg.verbose)
    with quiet:
        run.out = quiet.terminal  # what the job says goes to the terminal, Ray's own notices to its log
        started = not ray.is_initialized()  # this job starts Ray (the CLI), or runs on the caller's
        with run.signals.hold():  # Ctrl-C while Ray starts: answered once it has
            _ensure_ray()
        if threading.current_thread() is threading.main_thread():  # ray.init installs a SIGTERM handler of its own
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, run.signals)
        _Driver(run, ray, started).run(todo)


class _Driver:
    def __init__(self, run, ray, started: bool):
        self.run_, self.ray, self.started = run, ray, started
        self.results: queue.Queue = queue.Queue()  # small rows from the pipeline, read by the consumer thread
        self.samples = 0
        self.published = 0

    def run(self, todo: list) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from jobs.feed import feed_actor

        ray, run = self.ray, self.run_
        graph, actors, gpus, cpus = self._graph()
        budget = 2 * sum(s.batch_rows for s in graph.stages)
        at_once = min(len(todo), AT_ONCE_MAX, max(2, 2 * max(actors.values(), default=1)))
        open_max = at_once + sum(s.batch_rows - 1 for s in graph.stages) + 1
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.feed = feed_actor(ray, here)
        spec = {"cfg": run.cfg, "ds": run.ds, "src": run.src, "dst": run.dst, "budget": budget}
        # S3 in and out: shards read and published all over the cluster; a local folder is this node's (another
        # node's folder of that name may be another disk): its shards are read and published on this node
        where = "SPREAD" if run.src.is_s3 and run.dst.is_s3 else here
        cls = ray.remote(ShardWorker).options(num_cpus=0, max_concurrency=WORKER_THREADS, max_restarts=2,
                                              scheduling_strategy=where)  # fmt: skip
        self.workers = [cls.remote(spec, self.feed, i) for i in range(at_once)]
        self.dataset = self._dataset(graph, actors, gpus, cpus)
        consumer = threading.Thread(target=self._consume, args=(self.dataset,), name="pidray-dataset-results",
                                    daemon=True)  # fmt: skip
        consumer.start()
        self.runs: dict = {}  # run ref -> (worker, nonce, shard)
        stopped = False
        try:
            self._loop(deque(todo), at_once, open_max)
            self.feed.close.remote()
            consumer.join(STOP_WAIT_S)  # the pipeline drains and Ray Data lets its actor pools go
        except BaseException:  # any failure, Ctrl-C included: the workers and the feed stop, the error is raised
            stopped = True
            run.signals.stopping = True  # a second Ctrl-C changes nothing from here on
            self._stop()
            raise
        finally:
            if stopped:  # its actor pools killed now: a pipeline that fails only drops them, and one still referenced
                _force_shutdown(self.dataset)  # (a block in flight) would hold its CPUs from the caller's next job
            for actor in [*self.workers, self.feed]:
                try:
                    ray.kill(actor)
                except ray.exceptions.RayError:  # gone already (its node with it)
                    pass
            if stopped:  # the job's tasks and actors end with it: Ray that it started, else its pipeline
                from jobs.loop import stop_ray

                with _ignoring_signals():
                    if self.started:
                        stop_ray()
                    consumer.join(5.0 if self.started else STOP_WAIT_S)  # last words into Ray's log
            # a pipeline that failed (its feed gone) lets its actor pools go only once it is collected: on the
            # caller's Ray, the next job would wait for their CPUs
            self.results = queue.Queue()
            gc.collect()

    def _graph(self):
        from ray.data import DataContext

        from jobs.raydata import TARGET_BLOCK_BYTES
        from pipeline.errors import SetupError
        from pipeline.graph import StageGraph

        ray, cfg = self.ray, self.run_.cfg
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.target_max_block_size = TARGET_BLOCK_BYTES  # each sample a block of its own: it goes on at once
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        graph = StageGraph(workflow=cfg.flow)
        actors = graph.actors(gpus, cfg.concurrency)
        if gpus and graph.gpus_needed(actors) > gpus:
            raise SetupError(f"the actors asked for ({actors}) need {graph.gpus_needed(actors):g} GPUs; the cluster "
                             f"has {gpus}")  # fmt: skip
        return graph, actors, gpus, cpus

    def _dataset(self, graph, actors, gpus, cpus):
        from jobs.raydata import add_stages

        ds = self.ray.data.from_items([{"task": t} for t in range(FEED_TASKS)], override_num_blocks=FEED_TASKS)
        # no CPU asked: never fused with the first stage (whose task would then hold a CPU for the whole job)
        ds = ds.map_batches(feed_task, fn_kwargs={"feed": self.feed}, batch_size=1, batch_format="numpy", num_cpus=0)
        ds = add_stages(ds, graph, actors, gpus, cpus)
        last = graph.stages[-1]  # the step after it asks what it asks: Ray Data runs both in one task
        where = {"num_cpus": 0} if last.holds_model else last.ray_options(gpus)
        return ds.map_batches(deliver, fn_kwargs={"workers": self.workers}, batch_size=last.batch_rows,
                              batch_format="numpy", **where)  # fmt: skip

    def _consume(self, ds) -> None:
        try:
            for item in ds.iter_rows():
                self.results.put(pickle.loads(item["row"]))
        except BaseException as e:  # raised in the driver's thread; not its traceback, which holds the pipeline
            self.results.put(RuntimeError(f"the stages failed: {type(e).__name__}: {_short(e)}"))

    def _loop(self, pending: deque, at_once: int, open_max: int) -> None:
        run = self.run_
        self.pending, self.readers = pending, {}  # the shards to start; reading ref -> its shard's nonce
        self.opened = [0] * len(self.workers)  # open shards per worker
        self.nonce, self.closed, said = 0, False, time.monotonic()
        while self.pending or self.runs:
            with run.signals.hold():  # a signal is answered between two rounds, never inside a call into Ray
                self._round(at_once, open_max)
            if run.cfg.progress and time.monotonic() - said >= PROGRESS_EVERY_S:
                said = time.monotonic()
                run._say(f"working: {self.samples} sample(s) through the stages, {self.published} shard(s) "
                         f"published, {len(self.runs)} open, {len(self.pending)} to start")  # fmt: skip

    def _round(self, at_once: int, open_max: int) -> None:
        """Start shards while fewer than `at_once` are reading (and fewer than `open_max` are open: those that wait
        for their last results); take the shards that ended; count the samples heard of."""
        pending, readers, opened = self.pending, self.readers, self.opened
        while pending and len(readers) < at_once and len(self.runs) < open_max:
            rel, replace, etag = pending.popleft()
            w = min(range(len(self.workers)), key=opened.__getitem__)
            self.nonce += 1
            self.runs[self.workers[w].run.remote(self.nonce, rel, replace, etag)] = (w, self.nonce, rel)
            readers[self.workers[w].reading.remote(self.nonce)] = self.nonce
            opened[w] += 1
        if not pending and not readers and not self.closed:
            self.feed.close.remote()  # every sample is in: the stages' last batches go without waiting for more
            self.closed = True
        ready, _ = self.ray.wait([*readers, *self.runs], num_returns=1, timeout=0.5)
        for ref in ready:
            if readers.pop(ref, None) is None:
                w, n, rel = self.runs.pop(ref)
                opened[w] -= 1
                self._outcome(ref, w, n, rel)
        self._heard()
        self.run_.lease.check()

    def _heard(self) -> None:
        while True:
            try:
                got = self.results.get_nowait()
            except queue.Empty:
                return
            if isinstance(got, BaseException):
                raise got
            self.samples += 1

    def _outcome(self, ref, w: int, nonce: int, rel: str) -> None:
        """A shard's rows into the manifest (a page at a time), what its worker said on the terminal; called where
        a signal waits (a shard's rows are recorded whole)."""
        run, worker = self.run_, self.workers[w]
        try:
            said = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:  # its worker died (the node went away): no row per sample
            run._record({"key": rel, "status": "failed", "error": f"its shard failed: {_short(e)}",
                         "error_kind": "failed"})  # fmt: skip
            return
        while page := self.ray.get(worker.rows.remote(nonce, PAGE_ROWS)):
            for row, count in page:
                run._record(row, count)
        for line in said:
            run._say(line)
            self.published += line.startswith("done ")

    def _stop(self) -> None:
        """Every open shard told to stop; each one's rows recorded as it ends, waiting STOP_WAIT_S at most."""
        ray, run = self.ray, self.run_
        if not ray.is_initialized():
            return
        for w, nonce, _ in self.runs.values():
            self.workers[w].stop.remote(nonce)
        deadline = time.monotonic() + STOP_WAIT_S
        while self.runs and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.runs), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
            for ref in ready:
                w, n, rel = self.runs.pop(ref)
                self._outcome(ref, w, n, rel)
        for w, n, rel in self.runs.values():  # still not back: the shard as a whole
            run._record({"key": rel, "status": "interrupted", "error": "the job stopped before its shard said how "
                         "it ended; --resume does it again unless its output is in DST"}, count=False)  # fmt: skip
        self.runs = {}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]


def _force_shutdown(ds) -> None:
    """Stop the pipeline's streaming executor with its tasks and actors (Ray Data's own forced shutdown, as its
    blocking calls end with)."""
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        try:
            executor.shutdown(force=True)
        except Exception:  # best effort on the way out: the job's own error is the one raised
            pass


@contextmanager
def _ignoring_signals():
    from jobs.loop import on_signals

    with on_signals(signal.SIG_IGN):
        yield


# ---------------------------------------------------------------------------------------------------- on a worker
class _Open:
    """One shard open in a worker: its results as they come back, its manifest rows, what it said."""

    def __init__(self, nonce: int):
        self.nonce = nonce
        self.results: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.read_all = threading.Event()  # its reader is done: the driver may start another shard
        self.ended = False
        self.records = RowSpill()
        self.said: list[str] = []
        self.chunk_left: dict[int, int] = {}  # chunk id -> its samples not back yet
        self.chunk_of: dict[str, int] = {}  # sample id -> its chunk


class ShardWorker:
    """A Ray actor (threaded) that reads, assembles and publishes shards: `run` one shard (in a thread of its own,
    several at once), `reading` returns once its reader is done, `finished` takes results back from the pipeline,
    `rows` hands its manifest rows to the driver, `stop` stops it."""

    def __init__(self, spec: dict, feed, index: int):
        self.spec, self.feed, self.index = spec, feed, index
        self.lock = threading.Lock()
        self.open: dict[int, _Open] = {}
        self.chunks = itertools.count()

    def _get(self, nonce: int) -> _Open:
        with self.lock:
            if nonce not in self.open:
                self.open[nonce] = _Open(nonce)
            return self.open[nonce]

    def run(self, nonce: int, rel: str, replace: bool, etag: str) -> list[str]:
        st = self._get(nonce)
        try:
            Shard(_WorkerContext(self, st), rel, replace, etag).run()
        except _Stop:
            pass  # its rows say so
        finally:
            st.ended = True
            st.read_all.set()
            if st.chunk_left:
                self.feed.forget.remote(list(st.chunk_left))
        return st.said

    def reading(self, nonce: int) -> bool:
        self._get(nonce).read_all.wait()
        return True

    def finished(self, rows: list[dict]) -> None:
        for r in rows:
            st = self.open.get(r.get("pidray_shard", (0, 0))[1])
            if st is not None and not st.ended:
                st.results.put(r)

    def rows(self, nonce: int, n: int) -> list:
        st = self.open.get(nonce)
        page = st.records.take(n) if st is not None else []
        if not page and st is not None:
            st.records.close()
            with self.lock:
                self.open.pop(nonce, None)
        return page

    def stop(self, nonce: int) -> None:
        self._get(nonce).stop.set()

    # ------------------------------------------------------------------ the pipeline, as a shard sees it
    def push(self, st: _Open, rows: list[dict]) -> None:
        import ray

        enter = self.spec["cfg"].flow.enter  # the row's options resolved once, as the local loop does
        data = []
        for r in rows:
            data.append(pickle.dumps({**enter(r), "pidray_shard": (self.index, st.nonce)}, pickle.HIGHEST_PROTOCOL))
        cid = (self.index << 40) | next(self.chunks)
        st.chunk_left[cid] = len(rows)
        for r in rows:
            st.chunk_of[r["key"]] = cid
        ray.get(self.feed.put.remote(cid, [ray.put(data)]))  # a reference: the feed never holds the images

    def returned(self, st: _Open, key: str) -> None:
        cid = st.chunk_of.pop(key, None)
        if cid is None:
            return
        st.chunk_left[cid] -= 1
        if not st.chunk_left[cid]:
            del st.chunk_left[cid]
            self.feed.forget.remote([cid])


class _WorkerContext(Context):
    """A shard's context on a worker: the stages are the job's pipeline, its rows go to the driver."""

    def __init__(self, worker: ShardWorker, st: _Open):
        spec = worker.spec
        self.cfg, self.ds, self.src, self.dst = spec["cfg"], spec["ds"], spec["src"], spec["dst"]
        self.worker, self.st, self.budget = worker, st, spec["budget"]

    def through(self, rows):
        worker, st = self.worker, self.st
        rows, more, inflight = iter(rows), True, 0
        while True:
            while more and inflight < self.budget:
                want = min(CHUNK_ROWS, self.budget - inflight)
                chunk = list(itertools.islice(rows, want))
                more = len(chunk) == want
                if chunk:
                    worker.push(st, chunk)
                    inflight += len(chunk)
                if st.stop.is_set():
                    raise _Stop
            if not more:
                st.read_all.set()
            if not inflight:
                return
            row = self._next()
            inflight -= 1
            yield row

    def _next(self) -> dict:
        while True:
            try:
                row = self.st.results.get(timeout=0.5)
            except queue.Empty:
                if self.st.stop.is_set():
                    raise _Stop from None
                continue
            self.worker.returned(self.st, row["key"])
            return row

    @contextmanager
    def hold(self):
        yield  # a result is taken whole, a shard is published whole; the stop comes after
        if self.st.stop.is_set():
            raise _Stop

    def record(self, row: dict, count: bool = True) -> None:
        self.st.records.add((row, count))

    def say(self, text: str) -> None:
        self.st.said.append(text)
