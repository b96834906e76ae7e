"""Launch configurations of the kernels: fixed tables measured on an H200, and the choice of
configuration and grid for a call. Only an explicit override changes them (benchmarks and
tests use it); nothing autotunes behind the caller's back."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import launch
from .common import INTERPRET


@dataclass(frozen=True)
class RowsConfig:
    """Launch parameters of the fused rows kernels (two passes over a row, the second from L2).

    block: columns per chunk; num_warps: warps per program; per_sm: programs per SM (the
    grid is per_sm x SMs, persistent over rows); reverse: pass 2 walks the row backwards;
    cg_stores: pass 2 stores go to L2 only (.cg) instead of evict_first; persistent: (no
    split) a grid of per_sm x SMs programs looping over rows, else one program per row;
    split: segments per row, each taken by one of ``split`` cooperating programs that
    exchange their statistics (with a gradient, not vocabulary parallel: the rows in flight,
    and so the L2 footprint of the second read, shrink split-fold); peer_split: (an override)
    vocabulary parallel with the in-kernel exchange, shard rows are split in ``split`` parts
    too (the table decides by width: _peer_config); balance: (persistent, not resident) the
    fewest programs that need as many rounds over the rows as per_sm x SMs would (_balanced).
    """

    block: int
    num_warps: int
    per_sm: int
    reverse: bool = True
    cg_stores: bool = False
    persistent: bool = True
    split: int = 1
    peer_split: bool = False
    balance: bool = False


# At most 8 cooperating programs per row, in the table and at launch: the poll of the
# group's records is one [parts, 8] tile (fused._fold_group), which stays small.
MAX_SPLIT = 8


@dataclass(frozen=True)
class StatsConfig:
    """Launch parameters of the statistics kernel: BLOCK columns per chunk, warps, prefetch."""

    block: int
    num_warps: int
    prefetch: bool = False


_OVERRIDE: dict = {}


def set_override(**kw) -> None:
    """Override table entries: fused=RowsConfig, stats=StatsConfig, grad_block=int (or None)."""
    for k, v in kw.items():
        if v is None:
            _OVERRIDE.pop(k, None)
        else:
            _OVERRIDE[k] = v


def fused_config(V: int, elem_size: int, in_place: bool = False) -> RowsConfig:
    """The fused kernels' parameters by row bytes (V x element size); ``in_place``: the
    gradient is written over the logits."""
    if "fused" in _OVERRIDE:
        return _OVERRIDE["fused"]
    if INTERPRET:
        # small chunks: several per row, so that the chunk loops, prefetch and tails run
        return RowsConfig(block=64, num_warps=1, per_sm=1)
    per_chunk = 8192 // elem_size  # 8 KB of columns per 8 warps
    row = V * elem_size
    if row <= 96 * 1024:
        # rows in flight fit L2; backwards, pass 2 starts in L1; in place, no idle last round
        return RowsConfig(block=per_chunk, num_warps=8, per_sm=4, balance=in_place)
    if 192 * 1024 < row <= 256 * 1024:
        # 4 segments of <= 64 KB, each taken as a short row is
        return RowsConfig(block=per_chunk, num_warps=8, per_sm=4, reverse=False, split=4)
    if row <= 384 * 1024:
        # whole rows: fewer, wider programs; the part read last is still in L2 for pass 2
        return _long_rows(elem_size)
    # 128 KB segments; in place, pass 2 backwards and stores around L1 (.cg)
    return RowsConfig(block=2 * per_chunk, num_warps=16, per_sm=2, reverse=in_place,
                      cg_stores=in_place, split=min(MAX_SPLIT, -(-row // (128 * 1024))))


def _long_rows(elem_size: int) -> RowsConfig:
    """Long rows without cooperating programs (also vocabulary-parallel shards): 16 KB chunks,
    2 programs of 16 warps per SM, pass 2 backwards (the part read last is still in L2)."""
    return RowsConfig(block=2 * (8192 // elem_size), num_warps=16, per_sm=2)


def _peer_config(vocab_size: int, world: int, elem_size: int) -> Optional[RowsConfig]:
    """The configuration of a vocabulary-parallel call with the in-kernel exchange whose shard
    rows are split (the same on every rank: chosen from the common shard width
    ceil(V / world)), or None; an override marked peer_split is taken as it is. world x
    parts <= 16 (the poll's tile)."""
    if "fused" in _OVERRIDE:
        cfg = _OVERRIDE["fused"]
        if not (cfg.split > 1 and cfg.peer_split):
            return None
        cfg = replace(cfg, split=min(cfg.split, MAX_SPLIT))
    elif 192 * 1024 < -(-int(vocab_size) // max(1, int(world))) * elem_size <= 256 * 1024:
        # shards of the width where unsharded rows split: 2 parts of 16-warp programs
        cfg = replace(_long_rows(elem_size), reverse=False, split=2, peer_split=True)
    else:
        return None
    return cfg if world * cfg.split <= 16 else None


def peer_parts(vocab_size: int, world: int, elem_size: int) -> int:
    """Parts per shard row of a vocabulary-parallel call with the in-kernel exchange (the
    same on every rank; see _peer_config): the records per rank its exchange buffer holds."""
    cfg = _peer_config(vocab_size, world, elem_size)
    return 1 if cfg is None else cfg.split


def stats_config(V: int, elem_size: int) -> StatsConfig:
    """The statistics kernel's parameters."""
    if "stats" in _OVERRIDE:
        return _OVERRIDE["stats"]
    # 4096-column chunks, 8 warps, the next chunk prefetched: within 1% of the best measured
    block = min(4096, launch.pow2(max(V, 16)))
    return StatsConfig(block=block, num_warps=max(1, min(8, block // 512)), prefetch=True)


def grad_block(V: int, elem_size: int) -> int:
    """Columns per program of the gradient kernel."""
    b = _OVERRIDE.get("grad_block") or (4096 if elem_size <= 2 else 2048)
    return min(b, launch.pow2(max(V, 16)))


def rows_grid(x3: torch.Tensor, out: Optional[torch.Tensor], softcap, weight,
              need_grad: bool, resident: bool = False, splittable: bool = True,
              traced: Optional[bool] = None, peer_cfg: Optional[RowsConfig] = None):
    """(config, programs, maxnreg) of the fused rows kernels for this call; ``out``: the
    gradient destination (None without one); ``resident``: a persistent grid whose programs
    are all resident at once (they wait on other ranks'); ``splittable``: cooperating
    programs are possible (not vocabulary parallel); ``traced``: the caller's
    launch.is_traced(x3, out), if it has it (one check per call on the hot path);
    ``peer_cfg``: (the in-kernel exchange with a gradient) the split configuration every
    rank takes (_peer_config), or None."""
    B, T, V = launch.dims3(x3)
    if traced is None:
        traced = launch.is_traced(x3, out)
    in_place = need_grad and not traced and out is not None and out.data_ptr() == x3.data_ptr()
    elem = x3.element_size()
    cfg = _call_config(fused_config(V, elem, in_place=in_place), elem, need_grad, resident,
                       splittable, peer_cfg)
    if softcap is not None or weight is not None:
        # more live values per element (z for the softcap chain, class weights): give each
        # program twice the registers rather than spill
        cfg = replace(cfg, per_sm=max(1, cfg.per_sm // 2))
    P = _programs(cfg, B * T, x3.device, resident)
    maxnreg = None
    if cfg.persistent and not INTERPRET and not traced:
        # under torch.compile the launch carries no register cap (it is only a hint for
        # occupancy: programs that wait on others take their places from a ticket)
        maxnreg = _maxnreg(cfg.num_warps, cfg.per_sm)
    return cfg, P, maxnreg


def _call_config(cfg: RowsConfig, elem_size: int, need_grad: bool, resident: bool,
                 splittable: bool, peer_cfg) -> RowsConfig:
    """The table's configuration ``cfg`` for this call's kind (see rows_grid): the split one
    every rank takes, no cooperating programs where they cannot run, a resident grid, or
    one program per row for the statistics alone."""
    if peer_cfg is not None and need_grad:
        cfg = peer_cfg
    elif cfg.split > 1 and (resident or not splittable or not need_grad):
        # the long-row entry without cooperating programs (an override only loses its parts)
        cfg = (replace(cfg, split=1, reverse=True) if "fused" in _OVERRIDE or INTERPRET
               else _long_rows(elem_size))
    if resident:
        return replace(cfg, persistent=True)
    if not need_grad and not INTERPRET and "fused" not in _OVERRIDE:
        # statistics only: no second read, so no L2 budget; one program per row and no
        # register cap lets the hardware keep as many resident as fit
        return RowsConfig(block=8192 // elem_size, num_warps=8, per_sm=1, persistent=False)
    return cfg


def _programs(cfg: RowsConfig, n: int, device, resident: bool) -> int:
    """Programs of the launch for ``n`` rows under ``cfg``."""
    if cfg.split > 1:
        # the cooperating programs: the launcher takes min(rows, P / split) groups of split
        return 3 * cfg.split if INTERPRET else cfg.per_sm * launch.sm_count(device)
    if INTERPRET:
        return min(n, 3)
    if not cfg.persistent:
        return n
    P = min(n, cfg.per_sm * launch.sm_count(device))
    return _balanced(n, P) if cfg.balance and not resident else P


def _balanced(n: int, slots: int) -> int:
    """The fewest programs that take ``n`` rows round-robin in as many rounds as ``slots``
    programs would: N = 16384 rows on 4 x 132 slots -> 512 programs of 32 rows, where 528
    leave 512 of them idle through the 32nd round."""
    if n <= 0 or slots <= 0:
        return max(slots, 0)
    return launch.cdiv(n, launch.cdiv(n, slots))


def _maxnreg(num_warps: int, per_sm: int) -> int:
    # 64K registers per SM shared by per_sm programs of num_warps * 32 threads, in units of 8
    r = 65536 // (per_sm * num_warps * 32)
    return max(24, min(255, (r // 8) * 8))
