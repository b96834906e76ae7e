"""Vocabulary parallelism on W ranks against the unsharded fp64 oracle.

Every rank draws the same full logits [B, T, V] and targets, keeps its columns
[start_r, start_r + V_r) and calls fusedce with tp_group; the loss (identical on every
rank) and the rank's slice of the gradient must match

    loss = reduce_rows[ (1 - a) w_t (lse - z_t) + (a / V) sum_j w_j (lse - z_j) + zl lse^2 ]

computed by tests/oracle.py on the full logits, for every option, both backends (Triton
through its interpreter on the CPU, when present), uneven and permuted shards, DTensor
inputs, log-probs and entropy. Bad input must raise the same exception on every rank
(never hang), and the forward must make exactly the collectives the design allows.

All cases of one world size run in one spawn (tests/dist_utils.run_ranks); each pytest item
reads its case's result. FUSEDCE_DIST_BACKEND=nccl runs the same cases on GPUs (rank r on
cuda:r, W GPUs needed); FUSEDCE_TEST_SEED fixes the inputs.
"""

from __future__ import annotations

import importlib.util
import os
import time
import traceback
from dataclasses import dataclass

import pytest
import torch

import fusedce as fce
from dist_utils import default_backend, progress, run_ranks
from oracle import assert_close_normwise, ref_cross_entropy, ref_entropy, ref_logprobs, tol

WORLDS = (2, 3)

# (start, length) per rank; "even" uses vocab_start=None (rank * V_local)
LAYOUTS = {
    2: {"even": [(0, 13), (13, 13)],
        "uneven": [(0, 15), (15, 22)],
        "permuted": [(22, 15), (0, 22)]},
    3: {"even": [(0, 11), (11, 11), (22, 11)],
        "uneven": [(0, 10), (10, 17), (27, 10)],
        "permuted": [(20, 17), (0, 9), (9, 11)]},
}

F32 = tol(torch.float32)


def _triton_available() -> bool:
    try:
        return importlib.util.find_spec("fusedce.triton.backend") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------- case helpers


@dataclass
class Case:
    """What one case sees on one rank."""

    rank: int
    world: int
    device: torch.device
    backend: str
    seed: int
    group: object = None

    def gen(self, salt: int = 0) -> torch.Generator:
        # identical on every rank: the full inputs are the same everywhere
        return torch.Generator().manual_seed(self.seed * 1009 + salt)


def layout(c: Case, name: str):
    pieces = LAYOUTS[c.world][name]
    V = sum(n for _, n in pieces)
    start, n = pieces[c.rank]
    return V, start, n, (None if name == "even" else start)


def inputs(c: Case, V: int, *, B=2, T=5, dtype=torch.float32, ignore_index=-100,
           n_ignored=2, scale=3.0, salt=0):
    """Full logits [B, T, V] (already rounded to ``dtype``) and targets with ignored rows."""
    g = c.gen(salt)
    full = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, V, (B, T), generator=g)
    flat = target.view(-1)
    if n_ignored:
        flat[torch.randperm(B * T, generator=g)[:n_ignored]] = ignore_index
    return full, target


def shard_of(c: Case, full: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return full[..., start:start + n].clone().to(c.device).requires_grad_(True)


def upstream(c: Case, shape, salt=7):
    return torch.randn(shape, generator=c.gen(salt), dtype=torch.float64)


def oracle_ce(full, target, g, **kw):
    """(loss, grad of the full logits) in fp64 for upstream gradient ``g``."""
    x = full.double().requires_grad_(True)
    ref = ref_cross_entropy(x, target, **kw)
    ref.backward(g.double() if ref.dim() else g.double().reshape(()))
    return ref.detach(), x.grad


def check_grad(c: Case, grad, ref_grad_full, start, n, dtype, what):
    assert grad is not None, f"{what}: no gradient"
    assert grad.dtype == dtype, f"{what}: gradient dtype {grad.dtype}, expected {dtype}"
    assert_close_normwise(grad.cpu(), ref_grad_full[..., start:start + n], tol(dtype),
                          f"{what} (rank {c.rank})")


def _on(c: Case, kw: dict) -> dict:
    kw.setdefault("tp_group", c.group)
    kw.setdefault("backend", c.backend)
    for k in ("weight", "normalizer"):
        if isinstance(kw.get(k), torch.Tensor):
            kw[k] = kw[k].to(c.device)
    return kw


def tp_ce(c: Case, x, target, **kw):
    """fce.cross_entropy on this rank's group, backend and device."""
    return fce.cross_entropy(x, target.to(c.device), **_on(c, kw))


def tp_lp(c: Case, x, target, **kw):
    return fce.logprobs(x, target.to(c.device), **_on(c, kw))


def tp_ent(c: Case, x, **kw):
    return fce.entropy(x, **_on(c, kw))


def close(out, ref, rtol, what=""):
    assert_close_normwise(out.detach().cpu(), ref.detach().cpu(), rtol, what)


def expect_raises(exc_type, match: str, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except exc_type as exc:
        assert match in str(exc), f"message {str(exc)!r} lacks {match!r}"
        return exc
    raise AssertionError(f"no {exc_type.__name__} raised (expected one matching {match!r})")


# ---------------------------------------------------------------------------- CE cases

# name -> (layout, fusedce kwargs, input kwargs); "weight" True draws class weights
CE_CASES = {
    "mean_even": ("even", {}, {}),
    "sum_uneven": ("uneven", {"reduction": "sum"}, {}),
    "none_permuted": ("permuted", {"reduction": "none"}, {}),
    "normalizer_float": ("uneven", {"normalizer": 7.5}, {}),
    "normalizer_tensor": ("permuted", {"normalizer": "tensor"}, {}),
    "weights_mean": ("uneven", {"weight": True}, {}),
    "weights_none": ("permuted", {"weight": True, "reduction": "none"}, {}),
    "smoothing_mean": ("uneven", {"label_smoothing": 0.1}, {}),
    "smoothing_weights_sum": ("permuted", {"label_smoothing": 0.2, "weight": True,
                                           "reduction": "sum"}, {}),
    "smoothing_even_none": ("even", {"label_smoothing": 0.3, "reduction": "none"}, {}),
    "zloss": ("uneven", {"z_loss": 1e-2}, {}),
    "softcap_scale": ("permuted", {"softcap": 4.0, "logit_scale": 1.7}, {}),
    "logit_scale": ("uneven", {"logit_scale": 0.6, "reduction": "sum"}, {}),
    "all_options": ("permuted", {"weight": True, "label_smoothing": 0.15, "z_loss": 3e-3,
                                 "softcap": 5.0, "logit_scale": 1.3, "reduction": "none"},
                    {}),
    "all_options_mean": ("uneven", {"weight": True, "label_smoothing": 0.05, "z_loss": 1e-3,
                                    "softcap": 6.0, "logit_scale": 0.9}, {}),
    # class weights sharded like the logits (each rank its slice), gathered by the call
    "weights_sharded_smoothing": ("permuted", {"weight": "sharded", "label_smoothing": 0.1,
                                               "reduction": "sum"}, {}),
    "weights_sharded_mean": ("uneven", {"weight": "sharded", "z_loss": 1e-3}, {}),
    "ignore_valid_id": ("uneven", {"ignore_index": 5}, {"ignore_index": 5}),
    "ignore_positive_sum": ("permuted", {"ignore_index": 3, "reduction": "sum",
                                         "label_smoothing": 0.1}, {"ignore_index": 3}),
    "int32_targets": ("permuted", {"int32": True, "label_smoothing": 0.1}, {}),
    "bf16": ("uneven", {"label_smoothing": 0.1, "z_loss": 1e-3}, {"dtype": torch.bfloat16}),
    "fp16_none": ("permuted", {"reduction": "none", "softcap": 8.0}, {"dtype": torch.float16}),
    "big_rows": ("uneven", {"reduction": "sum"}, {"B": 3, "T": 23, "n_ignored": 9}),
    # validation off and no cached layout: the global V is not gathered, and rank 0's shard
    # (vocab_start 0) must still not pass for a whole row
    "unvalidated_uneven": ("uneven", {"unvalidated": True}, {}),
    "unvalidated_permuted_none": ("permuted", {"unvalidated": True, "reduction": "none"}, {}),
}

# cases also run on the Triton backend (through its interpreter on the CPU)
TRITON_CE = ("mean_even", "none_permuted", "all_options", "bf16", "int32_targets",
             "smoothing_weights_sum", "weights_sharded_smoothing", "unvalidated_uneven")


def run_ce_case(c: Case, name: str):
    lay, kw, ikw = CE_CASES[name]
    kw = dict(kw)
    V, start, n, vs = layout(c, lay)
    dtype = ikw.get("dtype", torch.float32)
    full, target = inputs(c, V, **ikw)
    if kw.pop("int32", False):
        target = target.to(torch.int32)
    if kw.pop("unvalidated", False):
        from fusedce.distributed import clear_layout_cache

        clear_layout_cache()
        with fce.validation(False):
            return _run_ce(c, name, kw, V, start, n, vs, dtype, full, target)
    return _run_ce(c, name, kw, V, start, n, vs, dtype, full, target)


def _run_ce(c: Case, name, kw, V, start, n, vs, dtype, full, target):
    sharded_w = kw.get("weight") == "sharded"
    if kw.get("weight"):
        kw["weight"] = torch.rand(V, generator=c.gen(3), dtype=torch.float64) + 0.25
    if kw.get("normalizer") == "tensor":
        kw["normalizer"] = torch.tensor(6.25)
    red_none = kw.get("reduction") == "none"
    g = upstream(c, target.shape if red_none else ())
    ref, ref_grad = oracle_ce(full, target, g, **kw)

    x = shard_of(c, full, start, n)
    dkw = dict(kw)
    if "weight" in dkw:
        dkw["weight"] = dkw["weight"].float().to(c.device)
        if sharded_w:
            dkw["weight"] = dkw["weight"][start:start + n].clone()
    if isinstance(dkw.get("normalizer"), torch.Tensor):
        dkw["normalizer"] = dkw["normalizer"].to(c.device)
    loss = tp_ce(c, x, target.to(c.device), tp_group=c.group, vocab_start=vs,
                             backend=c.backend, **dkw)
    assert loss.dtype == torch.float32
    close(loss.detach().cpu(), ref, 2 * F32, f"{name} loss (rank {c.rank})")
    loss.backward(g.float().to(c.device))
    check_grad(c, x.grad, ref_grad, start, n, dtype, f"{name} grad")
    # every rank holds the same loss, bit for bit
    _assert_same_everywhere(c, loss.detach(), f"{name} loss")


def _assert_same_everywhere(c: Case, value: torch.Tensor, what: str):
    import torch.distributed as dist

    v = value.reshape(-1).float().contiguous()
    parts = [torch.empty_like(v) for _ in range(c.world)]
    dist.all_gather(parts, v, group=c.group)
    for r, p in enumerate(parts):
        assert torch.equal(p.cpu(), v.cpu()), f"{what}: rank {r} differs from rank {c.rank}"


# ---------------------------------------------------------------------------- other cases


def case_return_aux(c: Case):
    V, start, n, vs = layout(c, "permuted")
    full, target = inputs(c, V, T=7)
    kw = dict(z_loss=2e-2, label_smoothing=0.1, reduction="mean")
    x = shard_of(c, full, start, n)
    out = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, return_aux=True,
                            backend=c.backend, **kw)
    ref = ref_cross_entropy(full.double(), target, **kw)
    close(out.loss.cpu(), ref, 2 * F32, "aux loss")
    _, lse_ref = ref_cross_entropy(full.double(), target, return_rows=True, **kw)
    close(out.lse.cpu(), lse_ref, F32, "aux lse")
    assert out.lse.shape == target.shape
    valid = target != -100
    zrows = torch.where(valid, kw["z_loss"] * lse_ref ** 2, torch.zeros_like(lse_ref))
    close(out.z_loss.cpu(), zrows.sum() / valid.sum(), 2 * F32, "aux z_loss")
    am = full.double().argmax(-1)
    acc = ((am == target) & valid).sum().double() / valid.sum()
    assert abs(float(out.accuracy) - float(acc)) < 1e-6, (float(out.accuracy), float(acc))
    out.loss.backward()
    ref_x = full.double().requires_grad_(True)
    ref_cross_entropy(ref_x, target, **kw).backward()
    check_grad(c, x.grad, ref_x.grad, start, n, torch.float32, "aux grad")


def case_argmax_ties(c: Case):
    """A row maximum held by two shards: the smaller id wins, whatever the rank order."""
    V, start, n, vs = layout(c, "permuted")
    full, _ = inputs(c, V, B=1, T=4, n_ignored=0)
    lo, hi = 2, V - 3  # in different shards in every permuted layout
    full[..., lo] = 50.0
    full[..., hi] = 50.0
    target = torch.tensor([[lo, hi, lo, 0]])
    x = shard_of(c, full, start, n)
    out = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, return_aux=True,
                            backend=c.backend)
    assert abs(float(out.accuracy) - 0.5) < 1e-6, float(out.accuracy)
    # ids above 2**24 stay exact in the packed message
    from fusedce.distributed import allgather_stats
    from fusedce.spec import RowStats

    big = 2**24 + 1 + 7 * c.rank
    m = torch.tensor([1.0, float(c.rank), 3.0], device=c.device)
    st = RowStats(m, torch.ones(3, device=c.device), torch.zeros(3, device=c.device),
                  torch.zeros(3, device=c.device),
                  torch.full((3,), big, dtype=torch.int64, device=c.device))
    comb = allgather_stats(st, c.group, need_sz=False)
    top = 2**24 + 1 + 7 * (c.world - 1)
    assert comb.am.tolist() == [2**24 + 1, top, 2**24 + 1], comb.am.tolist()


def case_inplace(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    g = upstream(c, ())
    ref, ref_grad = oracle_ce(full, target, g, **kw)
    leaf = full[..., start:start + n].clone().to(c.device).requires_grad_(True)
    x = leaf * 1.0  # a non-leaf buffer that inplace_backward may overwrite
    loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, inplace_backward=True,
                             backend=c.backend, **kw)
    close(loss.detach(), ref, 2 * F32, "inplace loss")
    loss.backward(g.float().to(c.device))
    check_grad(c, leaf.grad, ref_grad, start, n, torch.float32, "inplace grad")


def case_noncontiguous(c: Case):
    """Shards viewed out of a wider [T, B, V + pad] buffer: strided rows and columns."""
    V, start, n, vs = layout(c, "permuted")
    full, target = inputs(c, V, B=3, T=4)
    pad = torch.randn(4, 3, V + 5, generator=c.gen(11))
    pad[..., 2:2 + V] = full.transpose(0, 1)
    buf = pad.clone().to(c.device).requires_grad_(True)
    x = buf.transpose(0, 1)[..., 2 + start:2 + start + n]
    assert not x.is_contiguous()
    kw = dict(reduction="none", softcap=7.0, weight=torch.rand(V, generator=c.gen(2)) + 0.5)
    g = upstream(c, target.shape)
    ref, ref_grad = oracle_ce(full, target, g, **kw)
    kw["weight"] = kw["weight"].to(c.device)
    loss = tp_ce(c, x, target.to(c.device), tp_group=c.group, vocab_start=vs,
                             backend=c.backend, **kw)
    close(loss.detach().cpu(), ref, 2 * F32, "noncontig loss")
    loss.backward(g.float().to(c.device))
    grad = buf.grad.transpose(0, 1)[..., 2 + start:2 + start + n]
    check_grad(c, grad, ref_grad, start, n, torch.float32, "noncontig grad")
    untouched = buf.grad.clone()
    untouched.transpose(0, 1)[..., 2 + start:2 + start + n] = 0
    assert not untouched.any(), "gradient written outside the shard"


def case_all_ignored(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V, n_ignored=0)
    target[:] = -100
    x = shard_of(c, full, start, n)
    loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, z_loss=1e-2,
                             label_smoothing=0.1, backend=c.backend)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert not x.grad.any()


def case_no_grad(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    with torch.no_grad():
        loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, reduction="none",
                                 backend=c.backend)
    assert not loss.requires_grad
    close(loss, ref_cross_entropy(full.double(), target, reduction="none"),
                          2 * F32, "no_grad loss")


def case_nan_logit(c: Case):
    """A NaN logit on one rank gives a NaN loss for that row on every rank, never hidden."""
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V, n_ignored=0)
    full[0, 1, V - 1] = float("nan")  # in the last shard
    x = shard_of(c, full, start, n)
    loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, reduction="none",
                             backend=c.backend)
    assert torch.isnan(loss[0, 1]), loss
    assert not torch.isnan(loss[0, 0]) and not torch.isnan(loss[1]).any()


def case_logprobs(c: Case):
    V, start, n, vs = layout(c, "permuted")
    full, target = inputs(c, V, T=6)
    x = shard_of(c, full, start, n)
    lp = tp_lp(c, x, target, tp_group=c.group, vocab_start=vs, logit_scale=1.3,
                      backend=c.backend)
    assert lp.dtype == torch.float32 and lp.shape == target.shape
    ref_x = full.double().requires_grad_(True)
    ref = ref_logprobs(ref_x, target, logit_scale=1.3)
    close(lp.detach(), ref.detach(), 2 * F32, "logprobs")
    g = upstream(c, target.shape)
    lp.backward(g.float().to(c.device))
    ref.backward(g)
    check_grad(c, x.grad, ref_x.grad, start, n, torch.float32, "logprobs grad")
    with torch.enable_grad():
        lp2 = tp_lp(c, x, target, tp_group=c.group, vocab_start=vs, logit_scale=1.3,
                           inference_only=True, backend=c.backend)
    assert not lp2.requires_grad
    close(lp2, ref.detach(), 2 * F32, "logprobs inference_only")


def case_entropy(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, _ = inputs(c, V, T=6, dtype=torch.bfloat16)
    x = shard_of(c, full, start, n)
    ent = tp_ent(c, x, tp_group=c.group, vocab_start=vs, logit_scale=0.8, backend=c.backend)
    assert ent.dtype == torch.float32 and ent.shape == full.shape[:-1]
    ref_x = full.double().requires_grad_(True)
    ref = ref_entropy(ref_x, logit_scale=0.8)
    close(ent.detach(), ref.detach(), 2 * F32, "entropy")
    g = upstream(c, ent.shape)
    ent.backward(g.float().to(c.device))
    ref.backward(g)
    check_grad(c, x.grad, ref_x.grad, start, n, torch.bfloat16, "entropy grad")


def case_entropy_even(c: Case):
    V, start, n, vs = layout(c, "even")
    full, _ = inputs(c, V, B=1, T=9)
    x = shard_of(c, full, start, n)
    ent = tp_ent(c, x, tp_group=c.group, backend=c.backend)
    ref_x = full.double().requires_grad_(True)
    ref = ref_entropy(ref_x)
    close(ent.detach(), ref.detach(), 2 * F32, "entropy even")
    ent.sum().backward()
    ref.sum().backward()
    check_grad(c, x.grad, ref_x.grad, start, n, torch.float32, "entropy even grad")


def _mesh(c: Case):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(c.device.type, (c.world,))


def case_dtensor(c: Case):
    """DTensor logits Shard(-1): even and torch.chunk-uneven V; plain results, DTensor grads."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from fusedce.distributed import chunk_range

    mesh = _mesh(c)
    for V in (12 * c.world, 12 * c.world + 1):
        full, target = inputs(c, V, salt=V)
        kw = dict(label_smoothing=0.1, z_loss=1e-3, weight=torch.rand(V, generator=c.gen(5)))
        g = upstream(c, ())
        ref, ref_grad = oracle_ce(full, target, g, **kw)
        dt = distribute_tensor(full.to(c.device), mesh, [Shard(-1)]).requires_grad_(True)
        kw["weight"] = kw["weight"].to(c.device)
        loss = fce.cross_entropy(dt, target.to(c.device), backend=c.backend, **kw)
        assert not isinstance(loss, DTensor) and isinstance(loss, torch.Tensor)
        close(loss.detach().cpu(), ref, 2 * F32, f"dtensor loss V={V}")
        # class weights as a DTensor sharded like the logits: each rank's slice
        wd = distribute_tensor(kw["weight"], mesh, [Shard(0)])
        loss_w = fce.cross_entropy(distribute_tensor(full.to(c.device), mesh, [Shard(-1)]),
                                   target.to(c.device), backend=c.backend,
                                   **dict(kw, weight=wd))
        close(loss_w.detach().cpu(), ref, 2 * F32, f"dtensor loss, sharded weights V={V}")
        loss.backward(g.float().to(c.device))
        assert isinstance(dt.grad, DTensor)
        start, n = chunk_range(V, c.rank, c.world)
        check_grad(c, dt.grad.to_local(), ref_grad, start, n, torch.float32,
                   f"dtensor grad V={V}")
        # Shard(-1) and Shard(2) are the same placement; torch versions normalise differently
        assert [getattr(p, "dim", -99) % full.dim() for p in dt.grad.placements] == \
            [p.dim % full.dim() for p in dt.placements]
        # log-probs and entropy take DTensors too
        dt2 = distribute_tensor(full.to(c.device), mesh, [Shard(2)])
        lp = fce.logprobs(dt2, target.to(c.device), backend=c.backend)
        close(lp.cpu(), ref_logprobs(full, target), 2 * F32, "dtensor logprobs")
        ent = fce.entropy(dt2, backend=c.backend)
        close(ent.cpu(), ref_entropy(full), 2 * F32, "dtensor entropy")
    # a 2-D mesh (data x vocab) with the vocabulary on its second dimension
    from torch.distributed.device_mesh import init_device_mesh

    mesh2 = init_device_mesh(c.device.type, (1, c.world), mesh_dim_names=("dp", "tp"))
    from torch.distributed.tensor import Replicate

    dt = distribute_tensor(full.to(c.device), mesh2, [Replicate(), Shard(2)])
    lp = fce.logprobs(dt, target.to(c.device), backend=c.backend)
    close(lp.cpu(), ref_logprobs(full, target), 2 * F32, "dtensor 2-D mesh")
    # the mesh's group given explicitly is fine; a wrong vocab_start is not
    dt = distribute_tensor(full.to(c.device), mesh, [Shard(-1)])
    fce.cross_entropy(dt, target.to(c.device), tp_group=mesh.get_group(), backend=c.backend)
    expect_raises(ValueError, "vocab_start", fce.cross_entropy, dt, target.to(c.device),
                  vocab_start=10**6, backend=c.backend)


def case_dtensor_bad_placement(c: Case):
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = _mesh(c)
    full, target = inputs(c, 10)
    dt = distribute_tensor(full.to(c.device), mesh, [Replicate()])
    expect_raises(ValueError, "sharded on their last", fce.cross_entropy, dt,
                  target.to(c.device), backend=c.backend)


def case_tp_group_of_one(c: Case):
    """A group of one rank is the unsharded computation."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(c.world)]  # every rank creates every group
    V = 19
    full, target = inputs(c, V)
    x = shard_of(c, full, 0, V)
    loss = tp_ce(c, x, target, tp_group=groups[c.rank], label_smoothing=0.1,
                             backend=c.backend)
    g = upstream(c, ())
    ref, ref_grad = oracle_ce(full, target, g, label_smoothing=0.1)
    close(loss.detach(), ref, 2 * F32, "group of one loss")
    loss.backward(g.float().to(c.device))
    check_grad(c, x.grad, ref_grad, 0, V, torch.float32, "group of one grad")


# ---------------------------------------------------------------------------- collectives


class _CountCollectives:
    """Counts torch.distributed collectives issued while active (patched module functions)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
             "all_gather_object", "broadcast", "reduce_scatter_tensor", "barrier",
             "all_to_all_single")

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a, __fn=fn, __name=name, **k):
                self.calls.append(__name)
                return __fn(*a, **k)

            setattr(self.dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)

    def take(self):
        out, self.calls = self.calls, []
        return out


def case_collective_count(c: Case):
    """Validation on: 2 collectives in the forward; off: 1 (layout cached); backward: 0."""
    from fusedce.distributed import clear_layout_cache

    clear_layout_cache()
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    with _CountCollectives() as cc:
        for smoothing in (0.0, 0.1):
            x = shard_of(c, full, start, n)
            loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs,
                                     label_smoothing=smoothing, backend=c.backend)
            assert len(cc.take()) == 2, "validation on: header + statistics"
            loss.backward()
            assert cc.take() == [], "the backward must not communicate"
        clear_layout_cache()
        with fce.validation(False):
            x = shard_of(c, full, start, n)
            loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs,
                                     label_smoothing=0.1, backend=c.backend)
            assert len(cc.take()) == 2, "first call of a layout: layout + statistics"
            ref, ref_grad = oracle_ce(full, target, torch.tensor(1.0), label_smoothing=0.1)
            close(loss.detach(), ref, 2 * F32, "validation off loss")
            loss.backward()
            check_grad(c, x.grad, ref_grad, start, n, torch.float32, "validation off grad")
            assert cc.take() == []
            for kw in ({"label_smoothing": 0.1}, {}, {"weight": torch.ones(V)}):
                x = shard_of(c, full, start, n)
                tp_ce(c, x, target, tp_group=c.group, vocab_start=vs,
                                  backend=c.backend, **kw).backward()
                assert len(cc.take()) == 1, f"validation off, cached layout {kw}: statistics only"
            x = shard_of(c, full, start, n)
            tp_ent(c, x, tp_group=c.group, vocab_start=vs, backend=c.backend).sum().backward()
            assert len(cc.take()) == 1
        # validation off without any cache: smoothing-free calls need no layout gather
        clear_layout_cache()
        with fce.validation(False):
            x = shard_of(c, full, start, n)
            loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, z_loss=1e-3,
                                     backend=c.backend)
            assert len(cc.take()) == 1
            ref, _ = oracle_ce(full, target, torch.tensor(1.0), z_loss=1e-3)
            close(loss.detach(), ref, 2 * F32, "uncached loss")


# ---------------------------------------------------------------------------- bad input


def case_err_gap(c: Case):
    V, start, n, _ = layout(c, "uneven")
    full, target = inputs(c, V)
    s = start + (2 if c.rank == c.world - 1 else 0)  # the last rank leaves a gap
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "do not tile", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=s, backend=c.backend)


def case_err_overlap(c: Case):
    V, start, n, _ = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, 0, n)
    expect_raises(ValueError, "overlap", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=0, backend=c.backend)


def case_err_uneven_default(c: Case):
    V, start, n, _ = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "need vocab_start", tp_ce, c, x, target,
                  tp_group=c.group, backend=c.backend)
    # entropy needs no layout: uneven shards without vocab_start are fine
    ent = tp_ent(c, x, tp_group=c.group, backend=c.backend)
    close(ent.detach(), ref_entropy(full), 2 * F32, "entropy, no vocab_start")


def case_err_options_differ(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "loss options", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, z_loss=1e-3 * (c.rank == 0), backend=c.backend)
    expect_raises(ValueError, "loss options", tp_ent, c, x, tp_group=c.group,
                  vocab_start=vs, logit_scale=1.0 + c.rank, backend=c.backend)
    w = torch.ones(V)
    w[3] += 1e-3 * (c.rank == c.world - 1)
    expect_raises(ValueError, "class weights", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, weight=w, backend=c.backend)


def case_err_mixed_vocab_start(c: Case):
    V, start, n, _ = layout(c, "even")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "some ranks", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=start if c.rank == 0 else None, backend=c.backend)


def case_err_rows(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V, T=5 + c.rank)  # every rank a different N
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "number of rows", tp_ce, c, x, target,
                  tp_group=c.group, vocab_start=vs, backend=c.backend)


def case_err_target_range(c: Case):
    V, start, n, vs = layout(c, "permuted")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    bad = target.clone()
    bad[1, 2] = V
    expect_raises(ValueError, f"target holds {V} at flat position 7", tp_ce, c, x,
                  bad, tp_group=c.group, vocab_start=vs, backend=c.backend)
    bad = target.clone().to(torch.int32)
    bad[0, 0] = -1
    expect_raises(ValueError, "target holds -1 at flat position 0", tp_lp, c, x, bad,
                  tp_group=c.group, vocab_start=vs, backend=c.backend)
    # out of range on one rank only: every rank raises
    bad = target.clone()
    if c.rank == c.world - 1:
        bad[1, 4] = V + 100
    expect_raises(ValueError, f"tp rank {c.world - 1}", tp_ce, c, x, bad,
                  tp_group=c.group, vocab_start=vs, backend=c.backend)
    # a target id beyond the LOCAL shard but inside the global vocabulary is fine
    ok = torch.full_like(target, V - 1)
    tp_ce(c, x, ok, tp_group=c.group, vocab_start=vs, backend=c.backend)


def case_err_targets_differ(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    t = target.clone()
    if c.rank == 1:
        t[0, 0] = (int(t[0, 0]) + 1) % V if int(t[0, 0]) >= 0 else 0
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "disagree on the targets", tp_ce, c, x, t,
                  tp_group=c.group, vocab_start=vs, backend=c.backend)


def case_err_local_dtype(c: Case):
    """One rank's own argument error reaches every rank, with its message."""
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    t = target.float() if c.rank == 0 else target
    expect_raises(TypeError, "int64 or int32", tp_ce, c, x, t, tp_group=c.group,
                  vocab_start=vs, backend=c.backend)
    t = target[:, :-1] if c.rank == c.world - 1 else target
    expect_raises(ValueError, "shape", tp_ce, c, x, t, tp_group=c.group,
                  vocab_start=vs, backend=c.backend)


def case_err_local_option(c: Case):
    """A bad option on one rank only raises its error on every rank (the option checks run
    inside the group's validation), for cross_entropy, logprobs and entropy; no rank is left
    waiting in a collective."""
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    last = c.rank == c.world - 1
    expect_raises(ValueError, "label_smoothing", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, label_smoothing=-0.1 if last else 0.0, backend=c.backend)
    expect_raises(ValueError, "reduction", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, reduction="avg" if c.rank == 0 else "mean",
                  backend=c.backend)
    expect_raises(ValueError, "normalizer", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, normalizer=torch.tensor(-1.0 if last else 2.0),
                  backend=c.backend)
    expect_raises(ValueError, "logit_scale", tp_lp, c, x, target, tp_group=c.group,
                  vocab_start=vs, logit_scale=0.0 if last else 1.0, backend=c.backend)
    expect_raises(ValueError, "logit_scale", tp_ent, c, x, tp_group=c.group,
                  vocab_start=vs, logit_scale=-1.0 if c.rank == 0 else 1.0,
                  backend=c.backend)
    # valid on every rank but different: a 0-d normalizer's value is compared too
    expect_raises(ValueError, "options", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, normalizer=torch.tensor(2.0 + c.rank), backend=c.backend)


def case_err_weight(c: Case):
    """Class weights of a length that is neither V nor this rank's V_local, or the whole
    vector on some ranks and slices on others: the same ValueError on every rank."""
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    expect_raises(ValueError, "class-weight", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, weight=torch.ones(V - 1), backend=c.backend)
    expect_raises(ValueError, "class-weight", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, weight=torch.ones(n + 1), backend=c.backend)
    mixed = torch.ones(n) if c.rank == 0 else torch.ones(V)
    expect_raises(ValueError, "one form", tp_ce, c, x, target, tp_group=c.group,
                  vocab_start=vs, weight=mixed, backend=c.backend)
    # each rank's slice is fine (weights_sharded_* check the values)
    tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, weight=torch.ones(n),
          backend=c.backend)


def case_err_op_mismatch(c: Case):
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    if c.rank == 0:
        expect_raises(ValueError, "different operations", tp_ent, c, x, tp_group=c.group,
                      vocab_start=vs, backend=c.backend)
    else:
        expect_raises(ValueError, "different operations", tp_ce, c, x, target,
                      tp_group=c.group, vocab_start=vs, backend=c.backend)


def case_err_then_ok(c: Case):
    """After a rejected call the group is still in step: a correct call works."""
    V, start, n, vs = layout(c, "permuted")
    full, target = inputs(c, V)
    x = shard_of(c, full, start, n)
    bad = target.clone()
    bad[0, 0] = 10**9
    expect_raises(ValueError, "target holds", tp_ce, c, x, bad, tp_group=c.group,
                  vocab_start=vs, backend=c.backend)
    loss = tp_ce(c, x, target, tp_group=c.group, vocab_start=vs, backend=c.backend)
    close(loss.detach(), ref_cross_entropy(full.double(), target), 2 * F32,
                          "after error")


class SkipCase(Exception):
    """Raised by a case that does not apply here (reported as a skip)."""


def case_cuda_no_sync(c: Case):
    """Validation off, layout cached: forward + backward never synchronise with the host."""
    if c.device.type != "cuda":
        raise SkipCase("needs CUDA (run with FUSEDCE_DIST_BACKEND=nccl)")
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, vocab_start=vs)
    ref, ref_grad = oracle_ce(full, target, torch.tensor(1.0), label_smoothing=0.1, z_loss=1e-3)
    t = target.to(c.device)
    with fce.validation(False):
        x = shard_of(c, full, start, n)
        tp_ce(c, x, t, **kw).backward()  # caches the layout, compiles the kernels
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = tp_ce(c, x, t, **kw)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    close(loss, ref, 2 * F32, "no-sync loss")
    check_grad(c, x.grad, ref_grad, start, n, torch.float32, "no-sync grad")


def case_cuda_peer_split(c: Case):
    """Shard rows cut into parts whose records all go through the in-kernel exchange (PEER +
    SPLIT: the table does it for 192-256 KB shards; forced here on small shards by a table
    override, so that some parts are empty): the loss, the same on every rank, and the
    gradient against the oracle, in place and not. Without the in-kernel exchange
    (FUSEDCE_TP_EXCHANGE=nccl, or the torch backend) the same call checks the other paths."""
    if c.device.type != "cuda":
        raise SkipCase("needs CUDA (run with FUSEDCE_DIST_BACKEND=nccl)")
    from fusedce.triton import configs as ce

    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V, T=9)
    ce.set_override(fused=ce.RowsConfig(block=16, num_warps=1, per_sm=2,
                                        reverse=False, split=3, peer_split=True))
    try:
        for kw, inplace in ((dict(label_smoothing=0.1, z_loss=1e-3), False),
                            (dict(reduction="none", z_loss=1e-3), True)):
            red_none = kw.get("reduction") == "none"
            g = upstream(c, target.shape if red_none else ())
            ref, ref_grad = oracle_ce(full, target, g, **kw)
            leaf = shard_of(c, full, start, n)
            x = leaf * 1.0 if inplace else leaf
            loss = tp_ce(c, x, target, vocab_start=vs, inplace_backward=inplace, **kw)
            close(loss.detach().cpu(), ref, 2 * F32, f"peer split loss {kw}")
            _assert_same_everywhere(c, loss.detach(), "peer split loss")
            loss.backward(g.float().to(c.device))
            check_grad(c, leaf.grad, ref_grad, start, n, torch.float32, f"peer split grad {kw}")
    finally:
        ce.set_override(fused=None)


def case_cuda_graph(c: Case):
    """Forward + backward captured in a CUDA graph (NCCL all-gather inside), then replayed."""
    if c.device.type != "cuda":
        raise SkipCase("needs CUDA (run with FUSEDCE_DIST_BACKEND=nccl)")
    V, start, n, vs = layout(c, "permuted")
    kw = dict(label_smoothing=0.1, z_loss=1e-3, vocab_start=vs)
    full, target = inputs(c, V, dtype=torch.bfloat16)
    t = target.to(c.device)
    with fce.validation(False):
        x = shard_of(c, full, start, n)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                x.grad = None
                tp_ce(c, x, t, **kw).backward()
        torch.cuda.current_stream().wait_stream(side)
        x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = tp_ce(c, x, t, **kw)
            loss.backward()
    for salt in (1, 2):
        full2, target2 = inputs(c, V, dtype=torch.bfloat16, salt=salt)
        with torch.no_grad():
            x.copy_(full2[..., start:start + n].to(c.device))
            t.copy_(target2.to(c.device))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_grad = oracle_ce(full2, target2, torch.tensor(1.0), label_smoothing=0.1,
                                  z_loss=1e-3)
        close(loss, ref, 2 * F32, f"graph replay {salt} loss")
        check_grad(c, x.grad, ref_grad, start, n, torch.bfloat16, f"graph replay {salt} grad")


def case_compile(c: Case):
    """torch.compile(fullgraph=True) of vocab-parallel calls with validation on (it is
    skipped while tracing, as the single-device target check is): even shards; uneven
    shards with label smoothing, whose global V is gathered on the host: without fullgraph
    a graph break, with fullgraph an error saying what to do until one eager call cached
    the layout, then compiled too."""
    from fusedce.distributed import clear_layout_cache

    if c.device.type != "cpu":
        raise SkipCase("CPU (aot_eager) only")
    V, start, n, vs = layout(c, "even")
    full, target = inputs(c, V, T=5)
    g = upstream(c, ())

    def loss_even(x):
        return fce.cross_entropy(x, target, tp_group=c.group, z_loss=1e-3, backend=c.backend)

    def lp_even(x):
        return fce.logprobs(x, target, tp_group=c.group, backend=c.backend).sum()

    for name, fn, ref_fn in (
            ("ce", loss_even, lambda r: ref_cross_entropy(r, target, z_loss=1e-3)),
            ("logprobs", lp_even, lambda r: ref_logprobs(r, target).sum())):
        torch._dynamo.reset()
        x = shard_of(c, full, start, n)
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        ref_x = full.double().requires_grad_(True)
        ref = ref_fn(ref_x)
        close(out.detach(), ref.detach(), 2 * F32, f"compiled {name}")
        out.backward(g.float())
        ref.backward(g)
        check_grad(c, x.grad, ref_x.grad, start, n, torch.float32, f"compiled {name} grad")
    V, start, n, vs = layout(c, "uneven")
    full, target = inputs(c, V, T=5)

    def loss_uneven(x):
        return fce.cross_entropy(x, target, tp_group=c.group, vocab_start=vs,
                                 label_smoothing=0.1, backend=c.backend)

    ref = ref_cross_entropy(full.double(), target, label_smoothing=0.1)
    clear_layout_cache()
    torch._dynamo.reset()
    got = torch.compile(loss_uneven, backend="aot_eager")(shard_of(c, full, start, n))
    close(got.detach(), ref, 2 * F32, "compiled uneven (graph break)")
    clear_layout_cache()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="once eagerly"):
        torch.compile(loss_uneven, fullgraph=True, backend="aot_eager")(
            shard_of(c, full, start, n))
    loss_uneven(shard_of(c, full, start, n))  # caches the layout
    torch._dynamo.reset()
    got = torch.compile(loss_uneven, fullgraph=True, backend="aot_eager")(
        shard_of(c, full, start, n))
    close(got.detach(), ref, 2 * F32, "compiled uneven (cached layout)")


OTHER_CASES = {
    "return_aux": case_return_aux,
    "argmax_ties": case_argmax_ties,
    "inplace": case_inplace,
    "noncontiguous": case_noncontiguous,
    "all_ignored": case_all_ignored,
    "no_grad": case_no_grad,
    "nan_logit": case_nan_logit,
    "logprobs": case_logprobs,
    "entropy": case_entropy,
    "entropy_even": case_entropy_even,
    "compile": case_compile,
    "dtensor": case_dtensor,
    "dtensor_bad_placement": case_dtensor_bad_placement,
    "group_of_one": case_tp_group_of_one,
    "collective_count": case_collective_count,
    "err_gap": case_err_gap,
    "err_overlap": case_err_overlap,
    "err_uneven_default": case_err_uneven_default,
    "err_mixed_vocab_start": case_err_mixed_vocab_start,
    "err_options_differ": case_err_options_differ,
    "err_rows": case_err_rows,
    "err_target_range": case_err_target_range,
    "err_targets_differ": case_err_targets_differ,
    "err_local_dtype": case_err_local_dtype,
    "err_local_option": case_err_local_option,
    "err_weight": case_err_weight,
    "err_op_mismatch": case_err_op_mismatch,
    "err_then_ok": case_err_then_ok,
    # last: a failure to capture must not take the other cases down with it
    "cuda_no_sync": case_cuda_no_sync,
    "cuda_peer_split": case_cuda_peer_split,
    "cuda_graph": case_cuda_graph,
}
TRITON_OTHER = ("return_aux", "inplace", "noncontiguous", "logprobs", "entropy", "dtensor",
                "all_ignored")


def all_case_ids():
    gpu_only = [name for name in OTHER_CASES if name.startswith("cuda_")]
    ids = [f"{name}-torch" for name in list(CE_CASES) + list(OTHER_CASES)
           if name not in gpu_only]
    ids += [f"{name}-triton" for name in TRITON_CE + TRITON_OTHER]
    ids += [f"{name}-{be}" for name in gpu_only for be in ("torch", "triton")]
    return ids


# ---------------------------------------------------------------------------- rank worker


def _run_case(c: Case, name: str):
    if name in CE_CASES:
        run_ce_case(c, name)
    else:
        OTHER_CASES[name](c)


def tp_worker(ctx, case_ids, seed):
    """Run the cases on this rank; {case_id: ("ok" | "fail" | "skip", detail)}."""
    import torch.distributed as dist

    group = dist.group.WORLD
    triton_ok = False
    if any(cid.endswith("-triton") for cid in case_ids):
        try:
            import fusedce.triton.backend  # noqa: F401

            triton_ok = ctx.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        except Exception:  # noqa: BLE001 - the backend is optional here
            triton_ok = False
    out = {}
    for i, cid in enumerate(case_ids):
        name, backend = cid.rsplit("-", 1)
        if backend == "triton" and not triton_ok:
            out[cid] = ("skip", "fusedce.triton.backend is not available")
            continue
        progress(cid)
        c = Case(ctx.rank, ctx.world_size, ctx.device, backend, seed + i, group)
        torch.manual_seed(seed + i)
        fce.set_validation(True)
        t0 = time.perf_counter()
        try:
            _run_case(c, name)
            out[cid] = ("ok", round(time.perf_counter() - t0, 3))
        except SkipCase as exc:
            out[cid] = ("skip", str(exc))
        except Exception:  # noqa: BLE001 - reported per case
            out[cid] = ("fail", traceback.format_exc())
        finally:
            fce.set_validation(True)
    return out


# ---------------------------------------------------------------------------- pytest side

_RESULTS: dict = {}


def _seed() -> int:
    env = os.environ.get("FUSEDCE_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(3), "little")


def _selected(session, world):
    ids = []
    for item in session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and item.originalname == "test_tp" and cs.params.get("world") == world:
            ids.append(cs.params["case_id"])
    return ids or all_case_ids()


def _results_for(request, world):
    if world not in _RESULTS:
        seed = _seed()
        ids = _selected(request.session, world)
        try:
            per_rank = run_ranks(tp_worker, world, ids, seed, timeout=300.0)
            _RESULTS[world] = (seed, per_rank, None)
        except AssertionError as exc:
            _RESULTS[world] = (seed, None, str(exc))
    return _RESULTS[world]


@pytest.mark.parametrize("case_id", all_case_ids())
@pytest.mark.parametrize("world", WORLDS)
def test_tp(request, world, case_id):
    if default_backend() == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    if case_id.endswith("-triton") and not _triton_available():
        pytest.skip("fusedce.triton.backend is not available")
    seed, per_rank, err = _results_for(request, world)
    if err is not None:
        pytest.fail(f"the {world}-rank run failed (seed {seed}):\n{err}")
    statuses = [r.get(case_id, ("missing", None)) for r in per_rank]
    fails = [(r, d) for r, (s, d) in enumerate(statuses) if s != "ok" and s != "skip"]
    if fails:
        msg = "\n".join(f"--- rank {r}:\n{d}" for r, d in fails)
        pytest.fail(f"{case_id} on {world} ranks (FUSEDCE_TEST_SEED={seed}):\n{msg}")
    if any(s == "skip" for s, _ in statuses):
        pytest.skip(statuses[0][1] or "skipped")
