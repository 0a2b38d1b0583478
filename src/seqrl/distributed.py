"""Small data-parallel helpers: rank/world queries and object gathering that are no-ops in one process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; small payloads only)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list) -> list:
    """This rank's share of `items` (round-robin, no padding: every item is seen by exactly one rank)."""
    return items[rank()::world_size()]


def rank_share(n_items: int, steps: int, batch: int, seed: int, world: int, rank: int) -> list[int]:
    """Item indices of `rank` for `steps` global batches of `batch` items drawn from a seeded shuffle (reshuffled
    each pass over the data). The global batches do not depend on `world`: rank r takes positions r, r + world, ...
    of each, so any number of ranks sees exactly the batches one process would."""
    order = torch.utils.data.RandomSampler(range(n_items), num_samples=steps * batch,
                                           generator=torch.Generator().manual_seed(seed))
    return [i for pos, i in enumerate(order) if pos % batch % world == rank]
