"""The target scan (op tr_target_scan): [count, lo, hi] of a call's flat targets in one small
kernel.

count is the number of rows that are not ignored: the mean's denominator, which the fused
loss kernel reads on the device (first, so that the scan's own pointer is the kernel's
denominator pointer: no view op). lo and hi are the smallest and largest of the ids and 0,
ignored rows counting as class 0: the range check reads them on the host and asks lo >= 0
and hi < V (0 lies in every range). One launch replaces the small torch ops these take
otherwise (compare, where, aminmax and stack for the extremes; compare and sum for the
count): host time, which the default call at V = 32000 is bound by on slow hosts.

One program walks the targets; past SCAN_MAX of them the caller uses torch ops instead (a
single program's read of more than a few MB would cost more than the launches it saves).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

# the most targets one program scans (2 MB of int64 ids)
SCAN_MAX = 1 << 18
# ids per step: one program's loop waits on each step's load, so wide steps (16 ids a
# thread at 8 warps) keep a 16384-row call to 4 steps and SCAN_MAX to 64
SCAN_BLOCK = 4096


@triton.jit
def _scan_kernel(t_ptr, n, ignore_index, out_ptr, BLOCK: tl.constexpr):
    """out[0:3] = (count, lo, hi) of the n targets at t_ptr (int32 / int64), as int64.

    t_ptr: flat targets; n: their number (> 0); ignore_index: the ignored id (class 0 in
    lo / hi, not counted); out_ptr: int64 [3]. BLOCK: ids per step.
    """
    offs = tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64)
    cnt = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        # lanes past n read as ignored rows
        t = tl.load(t_ptr + idx, mask=idx < n, other=ignore_index).to(tl.int64)
        ign = t == ignore_index
        v = tl.where(ign, 0, t)
        lo = tl.minimum(lo, v)
        hi = tl.maximum(hi, v)
        cnt += tl.where(ign, 0, 1).to(tl.int64)
    tl.store(out_ptr, tl.sum(cnt, axis=0))
    tl.store(out_ptr + 1, tl.min(lo, axis=0))
    tl.store(out_ptr + 2, tl.max(hi, axis=0))


@launch.op("fusedce::tr_target_scan", mutates_args=())
def tr_target_scan(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 [3]: (count, lo, hi) of the flat contiguous targets (1-D int32 / int64, at
    least one and at most SCAN_MAX of them): the number of rows not ignored, and the
    smallest and largest of the ids and 0, ignored rows counting as class 0."""
    out = torch.empty(3, dtype=torch.int64, device=target.device)
    if launch.skip(target):
        return out
    launch.launcher(_scan_kernel)[(1,)](target, target.numel(), int(ignore_index), out,
                                        BLOCK=SCAN_BLOCK, num_warps=8)
    return out


__all__ = ["tr_target_scan"]
