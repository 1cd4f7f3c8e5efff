"""What a job shows on the terminal: Ray kept quiet, and the progress bar (or a periodic log line)."""

from __future__ import annotations

import os
import sys
import time


def _warn(message: str) -> None:
    print(f"pidray: warning: {message}", file=sys.stderr, flush=True)


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


class _LogProgress:
    """Progress without a terminal (k8s logs, CI): one line every `every` seconds and at the end. `total` grows
    while SRC is still being listed (`grow`)."""

    def __init__(self, total: int, stream, every: float = 30.0):
        self.total, self.stream, self.every = total, stream, every
        self.done, self.t0, self.last = 0, time.time(), time.time()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.time() - self.last >= self.every:
            self.last = time.time()
            self._line()

    def _line(self) -> None:
        dt = max(1e-9, time.time() - self.t0)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate else float("nan")
        print(f"upscale: {self.done}/{self.total} ({100 * self.done / max(1, self.total):.0f}%), {rate:.2f} img/s, "
              f"ETA {eta:.0f}s", file=self.stream, flush=True)  # fmt: skip

    def grow(self, n: int = 1) -> None:
        self.total += n

    def close(self) -> None:
        if self.done:
            self._line()


class _Bar:
    """tqdm with a total that grows as the listing streams."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def grow(self, n: int = 1) -> None:
        self.bar.total = (self.bar.total or 0) + n

    def close(self) -> None:
        self.bar.close()


def _progress(total: int, enabled: bool, stream):
    """A bar with ETA on a terminal, a periodic one-line log otherwise, nothing when disabled."""
    from tqdm import tqdm

    if enabled and not stream.isatty():
        return _LogProgress(total, stream)
    return _Bar(tqdm(total=total, unit="img", desc="upscale", disable=not enabled, smoothing=0.1, file=stream))
