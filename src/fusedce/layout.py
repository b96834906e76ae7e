"""Row layout of logits without copies.

Logits [..., V] are seen as rows r = b * T + t of a 3-D strided view [B, T, V], so that a
shifted ``logits[:, :-1]`` or a transposed ``[S, B, V]`` tensor needs no copy: row r starts
at offset b * stride_b + t * stride_t and its columns are stride_v apart. Only tensors of
more than three dims whose leading dims cannot be merged into two are copied.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch


def as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of ``x`` [..., V] (a copy only when no such view exists)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    lead = 1
    for d in x.shape[:-2]:
        lead *= d
    if x.numel() == 0:
        return x.new_empty((lead, x.shape[-2], x.shape[-1]))
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        try:
            return x.view(x.shape[0], -1, x.shape[-1])
        except RuntimeError:
            return x.reshape(-1, x.shape[-2], x.shape[-1])


def as_rows2d(x3: torch.Tensor) -> torch.Tensor | None:
    """The [B*T, V] view of a [B, T, V] tensor, or None if none exists without a copy."""
    B, T, V = x3.shape
    if B == 1:
        return x3[0]
    if T == 1:
        return x3[:, 0]
    if x3.stride(0) == T * x3.stride(1):
        # a view, not as_strided: torch.compile cannot functionalise a mutation through an
        # as_strided view chain (an in-place gradient of [B, T, ..., V] logits)
        return x3.view(B * T, V)
    return None


def row_slice(x3: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """A view of flat rows [r0, r1) of ``x3`` [B, T, V].

    The range must be mergeable: inside one b, or whole b's (as :func:`iter_row_chunks`
    yields) unless ``x3`` is 2-D-mergeable.
    """
    flat = as_rows2d(x3)
    if flat is not None:
        return flat[r0:r1]
    T = x3.shape[1]
    b0, t0 = divmod(r0, T)
    b1, t1 = divmod(r1, T)
    if b0 == b1 or (b1 == b0 + 1 and t1 == 0):
        return x3[b0, t0:(t1 if b1 == b0 else T)]
    if t0 != 0 or t1 != 0:
        raise ValueError("row range crosses a batch boundary")
    return x3[b0:b1]


def iter_row_chunks(x3: torch.Tensor, rows: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield (r0, r1, view) covering flat rows [r0, r1) of ``x3`` in about ``rows`` rows.

    ``view`` is a view into ``x3`` (2-D or 3-D); ``view.reshape(-1, V)`` is its rows (a copy
    of at most one chunk when the view is not 2-D-mergeable), and ``view.copy_(...)``
    writes back in place.
    """
    B, T, V = x3.shape
    if B * T == 0:
        return
    flat = as_rows2d(x3)
    if flat is not None:
        n = B * T
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            yield r0, r1, flat[r0:r1]
    elif T >= rows:
        for b in range(B):
            for t0 in range(0, T, rows):
                t1 = min(T, t0 + rows)
                yield b * T + t0, b * T + t1, x3[b, t0:t1]
    else:
        step = max(1, rows // T)
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            yield b0 * T, b1 * T, x3[b0:b1]
