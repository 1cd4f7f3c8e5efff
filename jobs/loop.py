"""How a job stops, and the in-process loop in a thread of its own.

SIGINT/SIGTERM during a job raise `Interrupted` in the main thread (`Signals`, installed by `on_signals`), at once
or right after the row being recorded; the in-process loop (`Loop`) runs in a thread of its own while the main thread
waits on its rows, so a signal is answered at once; once halted, no output starts being written (`Gate`). The driver
that uses them: `jobs.pipeline`.
"""

from __future__ import annotations

import atexit
import copy
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from jobs.config import JobConfig
from jobs.plan import Plan
from jobs.raydata import _iter_local
from jobs.terminal import quiet_ray_data_threads
from pipeline import progress
from pipeline.storage import Location


class Interrupted(BaseException):
    """SIGINT/SIGTERM during a job: the job stops, writes its manifest, and exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so that no per-row `except Exception` records it as a failed input.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The job's SIGINT/SIGTERM handler. The first signal stops the job: Interrupted is raised in the main thread at
    once, or, while the driver records a finished row (`hold`), right after it (a row is recorded whole). Once the
    job is stopping (`stopping`), a signal changes nothing: the manifest is written whole."""

    def __init__(self):
        self.signum = 0
        self.holding = False
        self.stopping = False

    def __call__(self, signum, frame):
        self.signum = self.signum or signum
        if not (self.stopping or self.holding):
            raise Interrupted(signum)

    @contextmanager
    def hold(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.signum and not self.stopping:
            raise Interrupted(self.signum)


@contextmanager
def on_signals(handler):
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


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        quiet_ray_data_threads()
        ray.shutdown()


def read_ahead(items: Iterable[dict], stopped: threading.Event) -> Iterator[dict]:
    """`items`, drawn by a thread of its own as fast as it gives them (its own backpressure bounds it)."""
    q: queue.Queue = queue.Queue()
    end = object()

    def pull():
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # the planner failed: raised in the caller's thread
            q.put(("error", e))
        finally:
            q.put(end)

    threading.Thread(target=pull, name="pidray-plan", daemon=True).start()
    while not stopped.is_set():
        item = q.get()
        if item is end:
            return
        if isinstance(item, tuple):
            raise item[1]
        yield item


def taken(rows: Iterable[dict], take, hold) -> Iterator[dict]:
    """`rows`, each recorded by `take` inside `hold()` (a signal that comes meanwhile is answered once it is)."""
    for row in rows:
        with hold():
            take(row)
        yield row


class Halted(BaseException):
    """Raised in the loop's thread once the job stops: it stops there (no stage records it as a failed row)."""


class Gate:
    """DST as the in-process loop's write stage sees it: once closed, no output starts being written (`Halted`).
    Counts the writes under way (`busy`) and keeps the outputs written whose rows the driver has not taken yet
    (`unreported`)."""

    def __init__(self, dst: Location):
        self._dst, self._lock = dst, threading.Lock()
        self.closed, self.busy, self.unreported = False, 0, set()

    def __getattr__(self, name):
        return getattr(self._dst, name)

    def write(self, key: str, data: bytes, **kwargs) -> None:
        with self._lock:
            if self.closed:
                raise Halted
            self.busy += 1
        try:
            self._dst.write(key, data, **kwargs)
            with self._lock:
                self.unreported.add(key)
        finally:
            with self._lock:
                self.busy -= 1

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def reported(self, key: str) -> None:
        with self._lock:
            self.unreported.discard(key)


STOP_GRACE_S = 2.0  # after Ctrl-C, how long the driver waits for an output being written (its row is then `ok`)


class Loop:
    """The in-process loop (`_iter_local`) in a thread of its own, its finished rows handed to the driver through a
    queue. The main thread only waits on the queue, so a signal is answered at once: Python runs signal handlers in
    the main thread, between its own steps, never inside a network call that lasts minutes.

    `halt()` stops it: no output starts being written after it (`Gate`), the diffusion stage stops at its next
    network call, and the rows whose outputs were being written are handed over. The thread is a daemon: a network
    call under way when the job stops ends with the process."""

    END = object()

    def __init__(self, cfg: JobConfig, plan: Plan, rows: Iterable[dict], take):
        self.take = take  # records a finished row (in the main thread)
        self.queue: queue.Queue = queue.Queue()
        self.gate = Gate(plan.dst)
        gated = copy.copy(plan)
        gated.dst = self.gate
        self.it = _iter_local(cfg, gated, rows)
        self.halted = threading.Event()
        self.ended = False
        self.thread = threading.Thread(target=self._run, name="pidray-loop", daemon=True)

    def _run(self) -> None:
        try:
            with progress.listening(self._check):
                for row in self.it:
                    self.queue.put(row)
                    if self.halted.is_set():
                        return
        except Halted:
            pass
        except BaseException as e:  # the loop failed (the model could not load...): raised in the driver
            self.queue.put(Failed(e))
        finally:
            self.queue.put(self.END)

    def _check(self, key: str, n: int) -> None:
        """Heard after each network call: the loop's thread stops there once halted."""
        if self.halted.is_set() and threading.current_thread() is self.thread:
            raise Halted

    def _next(self, timeout: float | None, failure: bool = True):
        """The next row, None when none came within `timeout` or the loop ended; a failure in the loop is raised
        (unless not `failure`: the job is stopping anyway)."""
        if self.ended:
            return None
        try:
            item = self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if item is self.END:
            self.ended = True
            return None
        if isinstance(item, Failed):
            self.ended = True
            if failure:
                raise item.error
            return None
        if item.get("output_key"):
            self.gate.reported(item["output_key"])
        return item

    def rows(self, hold) -> Iterator[dict]:
        """The finished rows, each taken by `take` inside `hold()` (the signal handler's: a signal is answered once the
        row is recorded, or once the wait ends, half a second at most; the main thread stays free for the handler)."""
        self.thread.start()
        while not self.ended:
            with hold():
                row = self._next(timeout=0.5)
                if row is not None:
                    self.take(row)
            if row is not None:
                yield row

    def ready(self) -> list[dict]:
        """The rows already handed over and not taken yet."""
        out = []
        while (row := self._next(timeout=0, failure=False)) is not None:
            out.append(row)
        return out

    def halt(self, grace: float = STOP_GRACE_S) -> list[dict]:
        """Stop the loop; the rows whose outputs were being written (waited for `grace` seconds at most)."""
        self.halted.set()
        self.gate.close()
        out = self.ready()
        deadline = time.monotonic() + grace
        while not self.ended and (self.gate.busy or self.gate.unreported):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            row = self._next(timeout=min(left, 0.1), failure=False)
            if row is not None:
                out.append(row)
        return out

    def finish(self, signals: Signals) -> None:
        """The thread ends with the job: at its next network call or output when an error stopped the job (said
        once it has), at once after a signal. Python cannot end a thread inside a network call, and one that comes
        back from it while the interpreter exits aborts the process; so after a signal, at the interpreter's exit,
        the process exits with the signal's code (128 + signal) there and then if the thread is still inside one."""
        self.halt(grace=0)
        while self.thread.is_alive() and not signals.signum:
            self.thread.join(0.25)
        if self.thread.is_alive():
            atexit.register(self._leave, 128 + signals.signum)

    def _leave(self, code: int) -> None:
        if self.thread.is_alive():
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # best effort on the way out: nothing may keep the process from exiting here
                    pass
            os._exit(code)


class Failed:
    def __init__(self, error: BaseException):
        self.error = error
