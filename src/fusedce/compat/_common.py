"""Glue shared by the seed-compatible adapters (no loss math lives here).

A seed that is a ``torch.autograd.Function`` (TransformerEngine's CrossEntropyFunction,
NeMo RL's DistributedLogprob) keeps its own ``forward(ctx, ...)`` signature, but its
value and gradient are the core's. The forward runs a public core function ``f`` on a
detached alias ``x'`` of the input (same storage, no copy) under a private autograd
graph kept on ``ctx``; the backward pulls the upstream gradient through that graph:

    forward:   y  = f(x'),           x' = x.detach()
    backward:  dx = (dy/dx')^T g      (torch.autograd.grad through the core's own backward)

so there is exactly one implementation of every value and gradient: the core's.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch

from ..validation import finite as _finite
from ..spec import InputError


def inner_forward(ctx, x: torch.Tensor, need_grad: bool,
                  fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``fn(x)`` through the core; keep its graph for the backward when ``need_grad``.

    The alias and the core's output are saved with ``ctx.save_for_backward``, not as ``ctx``
    attributes: autograd then releases the private graph together with the outer one (a kept
    loss tensor does not pin the core's gradient buffer), and keeps it while the caller
    retains the outer graph, so that a retained graph can be differentiated again
    (``retain_graph=True``, gradcheck), as the seeds' own Functions allow.

    Args:
        ctx: the autograd context of the outer Function.
        x: the outer Function's tensor input.
        need_grad: whether the outer backward will need d fn / d x.
        fn: a core call taking the (aliased) input.
    Returns:
        ``fn(x)``, detached into its own storage (the outer Function re-attaches it; a
        caller's in-place change to it must not look like a change to the saved output).
    """
    ctx.fce_kept = bool(need_grad)
    if not need_grad:
        with torch.no_grad():
            return fn(x.detach())
    alias = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(alias)
    ctx.save_for_backward(alias, out)
    return out.detach().clone()


def inner_backward(ctx, grad: torch.Tensor, what: str) -> Optional[torch.Tensor]:
    """d fn / d x applied to ``grad``, through the graph kept by :func:`inner_forward`."""
    if not getattr(ctx, "fce_kept", False):
        raise RuntimeError(f"{what}: nothing was kept for backward (the forward ran with "
                           "inference_only=True or without an input that requires grad)")
    alias, out = ctx.saved_tensors
    if not out.requires_grad:
        return None
    # retain_graph: the private graph lives exactly as long as the outer one (see above)
    (dx,) = torch.autograd.grad(out, alias, grad, retain_graph=True)
    return dx


def traced_grad(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                start: int, a: float = 0.0, vocab: int = 1,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec's gradient without class weights or z-loss, g (p_j - (1 - a) [j = t] - a / V)
    with p_j = exp(z_j - lse), on this rank's columns [start, start + V_local) of x (its
    dtype); rows outside ``valid`` get exactly 0. What the autograd-Function adapters write
    while torch.compile traces them (it cannot trace their eager backward's autograd.grad).
    """
    dx = g.unsqueeze(-1) * (torch.exp(x.float() - lse.unsqueeze(-1)) - a / vocab)
    local = t.long() - start
    inside = (local >= 0) & (local < x.shape[-1])
    if valid is not None:
        inside = inside & valid
    dx = dx.scatter_add(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1),
                        (-(1.0 - a) * g * inside).unsqueeze(-1))
    if valid is not None:
        # exactly 0 on those rows, whatever their logits hold (NaN, inf)
        dx = torch.where(valid.unsqueeze(-1), dx, 0.0)
    return dx.to(x.dtype)


def local_logits(logits, tp_group):
    """(logits, group) to hand to the core, unwrapping DTensors as NeMo Automodel does.

    A DTensor sharded on its last (vocabulary) dim goes to the core as it is (the core
    takes its local shard, its mesh's group and its exact, possibly uneven, column range)
    unless a different ``tp_group`` was given, in which case its local shard is used with
    that group. Any other DTensor gives its local tensor and ``tp_group`` unchanged. Plain
    tensors pass through.
    """
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - old torch
        return logits, tp_group
    if not isinstance(logits, DTensor):
        return logits, tp_group
    sharded = any(isinstance(p, Shard) and p.dim in (-1, logits.ndim - 1)
                  for p in logits.placements)
    if sharded and logits.device_mesh.ndim == 1:
        mesh_group = logits.device_mesh.get_group()
        if tp_group is None or tp_group is mesh_group:
            return logits, None
    if sharded and tp_group is None:
        tp_group = logits.device_mesh.get_group()
    return logits.to_local(), tp_group


def plain_tensor(x):
    """The local tensor of a DTensor, or ``x`` itself."""
    to_local = getattr(x, "to_local", None)
    return to_local() if callable(to_local) else x


def masked_labels(labels: torch.Tensor, mask: Optional[torch.Tensor],
                  ignore_index: int) -> torch.Tensor:
    """``labels`` with every position where ``mask == 0`` set to ``ignore_index``.

    Out of place: the caller's labels are never written (the originals fill them in place).
    ``mask`` must hold as many elements as ``labels`` (any shape) or broadcast to it.
    """
    if mask is None:
        return labels
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    mask = plain_tensor(mask)
    if mask.device != labels.device:
        mask = mask.to(labels.device)
    if mask.shape != labels.shape and mask.numel() == labels.numel():
        mask = mask.reshape(labels.shape)
    try:
        drop = torch.broadcast_to(mask == 0, labels.shape)
    except RuntimeError as exc:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match labels of shape "
                         f"{tuple(labels.shape)}") from exc
    return labels.masked_fill(drop, ignore_index)


def target_like(target: torch.Tensor, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    """``target`` viewed with the logits' leading shape (a flat target is accepted)."""
    if not isinstance(target, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    lead = logits.shape[:-1]
    if target.shape == lead:
        return target
    if target.numel() == math.prod(lead):
        return target.reshape(lead)
    raise ValueError(f"{name} has shape {tuple(target.shape)} but the logits {tuple(logits.shape)} "
                     f"need one target per row ({math.prod(lead)} in all)")


Count = Union[None, int, float, torch.Tensor]


def divide_by_count(loss_sum_fn: Callable[..., torch.Tensor], count: Count) -> torch.Tensor:
    """``loss_sum_fn(normalizer=...)`` divided by ``count``; a zero count gives a zero loss.

    The division goes into the core as its ``normalizer`` (so the eager backends scale the
    gradient inside the kernel). A zero count gives ``0 * sum``, which keeps the graph, as
    NeMo Automodel does; a tensor count is handled on the device, without a host sync.
    """
    if count is None:
        return loss_sum_fn(normalizer=None)
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError(f"num_label_tokens must be a number or a 1-element tensor, got "
                             f"shape {tuple(count.shape)}")
        n = count.reshape(()).float()
        positive = n > 0
        loss = loss_sum_fn(normalizer=torch.where(positive, n, torch.ones_like(n)))
        return torch.where(positive.to(loss.device), loss, loss * 0.0)
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise InputError(f"num_label_tokens must be a number or a tensor, got {count!r}")
    if count == 0:
        return loss_sum_fn(normalizer=None) * 0.0
    if not (_finite(count) and count > 0):
        raise ValueError(f"num_label_tokens must be >= 0 and finite, got {count!r}")
    return loss_sum_fn(normalizer=float(count))


def check_choice(value, choices: Tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
