"""What a job shows on the terminal besides its bars (`jobs.progress`): warnings, and Ray kept quiet."""

from __future__ import annotations

import os
import sys
import threading
import traceback


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


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def quiet_ray_data_threads() -> None:
    """After a job stopped Ray (Ctrl-C), Ray Data's executor thread may still wake and fail because Ray is gone; that
    trace goes to the Ray log, not the user's terminal. Exceptions of every other thread, and of Ray Data's while Ray
    runs (a later job's), keep the usual hook."""
    previous = threading.excepthook
    if getattr(previous, "pidray", False):
        return

    def hook(args):
        name = getattr(args.thread, "name", "") or ""
        if name.startswith("StreamingExecutor") and not _ray_running():
            with open(_RayQuiet.LOG, "a") as log:
                traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=log)
            return
        previous(args)

    hook.pidray = True
    threading.excepthook = hook
