"""Vocabulary parallelism: combine per-row statistics across the ranks of a process group.

Each rank holds columns [vocab_start, vocab_start + V_local) of the vocabulary and computes
the statistics (m, s, z_t, sum w*z, argmax[, sez]) of its piece (see :mod:`fusedce.spec`).
One all-gather of the packed statistics ([fields, N] fp32 per rank) lets every rank fold the
pieces in rank order with the associative combine, so every rank gets the same lse and
loss. Only a few floats per token cross the wire, never logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .spec import RowStats, combine_stacked


def allgather_stats(stats: RowStats, group) -> RowStats:
    """Combine the statistics of every rank's vocabulary piece (ranks in vocab order).

    Args:
        stats: this rank's RowStats, fields [N].
        group: a torch.distributed process group whose ranks hold consecutive vocab shards.
    Returns:
        The combined RowStats over the whole vocabulary, identical on every rank.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return stats
    fields = [stats.m, stats.s, stats.zt, stats.sz]
    if stats.sez is not None:
        fields.append(stats.sez)
    # argmax ids ride along in fp32: exact for vocabularies below 2**24 ids
    fields.append(stats.am.float())
    packed = torch.stack(fields).contiguous()
    out = torch.empty((world,) + tuple(packed.shape), dtype=packed.dtype, device=packed.device)
    dist.all_gather_into_tensor(out, packed, group=group)
    sez = out[:, 4] if stats.sez is not None else None
    return combine_stacked(out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, -1].long(), sez)


_LAYOUT_CACHE: dict = {}


def unpack_dtensor(logits, group):
    """(local tensor, group) for a DTensor sharded on its last dim; plain tensors pass through."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - old torch
        return logits, group
    if not isinstance(logits, DTensor):
        return logits, group
    placements = logits.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or \
            placements[0].dim not in (-1, logits.dim() - 1):
        raise ValueError("DTensor logits must be sharded on their last (vocabulary) dimension "
                         f"over a 1-D mesh, got placements {placements}")
    mesh_group = logits.device_mesh.get_group()
    if group is not None and group is not mesh_group:
        raise ValueError("tp_group differs from the DTensor's mesh group")
    return logits.to_local(), mesh_group


def resolve_layout(group, v_local: int, vocab_start, validate: bool = True):
    """(vocab_start, global V) of this rank's shard.

    Without ``vocab_start`` the shards are taken as equal (rank r holds [r*V_local,
    (r+1)*V_local)); with it, one all-gather of (vocab_start, V_local) per layout, cached,
    gives the global V and checks that the shards tile [0, V).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if vocab_start is None:
        return rank * v_local, world * v_local
    key = (id(group), int(vocab_start), int(v_local))
    if key not in _LAYOUT_CACHE:
        mine = torch.tensor([int(vocab_start), int(v_local)], dtype=torch.int64)
        backend = dist.get_backend(group)
        if backend == "nccl":
            mine = mine.cuda()
        allv = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(allv, mine, group=group)
        pieces = [tuple(int(v) for v in p.cpu()) for p in allv]
        expect = 0
        for r, (st, n) in enumerate(pieces):
            if st != expect:
                raise ValueError(f"vocabulary shards do not tile the vocabulary: rank {r} starts "
                                 f"at {st}, expected {expect} (shards: {pieces})")
            expect += n
        _LAYOUT_CACHE[key] = expect
    return int(vocab_start), _LAYOUT_CACHE[key]
