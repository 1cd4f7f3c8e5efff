"""The streaming feed of a Ray Data job: planned rows enter Ray Data as the planner makes them.

The driver hands chunks of rows to a small feed actor on its own node, and a few feed tasks (also on the driver's
node, no CPU asked) take them from it and hand them to the first stage. A chunk is named by (feed task, its number in
that task), so a feed task that Ray runs again (to rebuild lost blocks) gets the same chunks again; a chunk whose rows
the driver has all heard back is forgotten (an empty block then).

Light on purpose: the feed actor's and the feed tasks' workers import this module and numpy only, not torch, so they
start in a second and the first rows reach the stages while the model actors are still loading.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

FEED_TASKS = 2  # feed tasks: each pulls chunks of rows from the feed actor
CHUNK_ROWS = 4  # rows per chunk handed to Ray Data: small blocks, so results come back as they are done
CHUNK_WAIT_S = 0.5  # a part chunk goes once no new row came for this long
TAKE_WAIT_S = 0.5  # how long a feed task's call waits in the feed actor for a chunk
FEED_CONCURRENCY = 8  # calls the feed actor serves at once: the feed tasks' waiting takes, and the driver's puts


class Feed:
    """The feed actor: chunks of pickled rows from the driver, handed out by (feed task, chunk number). A chunk
    whose rows all came back is dropped (O(1) per chunk: a long job's feed keeps only what is in flight); a task that
    asks again for a chunk number below what it was handed (Ray running it again) gets an empty chunk for it.

    A threaded actor (`FEED_CONCURRENCY` calls at once): a feed task's `take` waits here, up to its `wait_s`, for a
    chunk to come, so an idle feed task makes one call every `wait_s`, not a stream of polls that would take CPU time
    (and wake-ups) from the stages on a small node."""

    def __init__(self):
        self.queue: deque = deque()  # (chunk id, rows) not handed out yet
        self.given: dict[tuple[int, int], tuple[int, list]] = {}  # (task, n) -> (chunk id, rows), in flight
        self.where: dict[int, tuple[int, int]] = {}  # chunk id -> (task, n), in flight
        self.handed: dict[int, int] = {}  # task -> how many chunks it was handed
        self.closed = False
        self.ready = threading.Condition()  # held by every call: the actor runs several at once

    def put(self, chunk_id: int, rows: list) -> int:
        with self.ready:
            self.queue.append((chunk_id, rows))
            self.ready.notify()
            return len(self.queue)

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()

    def forget(self, chunk_ids: list[int]) -> None:
        with self.ready:
            for c in chunk_ids:
                self.given.pop(self.where.pop(c, None), None)

    def take(self, task: int, n: int, wait_s: float = 0.0):
        """(chunk id, rows) for chunk n of feed task `task`; "wait" while nothing is queued (after waiting up to
        wait_s for a chunk); None at the end."""
        with self.ready:
            if (task, n) in self.given:
                return self.given[(task, n)]
            if n < self.handed.get(task, 0):  # handed out before and every row came back
                return -1, []
            if not self.queue and not self.closed and wait_s > 0:
                self.ready.wait_for(lambda: self.queue or self.closed, timeout=wait_s)
            if self.queue:
                chunk = self.given[(task, n)] = self.queue.popleft()
                self.where[chunk[0]] = (task, n)
                self.handed[task] = n + 1
                return chunk
            return None if self.closed else "wait"


def feed_actor(ray, scheduling_strategy):
    """A Feed actor, no CPU asked, placed by `scheduling_strategy` (on the driver's node)."""
    return ray.remote(num_cpus=0, scheduling_strategy=scheduling_strategy,
                      max_concurrency=FEED_CONCURRENCY)(Feed).remote()  # fmt: skip


def taken_chunks(feed, task: int, wait_s: float = TAKE_WAIT_S) -> Iterator[tuple[int, object]]:
    """The chunks (chunk id, what was put) the feed actor hands feed task `task`, in order, until it is closed and
    drained; each call waits in the actor up to `wait_s` while it has none ready."""
    import ray

    n = 0
    while True:
        got = ray.get(feed.take.remote(task, n, wait_s))
        if got is None:
            return
        if isinstance(got, str):
            continue  # it waited in the actor already
        n += 1
        yield got


def feed_task(batch: dict, *, feed) -> Iterator[dict]:
    """Ray Data task function: the rows of one feed task, chunk by chunk, as the driver plans them."""
    for chunk_id, rows in taken_chunks(feed, int(batch["task"][0])):
        yield {"i": np.full(len(rows), chunk_id, dtype=np.int64), "row": np.array(rows, dtype=object)}


class _Halted(Exception):
    """The driver stopped the feed: no more rows go to Ray."""


class RayFeed:
    """The driver's end: a thread takes rows from `rows` (the planner's stream; it may block on backpressure) and
    puts them into the feed actor in chunks; `done(key)` is told by the driver as each row comes back."""

    def __init__(self, ray, rows: Iterable[dict]):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(self.node, soft=False)
        self.scheduling = here
        self.actor = feed_actor(ray, here)
        self.ray, self.rows = ray, rows
        self.chunk_of: dict[str, int] = {}  # key -> chunk id, for rows in flight
        self.left: dict[int, int] = {}  # chunk id -> rows not heard back yet
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.halt = threading.Event()  # the driver is stopping (Ctrl-C): no call into Ray from here after it
        self.thread = threading.Thread(target=self._run, name="pidray-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, wait_s: float = 2.0) -> None:
        """Before the driver shuts Ray down: this end stops putting rows (a Ray call made after the shutdown would
        start a new local Ray from this thread and print its notices on the user's terminal)."""
        self.halt.set()
        if self.thread.is_alive():
            self.thread.join(wait_s)

    def _run(self) -> None:
        """Chunks of CHUNK_ROWS rows, or fewer once CHUNK_WAIT_S has passed with no new row: the planner may be
        waiting for results of rows still held here (backpressure), so a part chunk never waits for the next row."""
        import queue

        q: queue.Queue = queue.Queue(maxsize=4 * CHUNK_ROWS)
        end = object()

        def hand(item) -> bool:  # False once this end has stopped taking rows (then the planner stops too)
            while not self.halt.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    pass
            return False

        def pull():
            try:
                for row in self.rows:
                    if not hand(row):
                        return
            except BaseException as e:  # the planner failed: the driver raises it
                self.error = e
            finally:
                hand(end)

        threading.Thread(target=pull, name="pidray-plan", daemon=True).start()
        try:
            chunk, next_id = [], 0
            while not self.halt.is_set():
                try:
                    row = q.get(timeout=CHUNK_WAIT_S)
                except queue.Empty:
                    row = None
                if row is end:
                    break
                if row is not None:
                    chunk.append(row)
                if chunk and (row is None or len(chunk) >= CHUNK_ROWS):
                    self._put(next_id, chunk)
                    chunk, next_id = [], next_id + 1
            if chunk:
                self._put(next_id, chunk)
        except _Halted:
            pass
        except BaseException as e:  # the feed failed (an interrupt included): the driver raises it
            self.error = self.error or e
        finally:
            stopping = self.halt.is_set()
            self.halt.set()  # the planner thread stops handing rows
            if not stopping and self.ray.is_initialized():
                self.actor.close.remote()

    def _put(self, chunk_id: int, rows: list[dict]) -> None:
        if self.halt.is_set() or not self.ray.is_initialized():
            raise _Halted
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
