"""The two ends of a dataset job's pipeline under --ray (`jobs.dataset_ray`), as Ray Data task functions.

`feed_task` takes chunks of samples from the feed actor (`jobs.feed.Feed`) as the shards hand them on, each chunk a
reference into Ray's object store (the images go from the worker that read them to the stage that decodes them);
`deliver` hands each finished row, with its output, to the worker that assembles its shard, and a small row on to the
driver (it asks for what the last stage asks, so Ray Data runs it in the same task). Light on purpose, as
`jobs.feed`: the feed's workers import numpy only, not torch.
"""

from __future__ import annotations

import pickle

import numpy as np

from jobs.feed import taken_chunks

FEED_TASKS = 2  # Ray Data tasks taking chunks of samples from the feed actor


def feed_task(batch: dict, *, feed):
    """Ray Data task function: the samples of one feed task, chunk by chunk, as the shards hand them on."""
    import ray

    for chunk_id, refs in taken_chunks(feed, int(batch["task"][0])):
        try:
            rows = ray.get(refs[0]) if refs else []
        except ray.exceptions.RayError:  # the worker that read them is gone (its shard is recorded as failed)
            rows = []
        if rows:
            yield {"i": np.full(len(rows), chunk_id, dtype=np.int64), "row": np.array(rows, dtype=object)}


def deliver(batch: dict, *, workers: list) -> dict:
    """Ray Data task function after the last stage: each finished row (with its output) to the worker that assembles
    its shard; a small row on to the driver."""
    import ray

    rows = [pickle.loads(b) for b in batch["row"]]
    by_worker: dict[int, list] = {}
    for r in rows:
        by_worker.setdefault(r.get("pidray_shard", (-1, 0))[0], []).append(r)
    for w, some in by_worker.items():
        if 0 <= w < len(workers):
            try:
                ray.get(workers[w].finished.remote(some))
            except ray.exceptions.RayError:  # the worker is gone: its shards are recorded as failed
                pass
    small = [pickle.dumps({"key": r.get("key"), "status": r.get("status")}) for r in rows]
    return {"row": np.array(small, dtype=object)}
