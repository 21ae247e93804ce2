"""One GPU per worker process when several workers share a host (``--scale worker=N``).

Docker's ``count: 1`` device reservation hands every replica GPU 0, so the compose file
gives each worker all GPUs and the workers share them out: each claims the first GPU, by
its UUID, that no live worker holds (a Redis key with a TTL, renewed by the heartbeat).
A worker that finds every GPU taken uses the least loaded guess, GPU 0, and says so.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("merc.gpu")


def gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees (initialises CUDA: call it after any fork)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def claim_slot(r: Any, uuids: list[str], owner: str, ttl_s: float, prefix: str = "merc:gpu:") -> int | None:
    """Index of the first GPU claimed for ``owner`` (one it already holds first), or None if all are taken."""
    keys = [prefix + u for u in uuids]
    for i, key in enumerate(keys):
        if r.get(key) == owner:
            return i
    for i, key in enumerate(keys):
        if r.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return i
    return None


def renew_slot(r: Any, uuid: str, owner: str, ttl_s: float, prefix: str = "merc:gpu:") -> bool:
    """Extend ``owner``'s claim on a GPU; False if it expired and someone else took it."""
    key = prefix + uuid
    if r.set(key, owner, nx=True, px=int(ttl_s * 1000)):
        return True
    return r.get(key) == owner and bool(r.pexpire(key, int(ttl_s * 1000)))


def pick_device(device: str, r: Any, owner: str, ttl_s: float) -> tuple[str, str | None]:
    """The device this worker should use and the UUID of the GPU it claimed (None: no claim).

    Only ``auto``/``cuda`` with more than one visible GPU claims; ``cuda:1`` or ``cpu`` stand.
    """
    if device not in ("auto", "cuda"):
        return device, None
    uuids = gpu_uuids()
    if len(uuids) <= 1:
        return device, None
    index = claim_slot(r, uuids, owner, ttl_s)
    if index is None:
        log.warning("all %d GPUs are claimed by live workers; sharing cuda:0", len(uuids))
        return "cuda:0", None
    log.info("claimed GPU %d (%s)", index, uuids[index])
    return f"cuda:{index}", uuids[index]
