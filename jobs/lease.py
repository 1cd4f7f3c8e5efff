"""One job per DST at a time: a lease at DST/.pidray-lock that the running job renews and that expires if it dies.

The lease is a small JSON file created whole, only if none exists (locally a hard link of a finished file, on S3 a
PUT with `If-None-Match: *`), holding the job's id, host, pid and an expiry that a heartbeat thread pushes forward every
RENEW_EVERY_S. Another job finding a lease is refused up front (SetupError: exit 2, one line naming the holder)
unless the lease is stale: its expiry has passed, or its holder ran on this host and that pid is gone. A stale lease
is taken over atomically (S3: a PUT with `If-Match` on the stale version; locally under a short-lived guard file), and
the dead job's temporary files are removed. The lease is released when the job ends, after Ctrl-C/SIGTERM too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from pipeline.errors import SetupError
from pipeline.storage import Location

LEASE_NAME = ".pidray-lock"
GUARD_NAME = ".pidray-lock.takeover"  # local takeovers only: one job at a time inspects a stale lease
LEASE_TTL_S = 120.0
RENEW_EVERY_S = 15.0
GUARD_STALE_S = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """The lease of job `owner` on `dst` (acquire → heartbeat → release)."""

    def __init__(self, dst: Location, owner: str | None = None, ttl: float = LEASE_TTL_S):
        self.dst, self.ttl = dst, ttl
        self.owner = owner or uuid.uuid4().hex[:12]
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token: str | None = None  # our version of the lease file while we hold it
        self.lost = ""  # why the lease is no longer ours (another job took it over), or ""
        self.taken_over = ""  # the id of a dead job whose lease we took over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "renewed": now,
                           "expires": now + self.ttl}).encode()  # fmt: skip

    @staticmethod
    def parse(data: bytes) -> dict:
        try:
            info = json.loads(data)
        except (ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def stale(self, info: dict) -> str:
        """Why the lease `info` may be taken over ("" while its holder may still be running)."""
        expires, pid = info.get("expires"), info.get("pid")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            return "it cannot be read"
        if expires < time.time():
            return f"it expired at {time.strftime('%H:%M:%S', time.localtime(expires))}"
        if info.get("host") == self.host and isinstance(pid, int) and not isinstance(pid, bool) and not _alive(pid):
            return f"its process {pid} on this host is gone"
        return ""

    def describe(self, info: dict) -> str:
        left = info.get("expires", 0) - time.time() if isinstance(info.get("expires"), (int, float)) else 0
        return (f"job {info.get('owner', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}; its lease "
                f"expires in {max(0, left):.0f} s unless renewed)")  # fmt: skip

    # ------------------------------------------------------------------ acquire / renew / release
    def acquire(self) -> None:
        """Take the lease, or raise SetupError naming the job that holds it."""
        for _ in range(3):  # a lease released or taken over while we look: try again
            try:
                self.token = self.dst.create_exclusive(LEASE_NAME, self._body())
                return
            except FileExistsError:
                pass
            found = self.dst.read_with_etag(LEASE_NAME)
            if found is None:
                continue
            info = self.parse(found[0])
            if not self.stale(info):
                raise SetupError(
                    f"DST {self.dst.uri} is in use by another pidray {self.describe(info)}: wait for it to finish, "
                    f"or choose another DST; if that job is gone for good, delete {LEASE_NAME} in DST"
                )
            if self._take_over(found, info):
                self.taken_over = str(info.get("owner", ""))
                return
        raise SetupError(f"DST {self.dst.uri}: could not take its lease ({LEASE_NAME}); another job keeps taking it")

    def _take_over(self, found: tuple[bytes, str], info: dict) -> bool:
        if self.dst.is_s3:  # atomic: only if the stale version is still the one there
            try:
                self.token = self.dst.replace_versioned(LEASE_NAME, self._body(), found[1])
                return True
            except FileExistsError:
                return False
        try:  # locally: one job at a time inspects and replaces a stale lease
            self.dst.create_exclusive(GUARD_NAME, self.owner.encode())
        except FileExistsError:
            guard = os.path.join(self.dst.uri, GUARD_NAME)
            try:
                if time.time() - os.stat(guard).st_mtime > GUARD_STALE_S:  # its taker died mid-takeover
                    os.unlink(guard)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            again = self.dst.read_with_etag(LEASE_NAME)
            if again is None or again[0] != found[0]:  # released or renewed meanwhile
                return False
            self.token = self.dst.replace_versioned(LEASE_NAME, self._body(), "")
            return True
        finally:
            self.dst.delete(GUARD_NAME)

    def renew(self) -> None:
        """Push the expiry forward; records `lost` when the lease is no longer ours."""
        with self._lock:
            if self.token is None or self.lost:
                return
            found = self.dst.read_with_etag(LEASE_NAME)
            holder = self.parse(found[0]) if found else {}
            if holder.get("owner") != self.owner:
                self.lost = f"another job ({holder.get('owner', 'none')}) holds DST {self.dst.uri} now"
                return
            try:
                self.token = self.dst.replace_versioned(LEASE_NAME, self._body(), found[1] if self.dst.is_s3 else "")
            except FileExistsError:
                self.lost = f"the lease on DST {self.dst.uri} changed under this job"

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.token is None:
                return
            try:
                found = self.dst.read_with_etag(LEASE_NAME)
                if found is not None and self.parse(found[0]).get("owner") == self.owner:
                    self.dst.delete(LEASE_NAME)
            except Exception:  # DST gone or unreachable: the lease expires on its own
                pass
            self.token = None

    def start_heartbeat(self, every: float = RENEW_EVERY_S) -> None:
        def beat():
            while not self._stop.wait(every):
                try:
                    self.renew()
                except Exception:  # storage hiccup: the next beat tries again, well before the expiry
                    pass

        self._thread = threading.Thread(target=beat, name="pidray-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """SetupError when the lease was lost: two jobs must never write one DST."""
        if self.lost:
            raise SetupError(f"stopped: {self.lost}; this job's rows so far are in its manifest")

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


__all__ = ["Lease", "LEASE_NAME", "LEASE_TTL_S"]
