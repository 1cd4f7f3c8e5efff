"""The inputs of `pidray decode`: the latents each file holds, listed from headers alone, before any model loads."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from jobs.naming import latent_key
from pipeline.errors import BadInput, TooLarge, kind_of
from pipeline.latents import header_ids, npz_ids, st_header_bytes
from pipeline.storage import MAX_INPUT_BYTES, Entry, Location


def _latent_inputs(src: Location, entries: list[Entry]):
    """([(entry, key, latent id)], [(entry, reason)]): the latents of each file, read from the safetensors header
    alone (ranged reads), from an .npz's zip directory, or one per .npy; a file whose latents cannot be listed (or
    that is over the size limit, which is refused from the listing before anything is read) is refused with the
    reason, and the job goes on."""

    def ids(e: Entry) -> list[str]:
        name = e.key.lower()
        if e.size > MAX_INPUT_BYTES:
            raise TooLarge(f"file is {e.size:,} bytes, over the limit of {MAX_INPUT_BYTES:,}")
        if name.endswith(".npz"):
            with src.open(e.key) as f:
                return npz_ids(f)
        if name.endswith(".safetensors"):
            head = src.read(e.key, 1 << 16)
            got = header_ids(e.key, head, e.size)
            return got if got is not None else header_ids(e.key, src.read(e.key, st_header_bytes(head)), e.size)
        return [""]

    def one(e: Entry):
        try:
            got = ids(e)
        except Exception as err:  # one file whose latents cannot be listed (zip, header, storage): refused alone
            return e, None, (kind_of(err) if isinstance(err, BadInput) else "bad_input", str(err))
        twice = sorted(i for i, n in Counter(got).items() if n > 1)  # one pass, whatever the count of ids
        if twice:  # a crafted archive: two latents under one name would share a manifest row and an output
            return e, None, ("bad_input", f"the file holds latent id(s) {twice[:5]} more than once")
        if len(got) > 1 and "" in got:
            return e, None, ("bad_input", "the file holds a latent with an empty name among others")
        return e, got, None

    inputs, bad = [], []
    with ThreadPoolExecutor(8) as pool:
        for e, got, why in pool.map(one, entries):
            if why is not None:
                bad.append((e, why))
            else:
                inputs += [(e, latent_key(e.key, i), i) for i in got]
    return inputs, bad
