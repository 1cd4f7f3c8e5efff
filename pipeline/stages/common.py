"""What every stage shares: the row's resolved options, failure marking, timing."""

from __future__ import annotations

import time

from pipeline.errors import BadParameter, kind_of
from pipeline.options import OVERRIDES, Resolved, UpscaleOptions  # noqa: F401  (the stages' options, re-exported)


def parse_size(value) -> tuple[int, int]:
    """A size as users write it — "WIDTHxHEIGHT", or [width, height] — to (H, W); BadParameter otherwise."""
    try:
        w, h = (int(v) for v in (value.lower().split("x") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise BadParameter(f"size must be WIDTHxHEIGHT, e.g. 2048x1536, got {value!r}") from None
    if w < 1 or h < 1:
        raise BadParameter(f"sizes must be positive, got {value!r}")
    return h, w


def entered(row: dict) -> Resolved:
    """A row's options, resolved where it entered (`Workflow.enter`, which every driver calls): what a stage reads.
    A row that did not enter is its driver's bug, said as such."""
    opts = row.get("opts")
    if not isinstance(opts, Resolved):
        raise TypeError("the row did not enter through its workflow (Workflow.enter): its options are not resolved")
    return opts


def failed(row: dict, stage: str, err: BaseException, kind: str | None = None) -> dict:
    """Mark a row failed at `stage`: the message for people, the kind (pipeline.errors) for exit/HTTP codes."""
    row = {k: v for k, v in row.items() if k not in ("bytes", "image", "latent", "pixels", "output", "lq_image")}
    row.update(getattr(err, "known", None) or {})  # what the stage had learnt before it failed (the input's size)
    row["status"] = "failed"
    row["error"] = f"{stage}: {err}"
    row["error_kind"] = kind or kind_of(err)
    return row


def is_failed(row: dict) -> bool:
    return row.get("status") == "failed"


def _with_time(row: dict, stage: str, seconds: float) -> dict:
    if not is_failed(row):
        row = {**row, "timings": {**row.get("timings", {}), stage: round(seconds, 4)}}
    return row


def run_stage(stage, name: str, rows: list[dict]) -> list[dict]:
    """The one failure envelope every driver uses (the local loop, Ray Data, Serve).

    Failed rows pass through untouched; the others go through `stage.process_batch` in one call when the stage
    takes batches, else `stage.process` one by one. Each row gets its time; an exception costs only its own row:
    a batch that raises is run again one row at a time, so one bad row never fails its batch-mates. KeyboardInterrupt
    and other BaseExceptions are not caught.
    """
    out = list(rows)
    live = [i for i, r in enumerate(rows) if not is_failed(r)]
    batch = getattr(stage, "process_batch", None)
    if batch is not None and len(live) > 1:
        t0 = time.perf_counter()
        try:
            results = batch([rows[i] for i in live])
        except Exception:  # a batch that raises is run again below, one row at a time: each row's failure its own
            results = None
        if results is not None:
            dt = time.perf_counter() - t0
            for i, r in zip(live, results):  # each row its share of the call: its own `work_share`, else equal
                share = r.pop("work_share", None) if isinstance(r, dict) else None
                out[i] = _with_time(r, name, dt * (share if share is not None else 1 / len(live)))
            return out
    for i in live:
        t0 = time.perf_counter()
        try:
            r = stage.process(rows[i])
            if isinstance(r, dict):
                r.pop("work_share", None)  # a row alone has the whole call
            out[i] = _with_time(r, name, time.perf_counter() - t0)
        except Exception as e:  # a bad input, or a bug that must cost one row, not the job
            out[i] = failed(rows[i], name, e)
    return out


class Cancellable:
    """For model stages that serve requests: `cancel(request_id)` (called from another thread when a caller goes
    away) and `_gone(row)` (cancelled, or past its deadline), checked between steps of the stage's work."""

    cancelled: dict[str, None]  # request ids whose callers went away (oldest first, capped); set in __init__

    def cancel(self, request_id: str) -> None:
        """The caller of `request_id` went away: its work stops at the next step (called from another thread)."""
        self.cancelled[request_id] = None
        while len(self.cancelled) > 10_000:  # ids cancelled after their batch ended
            self.cancelled.pop(next(iter(self.cancelled)), None)

    def _gone(self, row: dict) -> bool:
        return row.get("request_id") in self.cancelled or time.time() > row.get("deadline", float("inf"))
