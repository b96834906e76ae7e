"""In-kernel exchange of row statistics between the ranks of a vocabulary-parallel group.

Vocabulary-parallel CE needs, before any rank can write its gradient, the row statistics of
every shard: per row the maximum m_r, s_r = sum_j exp(z_j - m_r), the target logit, sum_j
w_j z_j and the argmax, combined as

    m = max_r m_r,   s = sum_r s_r exp(m_r - m),   lse = m + log s.

Exchanged by a collective (one all-gather between a statistics kernel and the gradient
kernel) each shard is read twice from DRAM (6 bytes per element in bf16, 1.5x the floor).
Here the ranks' copies of the fused kernel exchange the statistics themselves, row by row,
through a buffer in symmetric memory (every rank maps every rank's buffer, over NVLink):
pass 1 of a row, its record stored into every rank's buffer, a wait for the other ranks'
records of that row, then pass 2 re-reads the row from L2 (see
:func:`fusedce.triton.fused_tp._publish_row` for the record format and why two parities of
the buffer suffice).

Requirements, checked here; when one fails the caller falls back to the all-gather:
CUDA tensors, a NCCL group, torch's symmetric memory (torch.distributed._symmetric_memory),
eager mode (not while torch.compile traces nor while a CUDA graph is captured: the call's
epoch is a kernel argument), and FUSEDCE_TP_EXCHANGE not set to "nccl" ("symm" makes a
failure to set up an error instead of a fallback). Every rank of the group must make the
same calls in the same order (as with any collective); the kernels of one call wait for
each other, so a rank that never launches its kernel leaves the others spinning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

# the buffer grows to at least this many rows (the allocation is collective: rarely)
_MIN_ROWS = 4096
# epochs cycle through 1 .. 2**30 (0 never matches a zeroed buffer; the cycle length is
# even, so the parity keeps alternating across the wrap)
_EPOCHS = 2**30


def mode() -> str:
    """FUSEDCE_TP_EXCHANGE: "auto" (default), "symm" (required) or "nccl" (never)."""
    m = os.environ.get("FUSEDCE_TP_EXCHANGE", "auto").strip().lower()
    return m if m in ("auto", "symm", "nccl") else "auto"


@dataclass
class PeerExchange:
    """One group's exchange buffer on one device: ``xch`` int64 [2, W x parts, rows, 8]
    (this rank's; a slot per rank, or per rank and part where the kernels split shard rows
    into parts), ``peers`` int64 [W] (every rank's buffer address, rank order)."""

    xch: torch.Tensor
    peers: torch.Tensor
    rank: int
    world: int
    handle: object
    calls: int = 0

    def next_epoch(self) -> int:
        self.calls += 1
        return 1 + (self.calls - 1) % _EPOCHS


_CACHE: dict = {}
_RETIRED: list = []


def _symm():
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return None
    return symm_mem


def _allocate(group, device: torch.device, rows: int, slots_per_rank: int) -> PeerExchange:
    symm_mem = _symm()
    if symm_mem is None:
        raise RuntimeError("torch.distributed._symmetric_memory is not available")
    world = dist.get_world_size(group)
    name = group.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated (a no-op) in newer torch
            enable(name)
    with torch.cuda.device(device):
        xch = symm_mem.empty((2, world * slots_per_rank, rows, 8), dtype=torch.int64,
                             device=device)
        handle = symm_mem.rendezvous(xch, name)
        xch.zero_()
        peers = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
    # no rank may store into a buffer before its owner has zeroed it
    dist.barrier(group=group)
    rank = int(getattr(handle, "rank", dist.get_rank(group)))
    if rank != dist.get_rank(group) or peers.numel() != world:
        raise RuntimeError("symmetric memory ranks do not match the process group's")
    return PeerExchange(xch, peers, rank, world, handle)


def exchange_for(group, device: torch.device, rows: int,
                 parts: Union[int, Callable[[int], int]] = 1) -> Optional[PeerExchange]:
    """The exchange of ``group`` on ``device`` with room for ``rows`` rows of ``parts``
    records per rank (an int, or a function of the group's size: the same on every rank),
    or None when the in-kernel exchange cannot be used for this call (the caller then
    all-gathers)."""
    m = mode()
    if m == "nccl" or device.type != "cuda" or group is None:
        return None
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    if "nccl" not in str(dist.get_backend(group)).lower():
        return None
    key = (group, device.index)
    ex = _CACHE.get(key, False)
    if ex is None:
        return None  # set-up failed before: stay on the all-gather
    world = dist.get_world_size(group)
    per = max(1, int(parts(world) if callable(parts) else parts))
    if ex is not False and ex.xch.shape[2] >= rows and ex.xch.shape[1] >= world * per:
        return ex
    need = max(rows, _MIN_ROWS, 0 if ex is False else ex.xch.shape[2])
    if ex is not False and ex.xch.shape[2] < rows:
        need = max(need, 2 * ex.xch.shape[2])
    if ex is not False:
        per = max(per, ex.xch.shape[1] // world)
    err = None
    try:
        new = _allocate(group, device, need, per)
    except Exception as e:  # noqa: BLE001 - any failure means: use the all-gather
        new, err = None, e
    # every rank must take the same path: agree on success (one tiny all-reduce, once)
    ok = torch.tensor([0 if new is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if int(ok.item()) == 0:
        if m == "symm":
            raise RuntimeError(f"FUSEDCE_TP_EXCHANGE=symm: symmetric memory set-up failed: {err}")
        if err is not None:
            warnings.warn(f"fusedce: in-kernel TP exchange unavailable ({err}); using an "
                          "all-gather of the row statistics", RuntimeWarning, stacklevel=3)
        _CACHE[key] = None
        return None
    if ex is not False:
        new.calls = ex.calls  # keep the epoch sequence (and the parity) going
        _RETIRED.append(ex)  # symmetric memory is freed collectively: keep it mapped
    _CACHE[key] = new
    return new


def clear() -> None:
    """Forget every exchange buffer (e.g. before destroying the process groups)."""
    _CACHE.clear()
    _RETIRED.clear()


__all__ = ["PeerExchange", "exchange_for", "mode", "clear"]
