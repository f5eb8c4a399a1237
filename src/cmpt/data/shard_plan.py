"""Which shards each stream of a streaming run reads, and whether any epoch can feed it
(:mod:`cmpt.data.streaming`; docs/method.md §4)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cmpt.data.tar_reader import iter_tar
from cmpt.data.webdataset import ShardList

__all__ = ["assign_shards", "never_read"]


def assign_shards(
    num_shards: int, num_streams: int, stream: int, epoch: int, seed: int = 0, shuffle: bool = True
) -> list[tuple[int, int, int]]:
    """``[(shard, modulus, residue)]`` read by global ``stream`` of ``num_streams`` in ``epoch``: the
    stream keeps the samples of ``shard`` whose index ``i`` has ``i % modulus == residue``."""
    if num_shards < 1:
        raise ValueError("no tar shard to read")
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    if num_shards >= num_streams:
        return [(int(s), 1, 0) for s in order[stream::num_streams]]
    m = stream % num_shards
    return [(int(order[m]), len(range(m, num_streams, num_shards)), stream // num_shards)]


def never_read(shards: ShardList, stream: int, num_streams: int, seed: int = 0, shuffle: bool = True) -> str:
    """Why global ``stream`` of ``num_streams`` reads no sample in any epoch (one line naming the
    shards and the fix), or ``""`` when some epoch feeds it (docs/method.md §4): shuffled, any shard
    may fall to it; unshuffled, only its own. Shards are opened until one has a sample it keeps."""
    plan = assign_shards(len(shards), num_streams, stream, 0, seed, shuffle)
    modulus, residue, own = plan[0][1], plan[0][2], [k for k, _, _ in plan]

    def has(k: int, n: int) -> bool:
        return sum(1 for _ in iter_tar(shards.paths[k], read_data=False, limit=n)) >= n

    def listing(ks: Any) -> str:
        names = list(dict.fromkeys(shards.paths[k] for k in ks))
        return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")

    ks = range(len(shards)) if shuffle else own
    if any(has(k, residue + 1) for k in ks):
        return ""
    if not any(has(k, 1) for k in range(len(shards))):
        return (
            f"every tar shard is empty ({listing(range(len(shards)))}; img2dataset leaves an empty tar "
            "when every download of a shard failed): nothing to train on; point data.path at shards with data"
        )
    where = f"stream {stream} of {num_streams} (ranks × data.num_streams)"
    if residue:
        return (
            f"{where} keeps sample {residue} (mod {modulus}) of a shard, but no shard it may read has "
            f"more ({listing(ks)}): fewer samples than streams; use fewer streams or ranks, or more data"
        )
    return (
        f"{where} reads only empty tar shards ({listing(own)}) and data.shuffle is off, so it never "
        "reads a sample: remove the empty shards, or turn data.shuffle on"
    )
