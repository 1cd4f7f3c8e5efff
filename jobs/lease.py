"""One job per DST at a time: a lease at DST/.pidray-lock that the running job renews and that expires if it dies.

The lease is a small JSON file created whole, only if none exists (locally a hard link of a finished file, on S3 a
PUT with `If-None-Match: *`), holding the job's id, host, pid and an expiry that a heartbeat thread pushes forward every
RENEW_EVERY_S. Another job finding a lease is refused up front (SetupError: exit 2, one line naming the holder)
unless the lease is stale: its expiry has passed, or its holder ran on this host and that pid is gone. A stale lease
is taken over atomically (S3: a PUT with `If-Match` on the stale version; locally under a short-lived guard file), and
the dead job's temporary files are removed. The lease is released when the job ends, after Ctrl-C/SIGTERM too.

A lease file is data that any program may have written: its fields are checked (a job id is 12 lowercase hex digits,
the expiry a time no further than a day ahead, the pid a process number), a lease that fails a check cannot be read
and counts as stale, nothing of it ever becomes part of a path or pattern, and what is printed of it is escaped
(`shown`). Only a regular file at DST/.pidray-lock is opened (a FIFO, a folder or a link there is refused with one
line saying what is there). A job that finds the lease no longer its own (stalled past its expiry, then taken over)
writes nothing more into DST: each output and manifest file is published only after a read of the lease file shows
it is still this job's (`check_lease` in the write stage, `Fenced` for the manifest), and the job stops.

PIDRAY_LEASE_TTL_S and PIDRAY_LEASE_RENEW_S set the lease's life and the heartbeat's interval (in seconds).
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import threading
import time
import uuid

from pipeline.errors import SetupError, storage_failures
from pipeline.receipts import valid_job
from pipeline.storage import (
    LEASE_KEY,
    LeaseLost,
    Location,
    NotAFile,
    check_lease,
    explain_storage_error,
    shown,
    what_is,
)

LEASE_NAME = LEASE_KEY
GUARD_NAME = ".pidray-lock.takeover"  # local takeovers only: one job at a time inspects a stale lease
LEASE_TTL_S = 120.0
RENEW_EVERY_S = 15.0
GUARD_STALE_S = 30.0
TTL_ENV, RENEW_ENV = "PIDRAY_LEASE_TTL_S", "PIDRAY_LEASE_RENEW_S"
MAX_AHEAD_S = 86_400.0  # an expiry further ahead than this was not written by pidray: the lease cannot be read
MAX_SECONDS_S = MAX_AHEAD_S / 2  # the most PIDRAY_LEASE_TTL_S may be: its expiry stays readable across clocks
PID_MAX = 2**31 - 1


def _seconds(name: str, default: float) -> float:
    """Seconds from the environment variable `name` (`default` when unset); SetupError when it is not a number in
    (0, MAX_SECONDS_S]."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS_S):
        raise SetupError(f"{name}={shown(raw)} is not a number of seconds above 0 and at most {MAX_SECONDS_S:.0f}; "
                         "fix it or unset it")  # fmt: skip
    return value


def _expiry(info: dict) -> float | None:
    """The lease's expiry (seconds since the epoch), or None when it is not one: not a number, a bool, NaN or an
    infinity, before 1970, or further ahead than MAX_AHEAD_S (no pidray writes that)."""
    value = info.get("expires")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    if not math.isfinite(value) or value < 0 or value > time.time() + MAX_AHEAD_S:
        return None
    return value


def _pid(info: dict) -> int | None:
    pid = info.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= PID_MAX else None


def _namespace() -> str:
    """Where a pid means this process: the boot and the pid namespace (a container with the same host name, or a
    pod on the host's network, has its own pids). "" where the system does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read(64).strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


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

    def __init__(self, dst: Location, owner: str | None = None, ttl: float | None = None):
        self.dst = dst
        self.ttl = ttl if ttl is not None else _seconds(TTL_ENV, LEASE_TTL_S)
        self.every = _seconds(RENEW_ENV, min(RENEW_EVERY_S, self.ttl / 8))  # the heartbeat's interval: 8 a lease
        self.owner = owner or uuid.uuid4().hex[:12]
        self.host, self.pid, self.ns = socket.gethostname(), os.getpid(), _namespace()
        self.token: str | None = None  # our version of the lease file while we hold it
        self.lost = ""  # why the lease is no longer ours (another job took it over), or ""
        self.taken_over = ""  # the id of a dead job whose lease we took over ("" when its lease named none)
        self.took_over = ""  # why the lease we took over was stale ("" when we took none over)
        self._looked = 0.0  # when `check` last read the lease file (time.monotonic)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "ns": self.ns, "renewed": now,
                           "expires": now + self.ttl}).encode()  # fmt: skip

    @staticmethod
    def parse(data: bytes) -> dict:
        try:
            info = json.loads(data)
        except (ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def stale(self, info: dict) -> str:
        """Why the lease `info` may be taken over ("" while its holder may still be running). A lease whose fields
        do not check out (an owner that is no job id, an expiry that is no time) cannot be read, and is stale."""
        if not valid_job(info.get("owner")):
            return "it cannot be read: it names no pidray job"
        expires, pid = _expiry(info), _pid(info)
        if expires is None:
            return "it cannot be read: its expiry is not a time"
        if expires < time.time():
            return f"it expired at {time.strftime('%H:%M:%S', time.localtime(expires))}"
        same = info.get("host") == self.host and self.ns and info.get("ns") == self.ns  # its pids are ours to ask
        if same and pid is not None and not _alive(pid):
            return f"its process {pid} on this host is gone"
        return ""

    def describe(self, info: dict) -> str:
        """The holder of the live lease `info`, for people: every field escaped and cut short (`shown`)."""
        expires, pid = _expiry(info), _pid(info)
        left = expires - time.time() if expires is not None else 0
        return (f"job {shown(info.get('owner', '?'))} (pid {pid if pid is not None else '?'} on "
                f"{shown(info.get('host', '?'))}; its lease expires in {max(0, left):.0f} s unless "
                "renewed)")  # fmt: skip

    def _not_a_file(self, e: NotAFile) -> SetupError:
        path = f"{self.dst.uri.rstrip('/')}/{e.key}"
        return SetupError(f"DST {self.dst.uri} cannot be used: {e.key} in it is {e.what}, not pidray's lock file; if "
                          f"no pidray job is writing into DST, remove it ({path}) and run again")  # fmt: skip

    # ------------------------------------------------------------------ acquire / renew / release
    def acquire(self) -> None:
        """Take the lease, or raise SetupError naming the job that holds it (or saying what is at the lease's name
        when that is no file: it is never opened, followed or removed)."""
        try:
            self._acquire()
        except NotAFile as e:
            raise self._not_a_file(e) from None
        except SetupError:
            raise
        except OSError as e:
            where = f"{self.dst.uri.rstrip('/')}/{LEASE_NAME}"
            raise SetupError(explain_storage_error(e, "take the lease", where, self.dst.s3.endpoint_url)) from e

    def _acquire(self) -> None:
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
            why = self.stale(info)
            if not why:
                raise SetupError(
                    f"DST {self.dst.uri} is in use by another pidray {self.describe(info)}: wait for it to finish, "
                    f"or choose another DST; if that job is gone for good, delete {LEASE_NAME} in DST"
                )
            if self._take_over(found, info):
                # only a lease that reads as a whole names a job whose temporaries may go
                self.taken_over = info["owner"] if not why.startswith("it cannot be read") else ""
                self.took_over = why
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
                st = os.lstat(guard)
                if not stat.S_ISREG(st.st_mode):  # never removed: what is there is not ours
                    raise NotAFile(GUARD_NAME, what_is(guard, st.st_mode))
                if time.time() - st.st_mtime > GUARD_STALE_S:  # its taker died mid-takeover
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
            try:
                found = check_lease(self.dst, self.owner)
            except LeaseLost as e:
                self.lost = e.reason
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

    def start_heartbeat(self, every: float | None = None) -> None:
        """Renew every `every` seconds (default: `self.every`), and at least twice a lease."""
        every = max(0.05, min(every or self.every, self.ttl / 2))

        def beat():
            while not self._stop.wait(every):
                try:
                    self.renew()
                except Exception:  # storage hiccup: the next beat tries again, well before the expiry
                    pass

        self._thread = threading.Thread(target=beat, name="pidray-lease", daemon=True)
        self._thread.start()

    def check(self, every: float = 1.0) -> None:
        """LeaseLost (a SetupError) when the lease was lost: two jobs must never write one DST. Reads the lease file
        when it was last read `every` seconds ago or more (the heartbeat may not have run since the job resumed)."""
        if not self.lost and self.token is not None and time.monotonic() - self._looked >= every:
            self.ensure(quiet=True)
        if self.lost:
            raise LeaseLost(f"stopped: {self.lost}")

    def ensure(self, quiet: bool = False) -> None:
        """LeaseLost unless a read of the lease file, now, shows it is still this job's: before each manifest file
        is published. `quiet`: a lease file that cannot be read now (a storage error) is not a lost lease."""
        if not self.lost:
            self._looked = time.monotonic()
            try:
                check_lease(self.dst, self.owner)
            except LeaseLost as e:
                self.lost = e.reason
            except storage_failures():
                if not quiet:
                    raise
        if self.lost:
            raise LeaseLost(self.lost)

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


class Fenced:
    """DST as a leased job's manifest writer sees it: every write, delete or copy first reads DST's lease and goes on
    only while it is still this job's (`Lease.ensure`: LeaseLost otherwise); anything else is DST's own."""

    def __init__(self, dst: Location, lease: Lease):
        self._dst, self._lease = dst, lease

    def __getattr__(self, name):
        return getattr(self._dst, name)

    def write(self, key: str, data: bytes, overwrite: bool = False) -> None:
        self._lease.ensure()
        self._dst.write(key, data, overwrite=overwrite)

    def delete(self, key: str) -> None:
        self._lease.ensure()
        self._dst.delete(key)

    def copy(self, key: str, new_key: str) -> None:
        self._lease.ensure()
        self._dst.copy(key, new_key)


__all__ = ["Lease", "LeaseLost", "Fenced", "LEASE_NAME", "LEASE_TTL_S"]


def holding(dst, work):
    """`work(lease)` while this job holds DST's lease: taken first (a DST in use by another live job is refused),
    kept alive by its heartbeat, released whatever happens."""
    lease = Lease(dst)
    lease.acquire()
    try:
        lease.start_heartbeat()
        return work(lease)
    finally:
        lease.release()
