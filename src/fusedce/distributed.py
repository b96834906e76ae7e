"""Vocabulary parallelism: combine per-row statistics across the ranks of a process group.

Rank r of a group holds columns [start_r, start_r + V_r) of the vocabulary; the shards tile
[0, V) in any rank order (default start_r = r * V_local, equal shards). Each rank reduces its
piece of every row to the statistics of :mod:`fusedce.spec`,

    m_r = max_j z_j,  s_r = sum_j exp(z_j - m_r),  zt_r = z_t [t in piece r],
    sz_r = sum_j w_j z_j,  am_r = first global argmax,  sez_r = sum_j exp(z_j - m_r) z_j,

and ONE all-gather of the packed statistics ([fields, N] fp32 per rank) lets every rank fold
the pieces with the associative combine

    m = max_r m_r,  s = sum_r s_r exp(m_r - m),  zt = sum_r zt_r,  sz = sum_r sz_r,
    sez = sum_r sez_r exp(m_r - m),  am = min { am_r : m_r = m }

(the smallest id among the pieces holding the maximum is the first argmax of the whole row,
whatever the rank order). Every rank then holds the same lse = m + log s and the same loss,
and writes its slice of the gradient from its own logits: nothing crosses the wire in the
backward. The argmax ids travel as the bit patterns of int32 inside the fp32 message (an
all-gather moves bytes, so they are exact for any V < 2**31). Only a few floats per token
are sent, never logits.

Validation (on by default, ``fusedce.set_validation``) adds one small all-gather of an int64
header per rank (N, vocab_start, V_local, operation, an options fingerprint, a local-error
flag, the target range, checksums of the targets and class weights). Every rank checks the
same gathered table, so every rank raises the same exception for shards that do not tile
[0, V), ranks that disagree on N, the operation, its options, the weights or the targets,
and targets outside [0, V); a rank whose own arguments were rejected sends its message to
the others (a second collective, on that error path only).
With validation off the forward makes exactly one collective (plus, once per layout, a
cached all-gather of (vocab_start, V_local) when the global V is needed and cannot be
inferred) and never synchronises with the host, so it can be captured in a CUDA graph.

DTensor logits sharded on their last dimension (``Shard(-1)`` on one mesh dimension; other
mesh dimensions may shard other dims or replicate) are unpacked to the local shard, the
mesh dimension's process group and the shard's offset (``torch.chunk`` layout: ceil(V / n)
columns per rank, the tail short). The results are plain tensors (every TP rank holds the
same values); gradients flow back into the DTensor with its placements.
"""

from __future__ import annotations

import inspect
import math
import operator
import weakref
import zlib
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from . import spec
from .spec import InputError, RowStats

# operation codes carried by the validation header: ranks must run the same collective
OP_CROSS_ENTROPY = 1
OP_CROSS_ENTROPY_SMOOTHED = 2  # one more statistics field (sum w*z) in the message
OP_ENTROPY = 3
_OP_NAMES = {OP_CROSS_ENTROPY: "cross_entropy/logprobs",
             OP_CROSS_ENTROPY_SMOOTHED: "cross_entropy with label_smoothing",
             OP_ENTROPY: "entropy"}

# ---------------------------------------------------------------------------- comm helpers


def comm_device(group, device: Optional[torch.device] = None) -> torch.device:
    """The device tensors must live on to be sent over ``group``.

    Gloo (and MPI) groups take CPU tensors; NCCL takes CUDA tensors; a group with one
    backend per device type ("cpu:gloo,cuda:nccl") takes ``device`` as it is.
    """
    backend = str(dist.get_backend(group)).lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if device is not None and (device.type != "cpu" or "gloo" in backend):
        return device
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


def _all_gather_flat(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[world, *x.shape]: every rank's ``x`` (same shape and dtype on every rank)."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    # the concatenated form is the one both NCCL and Gloo accept (Gloo rejects the stacked
    # form); all_gather_single supersedes all_gather_into_tensor from torch 2.13 on
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        gather(out, x, group=group)
    except (RuntimeError, NotImplementedError):
        # a backend without the single-tensor collective: the list form (raised before any
        # communication, identically on every rank, so the ranks stay in step)
        parts = list(out.chunk(world, dim=0))
        dist.all_gather(parts, x, group=group)
    return out.view((world,) + tuple(x.shape))


def gather_on_comm_device(x: torch.Tensor, group, world: int) -> torch.Tensor:
    dev = comm_device(group, x.device)
    out = _all_gather_flat(x.to(dev), group, world)
    return out.to(x.device)


# ---------------------------------------------------------------------------- statistics


def allgather_stats(stats: RowStats, group, *, need_sz: bool = True) -> RowStats:
    """Combine the statistics of every rank's vocabulary piece (one all-gather).

    Args:
        stats: this rank's RowStats, fields [N] (am: global column ids). With ``sez`` set
            (entropy) only m, s and sez are exchanged; otherwise m, s, zt, am and, with
            ``need_sz``, sz.
        group: the process group whose ranks' shards tile the vocabulary (any rank order).
        need_sz: exchange sum_j w_j z_j (label smoothing needs it).
    Returns:
        The RowStats of the whole vocabulary, identical on every rank (fields that were
        not exchanged are zeros).
    """
    world = dist.get_world_size(group)
    if world == 1:
        return stats
    out = gather_packed_stats(stats, group, need_sz=need_sz)  # [world, F, N]
    m_all, s_all = out[:, 0], out[:, 1]
    zeros = torch.zeros_like(m_all)
    if stats.sez is not None:
        am_all = torch.zeros(m_all.shape, dtype=torch.int64, device=m_all.device)
        return spec.combine_stacked(m_all, s_all, zeros, zeros, am_all, out[:, 2])
    am_all = out[:, 3].contiguous().view(torch.int32).long()
    sz_all = out[:, 4] if need_sz else zeros
    return spec.combine_stacked(m_all, s_all, out[:, 2], sz_all, am_all)


def gather_packed_stats(stats: RowStats, group, *, need_sz: bool = True) -> torch.Tensor:
    """Every rank's statistics, packed, through one all-gather: [world, F, N] fp32 with the
    fields (m, s, sez) for entropy (``stats.sez`` set), else (m, s, z_t, argmax as int32 bit
    patterns, [sz if need_sz]). The fold is :func:`allgather_stats`' (or a kernel's)."""
    world = dist.get_world_size(group)
    if stats.sez is not None:
        fields = [stats.m, stats.s, stats.sez]
    else:
        # int32 bit patterns inside fp32 words: a copy keeps every id exact
        am_bits = stats.am.to(torch.int32).view(torch.float32)
        fields = [stats.m, stats.s, stats.zt, am_bits]
        if need_sz:
            fields.append(stats.sz)
    packed = torch.stack([f.float() if f.dtype != torch.float32 else f for f in fields])
    return gather_on_comm_device(packed, group, world).contiguous()


# ---------------------------------------------------------------------------- DTensor


class Unpacked(NamedTuple):
    """Plain-tensor view of possibly-DTensor inputs (see :func:`unpack_dtensor`)."""

    logits: Any
    target: Any
    weight: Any
    group: Any
    vocab_start: Optional[int]
    vocab_size: Optional[int]  # the global V when the DTensor says it, else None


def dtensor_types():
    """(DTensor, Replicate, Shard), or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor, Replicate, Shard


def chunk_range(vocab_size: int, index: int, parts: int):
    """(start, length) of part ``index`` of ``vocab_size`` columns split like torch.chunk."""
    size = -(-vocab_size // parts)
    start = min(index * size, vocab_size)
    return start, max(0, min(size, vocab_size - start))


class _LocalShard(torch.autograd.Function):
    """DTensor -> its local tensor, whose gradient returns as a DTensor with the input's
    placements, global shape and stride.

    DTensor.to_local() infers the gradient's global shape from the local one (local x mesh
    size), which is wrong for uneven torch.chunk shards (V = 25 over 2 ranks); torch 2.11 then
    hands back a replicated full-vocabulary gradient. Passing shape and stride explicitly
    keeps the gradient sharded like the logits.
    """

    @staticmethod
    def forward(ctx, dt):
        ctx.meta = (dt.device_mesh, tuple(dt.placements), tuple(dt.shape), tuple(dt.stride()))
        local = dt.to_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.meta
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


def unpack_dtensor(logits, group, vocab_start=None, target=None, weight=None) -> Unpacked:
    """Plain tensors, the vocab group and this shard's offset from DTensor inputs.

    Args:
        logits: a tensor, or a DTensor [..., V] with ``Shard(last dim)`` on exactly one mesh
            dimension (the vocabulary group) and Replicate / Shard(other dim) elsewhere.
        group: the caller's tp_group (None, or the same ranks as that mesh dimension).
        vocab_start: the caller's vocab_start (None, or the DTensor's own offset).
        target, weight: DTensors are replaced by their local tensors (target: the rows of
            this rank; weight: the full [V] vector, so it must be replicated).
    Returns:
        Unpacked(logits, target, weight, group, vocab_start, vocab_size); for plain logits
        the arguments come back unchanged with vocab_size None.
    """
    types = dtensor_types()
    if types is None:
        return Unpacked(logits, target, weight, group, vocab_start, None)
    DTensor, Replicate, Shard = types
    if isinstance(target, DTensor):
        target = target.to_local()
    if isinstance(weight, DTensor):
        if not all(isinstance(p, (Replicate, Shard)) for p in weight.placements):
            raise ValueError(f"weight must be the whole [V] vector on every rank or sharded "
                             f"like the logits; got a DTensor with placements "
                             f"{weight.placements}")
        # replicated: the whole vector; sharded: this rank's slice, shaped like its
        # shard of the logits (DTensor cuts both into the same chunks)
        weight = weight.to_local()
    if not isinstance(logits, DTensor):
        return Unpacked(logits, target, weight, group, vocab_start, None)

    last = logits.dim() - 1
    vocab_dims = []
    for i, p in enumerate(logits.placements):
        if isinstance(p, Shard) and p.dim in (-1, last):
            vocab_dims.append(i)
        elif not (isinstance(p, Replicate) or isinstance(p, Shard)):
            raise ValueError(f"DTensor logits have placement {p} on mesh dim {i}; fusedce takes "
                             "Shard(-1) (vocabulary) with Replicate or Shard(other dim) elsewhere")
    if len(vocab_dims) != 1:
        raise ValueError("DTensor logits must be sharded on their last (vocabulary) dimension "
                         f"over exactly one mesh dimension, got placements {logits.placements}")
    mesh = logits.device_mesh
    mdim = vocab_dims[0]
    mesh_group = mesh.get_group(mdim) if mesh.ndim > 1 else mesh.get_group()
    if group is not None and group is not mesh_group:
        if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(mesh_group):
            raise ValueError("tp_group holds other ranks than the DTensor's vocabulary mesh "
                             "dimension; leave tp_group=None for DTensor logits")
    V = int(logits.shape[-1])
    n = mesh.size(mdim)
    coord = mesh.get_local_rank(mdim) if mesh.ndim > 1 else mesh.get_local_rank()
    start, length = chunk_range(V, coord, n)
    local = _LocalShard.apply(logits)
    if local.shape[-1] != length:
        raise ValueError(f"the DTensor's local shard has {local.shape[-1]} columns, expected "
                         f"{length} (torch.chunk layout of {V} over {n}); uneven custom "
                         "layouts are not supported, pass the local tensor with vocab_start")
    if vocab_start is not None and int(vocab_start) != start:
        raise ValueError(f"vocab_start={vocab_start} disagrees with the DTensor's shard offset "
                         f"{start}; leave vocab_start=None for DTensor logits")
    return Unpacked(local, target, weight, mesh_group, start, V)


# ---------------------------------------------------------------------------- layout

# group -> {(vocab_start, V_local): V}; weak so that destroyed groups drop their entries
_LAYOUT_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_LAYOUT_CACHE_STRONG: dict = {}  # groups that cannot be weakly referenced


def _cache_for(group) -> dict:
    try:
        return _LAYOUT_CACHE.setdefault(group, {})
    except TypeError:
        return _LAYOUT_CACHE_STRONG.setdefault(id(group), {})


def clear_layout_cache() -> None:
    """Forget every cached (vocab_start, V_local) -> V layout (call it on every rank)."""
    _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE_STRONG.clear()


def _tile(pieces, given: bool):
    """Global V from [(start, length)] per rank, or a ValueError naming the defect."""
    order = sorted(range(len(pieces)), key=lambda r: (pieces[r][0], pieces[r][1]))
    expect = 0
    for r in order:
        st, n = pieces[r]
        if st != expect:
            what = "gap" if st > expect else "overlap"
            hint = "" if given else (" (uneven shards need vocab_start on every rank)"
                                     if len({p[1] for p in pieces}) > 1 else "")
            raise ValueError(f"vocabulary shards do not tile the vocabulary: {what} at column "
                             f"{min(st, expect)}; (vocab_start, V_local) per rank: "
                             f"{[tuple(p) for p in pieces]}{hint}")
        expect += n
    return expect


def resolve_layout(group, v_local: int, vocab_start, validate: bool = False,
                   vocab_size: Optional[int] = None, need_vocab_size: bool = True):
    """(vocab_start, global V) of this rank's shard.

    With ``validate`` every rank all-gathers (vocab_start, V_local) on every call and the
    shards are checked to tile [0, V) (the same ValueError on every rank): a layout that
    changed on some ranks only is then an error, not a collective mismatch.

    Without it: without ``vocab_start`` the shards are equal (rank r holds [r*V_local,
    (r+1)*V_local)): no communication. With it, the global V is ``vocab_size`` when the
    caller knows it (a DTensor's shape, the length of the class-weight vector); otherwise,
    when ``need_vocab_size``, one all-gather of (vocab_start, V_local) per layout, cached
    per group, gives V and checks that the shards tile [0, V). Every rank must then present
    the same layout as in earlier calls or call :func:`clear_layout_cache` (a rank that finds
    its key cached skips the gather). When V is not needed (it only enters the loss through
    label_smoothing / V) ``vocab_start + V_local`` stands in for it.

    Args:
        group: the vocabulary process group.
        v_local: columns held by this rank.
        vocab_start: first global column of this rank (None: rank * v_local).
        validate: gather and check the layout on every call (see above).
        vocab_size: the global V when known without communication.
        need_vocab_size: whether the caller needs the exact global V.
    Returns:
        (vocab_start, V) as Python ints.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if validate:
        start = rank * int(v_local) if vocab_start is None else int(vocab_start)
        mine = torch.tensor([start, int(v_local)], dtype=torch.int64, device=comm_device(group))
        pieces = _all_gather_flat(mine, group, world).view(world, 2).tolist()
        V = _tile(pieces, vocab_start is not None)
        if vocab_size is not None and int(vocab_size) != V:
            raise ValueError(f"the shards tile [0, {V}) but the vocabulary has {vocab_size} "
                             f"columns; (vocab_start, V_local) per rank: "
                             f"{[tuple(p) for p in pieces]}")
        if vocab_start is not None:
            _cache_for(group)[(start, int(v_local))] = V
        return start, V
    if vocab_start is None:
        return rank * int(v_local), world * int(v_local)
    start = int(vocab_start)
    if vocab_size is not None:
        return start, int(vocab_size)
    cache = _cache_for(group)
    key = (start, int(v_local))
    if key in cache:
        return start, cache[key]
    if not need_vocab_size:
        return start, start + int(v_local)
    if torch.compiler.is_compiling():
        # the gathered layout is read on the host: a graph break (run eagerly), or under
        # fullgraph=True an error that says what to do
        _graph_break((
            "fusedce: uneven vocabulary shards (vocab_start given) whose global V is needed "
            "(label smoothing, the linear loss's chunks) and not yet known: run the call "
            "once eagerly with this layout (it is cached per group), or compile without "
            "fullgraph=True"))
    cache[key] = _gather_layout(group, world, start, int(v_local))
    return start, cache[key]


def _graph_break(msg: str) -> None:
    # (the message argument is recent in torch)
    if "msg" in inspect.signature(torch._dynamo.graph_break).parameters:
        torch._dynamo.graph_break(msg=msg)
    else:  # pragma: no cover - older torch
        torch._dynamo.graph_break()


def _gather_layout(group, world: int, start: int, v_local: int) -> int:
    """The global V of shards (vocab_start, V_local) gathered from every rank and checked
    to tile [0, V)."""
    mine = torch.tensor([start, v_local], dtype=torch.int64, device=comm_device(group))
    return _tile(_all_gather_flat(mine, group, world).view(world, 2).tolist(), True)


# ---------------------------------------------------------------------------- validation

# int64 header per rank; positions of its fields
(_H_ERR, _H_N, _H_START, _H_GIVEN, _H_VLOCAL, _H_OP, _H_OPTS, _H_WLEN, _H_WCHECK, _H_VHINT,
 _H_NVALID, _H_TMIN, _H_TMIN_POS, _H_TMAX, _H_TMAX_POS, _H_TCHECK, _H_XCHECK) = range(17)
_H_LEN = 17


def _target_summary(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 [6]: (#valid, min, argmin, max, argmax, checksum) of the non-ignored targets."""
    t = target.reshape(-1).long()
    if t.numel() == 0:
        return torch.zeros(6, dtype=torch.int64, device=t.device)
    valid = t != ignore_index
    big = torch.iinfo(torch.int64).max
    lo = torch.where(valid, t, torch.full_like(t, big))
    hi = torch.where(valid, t, torch.full_like(t, -big))
    return torch.stack([valid.sum(), lo.min(), lo.argmin(), hi.max(), hi.argmax(),
                        _checksum(t)])


def _checksum(v: torch.Tensor) -> torch.Tensor:
    """Position-weighted int64 sum of ``v`` (ints, or the bit patterns of fp32 values)."""
    v = v.reshape(-1)
    if v.is_floating_point():
        v = v.float().contiguous().view(torch.int32)
    v = v.long()
    pos = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.int64)
    # integer wrap-around is associative, so every device and order gives the same sum
    return (v * (2 * pos + 1) + pos).sum()


def _values_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """int64 0-d fingerprint of a floating tensor's values: the position-weighted checksum
    of its fp64 row and column sums over the last dimension (two reductions, no copy of
    ``x``; equal tensors give equal fingerprints on every rank)."""
    x = x.detach()
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)
    sums = torch.cat([x2.sum(dim=1, dtype=torch.float64), x2.sum(dim=0, dtype=torch.float64)])
    return _checksum(sums.view(torch.int64))


def options_fingerprint(*options) -> int:
    """A process-independent 62-bit fingerprint of loss options (for the validation header)."""
    return zlib.crc32(repr(options).encode()) | (len(repr(options)) << 32)


def check_tp(group, *, op: int, v_local: int, vocab_start, n_rows: int,
             target: Optional[torch.Tensor], ignore_index: int,
             weight: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
             options: int = 0, local_error: Optional[BaseException] = None,
             device: Optional[torch.device] = None, weight_sharded: bool = False,
             replicated: Optional[torch.Tensor] = None, replicated_what: str = ""):
    """Validate a vocab-parallel call on every rank at once; return (vocab_start, V).

    One all-gather of an int64 header per rank; every rank runs the same checks on the
    gathered table and so raises the same exception: a rank's own argument error
    (``local_error``, whose message the others receive), ranks disagreeing on N, on the
    operation, its options, the class weights or the targets, vocab_start given on some
    ranks only, shards that do not tile [0, V), a class-weight length other than V, targets
    outside [0, V). Entropy needs no layout: without vocab_start its shards are not checked.

    Args:
        group: the vocabulary process group.
        op: OP_CROSS_ENTROPY, OP_CROSS_ENTROPY_SMOOTHED or OP_ENTROPY.
        v_local: columns held by this rank.
        vocab_start: this rank's first column, or None (rank * V_local).
        n_rows: number of rows N (tokens).
        target: [N] global ids, or None (entropy).
        ignore_index: target value that marks ignored rows.
        weight: the class-weight vector [V], or None; with ``weight_sharded`` this rank's
            slice of it, [V_local] (every rank must then pass its slice).
        vocab_size: the global V when known (DTensor), else None.
        options: :func:`options_fingerprint` of the loss options (must agree on all ranks).
        local_error: an exception already raised by this rank's own argument checks.
        device: device for the header (the comm device of ``group`` by default).
        replicated: a floating tensor every rank must hold with the same values (its
            fingerprint is compared); ``replicated_what`` ends the error message if not.
    Returns:
        (vocab_start, V) as Python ints; the layout is cached for :func:`resolve_layout`.
    Raises:
        The same TypeError / ValueError on every rank of ``group``.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = comm_device(group, device)
    head = _header(rank, op=op, v_local=v_local, vocab_start=vocab_start, n_rows=n_rows,
                   target=target, ignore_index=ignore_index, weight=weight,
                   vocab_size=vocab_size, options=options, local_error=local_error, dev=dev,
                   weight_sharded=weight_sharded, replicated=replicated)
    rows = _all_gather_flat(head, group, world).view(world, _H_LEN).tolist()
    _raise_local_errors(rows, group, world, rank, local_error)
    given = vocab_start is not None
    _check_agreement(rows, op)
    V = _check_layout(rows, op, given)
    _check_weights(rows, V)
    _check_targets(rows, V, ignore_index)
    _agree(rows, _H_XCHECK, replicated_what or "a tensor every rank must hold with the same values")
    start = int(rows[rank][_H_START])
    if op != OP_ENTROPY or given:
        _cache_for(group)[(start, int(v_local))] = V
    return start, V


def _header(rank, *, op, v_local, vocab_start, n_rows, target, ignore_index, weight, vocab_size,
            options, local_error, dev, weight_sharded, replicated) -> torch.Tensor:
    """This rank's int64 validation header (see the _H_ fields)."""
    head = torch.full((_H_LEN,), -1, dtype=torch.int64)
    given = vocab_start is not None
    if local_error is None:
        head[_H_ERR] = 0
        head[_H_N] = int(n_rows)
        head[_H_GIVEN] = int(given)
        head[_H_VLOCAL] = int(v_local)
        head[_H_START] = int(vocab_start) if given else rank * int(v_local)
        head[_H_OP] = int(op)
        head[_H_OPTS] = int(options)
        head[_H_WLEN] = -1 if weight is None else (-2 if weight_sharded
                                                     else int(weight.shape[0]))
        head[_H_VHINT] = -1 if vocab_size is None else int(vocab_size)
    else:
        head[_H_ERR] = 1
    head = head.to(dev)
    if local_error is None and weight is not None and not weight_sharded:
        head[_H_WCHECK] = _checksum(weight.to(dev))
    if local_error is None and target is not None:
        head[_H_NVALID:_H_TCHECK + 1] = _target_summary(target.to(dev), ignore_index)
    else:
        head[_H_NVALID:_H_TCHECK + 1] = 0
    head[_H_XCHECK] = (_values_fingerprint(replicated).to(dev)
                       if local_error is None and replicated is not None else 0)
    return head


def _raise_local_errors(rows, group, world: int, rank: int, local_error) -> None:
    """Every rank raises the first rank's own argument error (its message is gathered)."""
    if not any(r[_H_ERR] for r in rows):
        return
    mine = None if local_error is None else (type(local_error).__name__, str(local_error))
    msgs = [None] * world
    dist.all_gather_object(msgs, mine, group=group)
    first = next(r for r in range(world) if msgs[r] is not None)
    kind, text = msgs[first]
    exc_type = {"TypeError": TypeError, "InputError": InputError}.get(kind, ValueError)
    if local_error is not None and first == rank:
        raise local_error
    raise exc_type(f"tp rank {first} rejected its arguments: {text}")


def _per_rank(rows, field) -> dict:
    return {r: row[field] for r, row in enumerate(rows)}


def _agree(rows, field, what: str) -> dict:
    vals = _per_rank(rows, field)
    if len(set(vals.values())) > 1:
        raise ValueError(f"the ranks of tp_group disagree on {what}")
    return vals


def _check_agreement(rows, op: int) -> None:
    """The same rows, operation, options and vocab_start convention on every rank."""
    ns = _per_rank(rows, _H_N)
    if len(set(ns.values())) > 1:
        raise ValueError(f"the ranks of tp_group disagree on the number of rows (tokens): "
                         f"{ns} (rank: N); every rank must see the same rows")
    ops = _per_rank(rows, _H_OP)
    if len(set(ops.values())) > 1:
        raise ValueError("the ranks of tp_group called different operations: "
                         f"{ {r: _OP_NAMES.get(o, o) for r, o in ops.items()} }")
    _agree(rows, _H_OPTS, "the loss options (ignore_index, reduction, label_smoothing, z_loss, "
                          "softcap, logit_scale, normalizer, flags), the backend or the logits' "
                          "dtype")
    givens = _per_rank(rows, _H_GIVEN)
    if len(set(givens.values())) > 1:
        raise ValueError("vocab_start was given on some ranks of tp_group and not on others: "
                         f"{givens} (rank: given)")


def _check_layout(rows, op: int, given: bool) -> int:
    """The global V of the shards, which must tile [0, V) (entropy without vocab_start is
    blind to the column order), and agree with a DTensor's V."""
    pieces = [(row[_H_START], row[_H_VLOCAL]) for row in rows]
    if op == OP_ENTROPY and not given:
        V = sum(n for _, n in pieces)
    else:
        V = _tile(pieces, given)
    hints = {h for h in _per_rank(rows, _H_VHINT).values() if h >= 0}
    if hints and hints != {V}:
        raise ValueError(f"the shards tile {V} columns but the DTensor says V = {hints}")
    return V


def _check_weights(rows, V: int) -> None:
    """Class weights in one form on every rank: each rank's slice, or the same [V] vector."""
    wl = _per_rank(rows, _H_WLEN)
    if any(w == -2 for w in wl.values()):
        if any(w != -2 for w in wl.values()):
            raise ValueError("class weights must come in one form on every rank of tp_group: "
                             f"each rank's [V_local] slice, or the whole [{V}] vector; per "
                             f"rank (-2: a slice, -1: none, else a length): {wl}")
    elif any(w != V for w in wl.values()) and any(w >= 0 for w in wl.values()):
        raise ValueError(f"weight must be the whole class-weight vector of shape ({V},) (or "
                         f"each rank's slice, shaped like its shard's columns) on every rank "
                         f"of tp_group; lengths per rank (-1: none): {wl}")
    else:
        _agree(rows, _H_WCHECK, "the class weights (every rank must pass the same [V] vector)")


def _check_targets(rows, V: int, ignore_index: int) -> None:
    """Targets in [0, V) or ignore_index on every rank, and the same targets everywhere."""
    for r, row in enumerate(rows):
        if row[_H_NVALID] == 0:
            continue
        bad = None
        if row[_H_TMIN] < 0:
            bad = (row[_H_TMIN], row[_H_TMIN_POS])
        elif row[_H_TMAX] >= V:
            bad = (row[_H_TMAX], row[_H_TMAX_POS])
        if bad is not None:
            raise ValueError(f"target holds {bad[0]} at flat position {bad[1]} (tp rank {r}): "
                             f"class ids must lie in [0, {V}) or equal "
                             f"ignore_index={ignore_index}")
    _agree(rows, _H_TCHECK, "the targets: every rank must pass the same global class ids for "
                            "the same rows")


def shard_start(group, v_local: int) -> int:
    """This rank's first column when the ranks of ``group`` hold consecutive shards in rank
    order, whatever their widths: the sum of the lower ranks' V_local (one all-gather of an
    int64 per rank). For callers that are given no vocab_start and need none for their
    result, yet go through the layout of a call that does (a log-softmax over the group)."""
    world = dist.get_world_size(group)
    if world == 1:
        return 0
    mine = torch.tensor([int(v_local)], dtype=torch.int64, device=comm_device(group))
    widths = _all_gather_flat(mine, group, world).reshape(-1).tolist()
    return int(sum(widths[:dist.get_rank(group)]))


def checked_vocab_start(vocab_start) -> Optional[int]:
    """``vocab_start`` as an int (None stays None), or the TypeError / ValueError it earns."""
    if vocab_start is None:
        return None
    if isinstance(vocab_start, bool):
        raise InputError(f"vocab_start must be an int or None, got {vocab_start!r}")
    try:
        vocab_start = operator.index(vocab_start)
    except TypeError:
        raise InputError(f"vocab_start must be an int or None, got {vocab_start!r}") from None
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return vocab_start


def tp_call_layout(group, *, op: int, logits: torch.Tensor, vocab_start, vocab_size,
                   target: Optional[torch.Tensor], ignore_index: int,
                   weight: Optional[torch.Tensor], local_checks: Callable[[], None],
                   validate: bool, need_vocab_size: bool, options: int = 0,
                   weight_sharded: bool = False):
    """(vocab_start, V) for one vocab-parallel call, validated on every rank when asked.

    ``local_checks`` runs this rank's own argument checks (shapes, dtypes, devices); with
    validation its exception reaches every rank through :func:`check_tp`, without it it is
    raised here, on this rank only.
    """
    if not validate:
        local_checks()
        known = vocab_size
        if known is None and weight is not None and not weight_sharded:
            known = int(weight.shape[0])
        start, V = resolve_layout(group, logits.shape[-1], vocab_start, vocab_size=known,
                                  need_vocab_size=need_vocab_size or weight_sharded)
        return start, V
    err = None
    try:
        local_checks()
        vocab_start = checked_vocab_start(vocab_start)
    except (TypeError, ValueError) as exc:
        err = exc
    if err is not None:
        return check_tp(group, op=op, v_local=0, vocab_start=None, n_rows=0, target=None,
                        ignore_index=ignore_index, local_error=err, device=None)
    n_rows = math.prod(logits.shape[:-1])
    return check_tp(group, op=op, v_local=logits.shape[-1], vocab_start=vocab_start,
                    n_rows=n_rows, target=target, ignore_index=ignore_index, weight=weight,
                    vocab_size=vocab_size, options=options, device=logits.device,
                    weight_sharded=weight_sharded)


def weight_is_sharded(weight, v_local: int, group) -> bool:
    """Whether class weights given under TP are this rank's slice (shaped like its shard's
    columns, [V_local]) rather than the whole [V] vector: a 1-D tensor of V_local entries in
    a group of more than one rank (where V > V_local)."""
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1
            and int(weight.shape[0]) == int(v_local) and dist.get_world_size(group) > 1)


def gather_weight(shard: torch.Tensor, group, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """The whole [V] class-weight vector from every rank's slice [V_local] (columns
    [vocab_start, vocab_start + V_local)): one SUM all-reduce of zero-padded fp32 vectors,
    exact (each entry is one slice's value plus zeros), in the slice's dtype."""
    dev = comm_device(group, shard.device)
    full = torch.zeros(int(vocab_size), dtype=torch.float32, device=dev)
    full[vocab_start:vocab_start + shard.shape[0]] = shard.to(device=dev, dtype=torch.float32)
    dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    return full.to(device=shard.device, dtype=shard.dtype)
