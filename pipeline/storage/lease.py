"""DST's lease as storage sees it: the file that names the one job that may write DST, and the check made before
each output or manifest file is published (`check_lease`). Taking, renewing and handing it over: `jobs.lease`."""

from __future__ import annotations

import json

from pipeline.errors import SetupError
from pipeline.storage.base import Location
from pipeline.storage.common import NotAFile, display, shown

LEASE_KEY = ".pidray-lock"  # DST's lease (jobs/lease.py): the job it names is the one job that may write DST


class LeaseLost(SetupError):
    """This job's lease on DST is gone (another job took DST over): it must never write into DST again."""

    def __init__(self, reason: str, said: bool = False):
        super().__init__(reason if said else f"{reason}: this job writes nothing more into DST")
        self.reason = reason


def check_lease(dst: Location, job: str) -> tuple[bytes, str]:
    """The lease file's (bytes, version token) while DST's lease still names job `job`; LeaseLost otherwise. One small
    read, made before each output or manifest file is published, so that a job stalled past its lease (and taken
    over by another job) writes nothing more into DST."""
    where = display(dst.uri)
    try:
        found = dst.read_with_etag(LEASE_KEY)
    except NotAFile as e:
        raise LeaseLost(f"DST {where}'s lease file {LEASE_KEY} is now {e.what}") from None
    if found is None:
        raise LeaseLost(f"DST {where}'s lease file {LEASE_KEY} was removed")
    try:
        info = json.loads(found[0])
    except (ValueError, RecursionError):
        info = None
    holder = info.get("owner") if isinstance(info, dict) else None
    if holder != job:
        raise LeaseLost(f"another job ({shown(holder) if holder is not None else 'none'}) holds DST {where} now")
    return found
