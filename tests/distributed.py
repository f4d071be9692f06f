"""A process group for tests that spawn gloo ranks by hand (torch.multiprocessing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_file: str) -> Iterator[None]:
    """Join a gloo group for the block and leave it cleanly.

    On success the ranks meet at a barrier before the group is destroyed: a rank that tears gloo down
    while its peer is still in a collective can abort the peer ("terminate called without an active
    exception", seen on a 2-core CI machine). After a failure there is no barrier (the peer may never
    reach it); ``mp.spawn`` reports the failure and stops the other ranks.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
