"""Fused linear cross-entropy (fusedce.linear) against the fp64 oracle applied to
hidden @ weight.T + bias: every loss option, odd N/D/V, chunk boundaries, bias, reduction
"none" with random upstream gradients, class weights, both gradient strategies (the eager
forward-time gradients through a fused-capable backend, and the recomputing backward),
vocabulary parallelism over gloo (2 ranks, uneven shards) and DTensor weights."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import fusedce as fce
from fusedce import linear as fce_linear
from dist_utils import progress, run_ranks
import eager_backend
from oracle import assert_close_normwise, ref_cross_entropy, ref_logprobs, tol

try:
    import fusedce.triton.backend as _triton_backend  # noqa: F401

    HAS_TRITON_BACKEND = True
    TRITON_SKIP = ""
except Exception as _exc:  # pragma: no cover - depends on the parallel helper's progress
    HAS_TRITON_BACKEND = False
    TRITON_SKIP = f"fusedce.triton.backend is not importable yet ({_exc!r})"


# ---------------------------------------------------------------- a fused-capable backend
# The eager path calls backend.fused when the backend has one (the Triton backend). This
# stand-in builds fused() from the torch backend's row_stats + grad, so the eager fused
# code path of linear.py is exercised on every machine, with or without Triton.


FAKE_FUSED = eager_backend.make("fakefused")

BACKENDS = ["torch", "fakefused", "triton"]


def _use_backend(backend, monkeypatch):
    """The public backend string for ``backend`` (patching in the stand-in for fakefused)."""
    if backend == "triton" and not HAS_TRITON_BACKEND:
        pytest.skip(TRITON_SKIP)
    if backend == "fakefused":
        monkeypatch.setattr(fce_linear, "_select_backend", lambda b, x: FAKE_FUSED)
        return "torch"
    return backend


# ---------------------------------------------------------------- helpers


def _inputs(lead, D, V, dtype, bias=False, ignore_frac=0.2, ignore_index=-100,
            tdtype=torch.int64):
    h = (torch.randn(*lead, D) * 1.5).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D) / D ** 0.5 * 2.0).to(dtype).requires_grad_(True)
    b = (torch.randn(V) * 0.5).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, lead, dtype=tdtype)
    if ignore_frac:
        t = torch.where(torch.rand(lead) < ignore_frac, torch.full_like(t, ignore_index), t)
    return h, w, b, t


def _ref(h, w, b, t, **kw):
    """fp64 oracle loss and leaf copies (hr, wr, br) whose .grad it fills."""
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = None if b is None else b.detach().double().requires_grad_(True)
    logits = hr @ wr.t()
    if br is not None:
        logits = logits + br
    return ref_cross_entropy(logits, t, **kw), hr, wr, br


def _check(backend, dtype, lead=(3, 7), D=13, V=37, bias=False, chunk_size=5, rtol=None,
           **kw):
    """Loss and the gradients of hidden, weight and bias vs the fp64 oracle."""
    cw = kw.pop("class_weight", None)
    if cw == "w":
        cw = torch.rand(V) + 0.25
    h, w, b, t = _inputs(lead, D, V, dtype, bias=bias, ignore_index=kw.get("ignore_index", -100))
    out = fce.linear_cross_entropy(h, w, t, bias=b, class_weight=cw, chunk_size=chunk_size,
                                   backend=backend, **kw)
    ref, hr, wr, br = _ref(h, w, b, t, weight=cw, **kw)
    assert out.dtype == torch.float32
    rt = rtol or max(tol(dtype), 1e-5) * 2
    # a loss is lse - z_t: with fp32 logits from a matmul its error is relative to the
    # logits' scale (~1), not to a tiny loss (a confident row gives ~1e-3)
    assert_close_normwise(out, ref, rt, "loss", floor=1.0)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.float())
    ref.backward(g)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close_normwise(h.grad, hr.grad, rt, "grad hidden", floor=1e-2)
    assert_close_normwise(w.grad, wr.grad, rt, "grad weight", floor=1e-2)
    if b is not None:
        assert b.grad.dtype == dtype
        assert_close_normwise(b.grad, br.grad, rt, "grad bias", floor=1e-2)


# ---------------------------------------------------------------- option matrix

OPTION_SETS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(logit_scale=0.5),
    dict(normalizer=7.0),
    dict(ignore_index=3),
    dict(class_weight="w"),
    dict(class_weight="w", label_smoothing=0.2, reduction="sum"),
    dict(reduction="none", class_weight="w", label_smoothing=0.1, softcap=3.0, z_loss=1e-2),
    dict(label_smoothing=0.3, z_loss=1e-2, softcap=4.0, logit_scale=1.7, normalizer=5.0),
]


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_ids)
def test_options_fp32(backend, opts, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    _check(be, torch.float32, bias=True, **dict(opts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(backend, dtype, reduction, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    _check(be, dtype, lead=(2, 9), D=24, V=70, bias=True, chunk_size=4, reduction=reduction,
           label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["torch", "fakefused"])
@pytest.mark.parametrize("chunk_size", [1, 4, 6, 21, 64, "auto"])
def test_chunk_boundaries(backend, chunk_size, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    _check(be, torch.float32, lead=(3, 7), D=11, V=29, bias=True, chunk_size=chunk_size,
           z_loss=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_random_upstream(backend, monkeypatch):
    # per-row upstream gradients: the weight gradient cannot be a post-scaled sum
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((17,), 10, 31, torch.float32, bias=True)
    out = fce.linear_cross_entropy(h, w, t, bias=b, reduction="none", chunk_size=6, backend=be)
    ref, hr, wr, br = _ref(h, w, b, t, reduction="none")
    g = torch.randn(17, dtype=torch.float64) * 3.0
    out.backward(g.float())
    ref.backward(g)
    for got, exp, what in ((h.grad, hr.grad, "dh"), (w.grad, wr.grad, "dW"),
                           (b.grad, br.grad, "db")):
        assert_close_normwise(got, exp, 2e-5, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_scalar_not_one(backend, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((4, 5), 8, 23, torch.float32, bias=True)
    (fce.linear_cross_entropy(h, w, t, bias=b, chunk_size=3, backend=be) * -2.5).backward()
    ref, hr, wr, br = _ref(h, w, b, t)
    (ref * -2.5).backward()
    assert_close_normwise(h.grad, hr.grad, 2e-5, "dh")
    assert_close_normwise(w.grad, wr.grad, 2e-5, "dW")
    assert_close_normwise(b.grad, br.grad, 2e-5, "db")


def test_odd_shapes_random():
    for N, D, V in [(1, 1, 1), (1, 5, 2), (13, 3, 97), (31, 17, 5), (5, 129, 33)]:
        _check("torch", torch.float32, lead=(N,), D=D, V=V, bias=N % 2 == 1, chunk_size=4)


@pytest.mark.parametrize("backend", ["torch", "fakefused", "triton"])
def test_return_aux(backend, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((3, 6), 9, 41, torch.float32, bias=True)
    out = fce.linear_cross_entropy(h, w, t, bias=b, z_loss=1e-2, chunk_size=4, backend=be,
                                   return_aux=True)
    assert isinstance(out, fce.CrossEntropyOutput)
    logits = (h.detach().double() @ w.detach().double().t() + b.detach().double())
    rows, lse = ref_cross_entropy(logits, t, z_loss=1e-2, return_rows=True)
    assert out.lse.shape == t.shape
    assert_close_normwise(out.lse, lse, 1e-5, "lse")
    valid = t != -100
    zref = (1e-2 * lse * lse * valid).sum() / valid.sum()
    assert_close_normwise(out.z_loss, zref, 1e-5, "z_loss")
    acc = ((logits.argmax(-1) == t) & valid).sum() / valid.sum()
    assert abs(float(out.accuracy) - float(acc)) < 1e-6
    assert_close_normwise(out.loss, ref_cross_entropy(logits, t, z_loss=1e-2), 1e-5, "loss")


# ---------------------------------------------------------------- behaviour


def test_logits_never_exceed_one_chunk(monkeypatch):
    seen = []
    orig = fce_linear._logits_into

    def spy(h, w, b, out):
        seen.append(tuple(out.shape))
        orig(h, w, b, out)

    monkeypatch.setattr(fce_linear, "_logits_into", spy)
    for reduction in ("mean", "none"):
        seen.clear()
        h, w, b, t = _inputs((50,), 7, 19, torch.float32)
        out = fce.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=8)
        out.sum().backward()
        assert seen and max(s[0] for s in seen) <= 8
        # eager (reduced): one forward pass over the chunks; none: forward + recompute
        assert sum(s[0] for s in seen) == (50 if reduction == "mean" else 100)


def test_auto_chunk_rows_budget():
    rows = fce_linear.auto_chunk_rows(8192, 128256, torch.bfloat16, torch.device("cuda"),
                                      budget_bytes=256 << 20)
    assert rows * 128256 * 2 <= 256 << 20 and rows % 64 == 0
    assert -(-8192 // rows) * rows - 8192 < rows  # balanced: no tiny tail chunk
    assert fce_linear.auto_chunk_rows(10, 50, torch.float32, torch.device("cpu")) == 10
    assert fce_linear.auto_chunk_rows(10, 1 << 30, torch.float32, torch.device("cpu")) == 1
    cpu = fce_linear.auto_chunk_rows(1 << 20, 32000, torch.float32, torch.device("cpu"))
    assert cpu * 32000 * 4 <= fce_linear.DEFAULT_CHUNK_BYTES_CPU


def test_auto_chunk_uses_knob(monkeypatch):
    monkeypatch.setattr(fce_linear, "DEFAULT_CHUNK_BYTES_CPU", 19 * 4 * 6)
    seen = []
    orig = fce_linear._logits_into
    monkeypatch.setattr(fce_linear, "_logits_into",
                        lambda h, w, b, out: (seen.append(out.shape[0]), orig(h, w, b, out)))
    h, w, b, t = _inputs((30,), 5, 19, torch.float32)
    fce.linear_cross_entropy(h, w, t).backward()
    assert max(seen) <= 6 and sum(seen) == 30


@pytest.mark.parametrize("backend", ["torch", "fakefused"])
def test_deterministic(backend, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((40,), 16, 45, torch.bfloat16, bias=True)
    grads = []
    for _ in range(2):
        for x in (h, w, b):
            x.grad = None
        loss = fce.linear_cross_entropy(h, w, t, bias=b, chunk_size=7, backend=be)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad, b.grad))
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["torch", "fakefused"])
def test_accum_dtype_fp32(backend, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((64,), 16, 40, torch.bfloat16)
    ref, hr, wr, _ = _ref(h, w, None, t, reduction="sum")
    ref.backward()
    errs = {}
    for acc in (None, torch.float32):
        w.grad = None
        fce.linear_cross_entropy(h, w, t, reduction="sum", chunk_size=2, accum_dtype=acc,
                                 backend=be).backward()
        assert w.grad.dtype == torch.bfloat16
        errs[acc] = float((w.grad.double() - wr.grad).norm() / wr.grad.norm())
    assert errs[torch.float32] <= 2e-2 and errs[None] <= 2e-2
    # fp32 accumulation rounds once: no worse than 32 bf16 roundings (some slack)
    assert errs[torch.float32] <= errs[None] * 1.5 + 1e-4


def test_partial_requires_grad():
    h, w, b, t = _inputs((12,), 6, 15, torch.float32, bias=True)
    h.requires_grad_(False)
    b.requires_grad_(False)
    fce.linear_cross_entropy(h, w, t, bias=b, chunk_size=5).backward()
    ref, _, wr, _ = _ref(h, w, b, t)
    ref.backward()
    assert h.grad is None and b.grad is None
    assert_close_normwise(w.grad, wr.grad, 2e-5, "dW")
    # only hidden needs a gradient (frozen head, e.g. LoRA on the trunk)
    h2, w2, _, t2 = _inputs((12,), 6, 15, torch.float32)
    w2.requires_grad_(False)
    fce.linear_cross_entropy(h2, w2, t2, reduction="none").sum().backward()
    ref, hr, _, _ = _ref(h2, w2, None, t2, reduction="none")
    ref.sum().backward()
    assert w2.grad is None
    assert_close_normwise(h2.grad, hr.grad, 2e-5, "dh")


def test_no_grad_and_inference():
    h, w, b, t = _inputs((9,), 6, 21, torch.float32, bias=True)
    with torch.no_grad():
        out = fce.linear_cross_entropy(h, w, t, bias=b, chunk_size=4)
    assert not out.requires_grad
    assert_close_normwise(out, _ref(h, w, b, t)[0], 2e-5, "loss")


def test_backward_twice_reduced_raises_and_none_works():
    h, w, b, t = _inputs((8,), 5, 13, torch.float32)
    loss = fce.linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    h.grad = None
    w.grad = None
    rows = fce.linear_cross_entropy(h, w, t, reduction="none")
    rows.sum().backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    rows.sum().backward()
    assert torch.allclose(h.grad, 2 * first[0]) and torch.allclose(w.grad, 2 * first[1])


def test_all_ignored_and_empty():
    h, w, b, t = _inputs((6,), 5, 11, torch.float32, bias=True)
    t = torch.full_like(t, -100)
    loss = fce.linear_cross_entropy(h, w, t, bias=b)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    assert torch.count_nonzero(b.grad) == 0
    h0 = torch.randn(0, 5, requires_grad=True)
    w0 = torch.randn(11, 5, requires_grad=True)
    t0 = torch.zeros(0, dtype=torch.int64)
    for red in ("mean", "sum"):
        w0.grad = None
        loss = fce.linear_cross_entropy(h0, w0, t0, reduction=red)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(w0.grad) == 0
    assert fce.linear_cross_entropy(h0, w0, t0, reduction="none").shape == (0,)


def test_noncontiguous_and_int32():
    # [T, B, D] seen through a transpose, a transposed head, int32 targets
    h_leaf = torch.randn(6, 4, 10, requires_grad=True)
    hv = h_leaf.transpose(0, 1)
    w_store = torch.randn(10, 27, requires_grad=True)
    w = w_store.t()  # [V, D] with stride (1, V)
    t = torch.randint(0, 27, (4, 6), dtype=torch.int32)
    loss = fce.linear_cross_entropy(hv, w, t, chunk_size=5, label_smoothing=0.1)
    loss.backward()
    ref, hr, wr, _ = _ref(hv, w, None, t, label_smoothing=0.1)
    ref.backward()
    assert_close_normwise(loss, ref, 2e-5, "loss")
    assert_close_normwise(h_leaf.grad.transpose(0, 1), hr.grad, 2e-5, "dh")
    assert_close_normwise(w_store.grad.t(), wr.grad, 2e-5, "dW")


def test_autocast_cpu():
    h, w, b, t = _inputs((10,), 8, 17, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fce.linear_cross_entropy(h, w, t, bias=b)
    loss.backward()
    assert w.grad.dtype == torch.float32
    ref, hr, wr, br = _ref(h, w, b, t)
    ref.backward()
    assert_close_normwise(loss, ref, 2e-2, "loss")
    assert_close_normwise(w.grad, wr.grad, 3e-2, "dW")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_logprobs(backend, monkeypatch):
    be = _use_backend(backend, monkeypatch)
    h, w, b, t = _inputs((3, 5), 7, 26, torch.float32, bias=True)
    lp = fce.linear_logprobs(h, w, t, bias=b, logit_scale=0.7, chunk_size=4, backend=be)
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    ref = ref_logprobs(hr @ wr.t() + b.detach().double(), t, logit_scale=0.7)
    assert lp.shape == t.shape and lp.dtype == torch.float32
    assert_close_normwise(lp, ref, 2e-5, "logprobs")
    g = torch.randn(t.shape, dtype=torch.float64)
    lp.backward(g.float())
    ref.backward(g)
    assert_close_normwise(h.grad, hr.grad, 2e-5, "dh")
    assert_close_normwise(w.grad, wr.grad, 2e-5, "dW")
    inf = fce.linear_logprobs(h, w, t, bias=b, logit_scale=0.7, inference_only=True,
                              backend=be)
    assert not inf.requires_grad
    assert_close_normwise(inf, ref, 2e-5, "logprobs inference")


def test_module_form():
    h, w, b, t = _inputs((2, 5), 6, 19, torch.float32, bias=True)
    cw = torch.rand(19) + 0.5
    mod = fce.LinearCrossEntropyLoss(class_weight=cw, label_smoothing=0.1, chunk_size=3)
    assert "label_smoothing" in repr(mod)
    loss = mod(h, w, t, b)
    ref = _ref(h, w, b, t, weight=cw, label_smoothing=0.1)[0]
    assert_close_normwise(loss, ref, 2e-5, "module loss")
    assert isinstance(fce.LinearCrossEntropyLoss(), torch.nn.Module)


def test_matches_cross_entropy_on_materialised_logits():
    h, w, b, t = _inputs((4, 6), 12, 33, torch.float32, bias=True)
    kw = dict(label_smoothing=0.05, z_loss=1e-3, softcap=8.0, reduction="sum")
    a = fce.linear_cross_entropy(h, w, t, bias=b, chunk_size=5, **kw)
    c = fce.cross_entropy(h @ w.t() + b, t, **kw)
    assert torch.allclose(a, c, rtol=1e-5, atol=1e-5)


BAD = [
    (lambda h, w, t: fce.linear_cross_entropy(h, w[:, :-1], t), ValueError, "D ="),
    (lambda h, w, t: fce.linear_cross_entropy(h, w[0], t), ValueError, "2-D"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w.double(), t), TypeError, "dtype"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t[:-1]), ValueError, "target"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t.float()), TypeError, "int64"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t + 100), ValueError, "class ids"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, bias=torch.zeros(3)), ValueError,
     "bias"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, class_weight=torch.ones(3)),
     ValueError, "class_weight"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, chunk_size=0), ValueError,
     "chunk_size"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, chunk_size="big"), ValueError,
     "chunk_size"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, accum_dtype=torch.float16), ValueError,
     "accum_dtype"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, vocab_start=3), ValueError,
     "tp_group"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, reduction="avg"), ValueError,
     "reduction"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, reduction="none", normalizer=2.0),
     ValueError, "normalizer"),
    (lambda h, w, t: fce.linear_cross_entropy(h.numpy(), w, t), TypeError, "hidden"),
    (lambda h, w, t: fce.linear_cross_entropy(h.long(), w, t), TypeError, "hidden"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w[:0], t), ValueError, "no rows"),
    (lambda h, w, t: fce.linear_cross_entropy(h, w, t, backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(bad, exc, match):
    h = torch.randn(5, 4)
    w = torch.randn(9, 4)
    t = torch.randint(0, 9, (5,))
    with pytest.raises(exc, match=match):
        bad(h, w, t)


def test_dtensor_single_rank_error_and_replicate():
    dt = pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised")
    fd, path = tempfile.mkstemp()
    os.close(fd)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        mesh = dt.DeviceMesh("cpu", [0])
        h, w, _, t = _inputs((6,), 5, 13, torch.float32)
        wd = dt.distribute_tensor(w.detach(), mesh, [dt.Shard(0)])
        # a Shard(0) weight is a vocabulary shard over its mesh (here one rank: the whole head)
        loss = fce.linear_cross_entropy(h, wd, t)
        assert_close_normwise(loss, _ref(h, w, None, t)[0], 2e-5, "Shard(0) DTensor")
        wd2 = dt.distribute_tensor(w.detach(), mesh, [dt.Shard(1)])
        with pytest.raises(ValueError, match="FSDP2"):
            fce.linear_cross_entropy(h, wd2, t)
        wr = dt.distribute_tensor(w.detach(), mesh, [dt.Replicate()])
        loss = fce.linear_cross_entropy(h, wr, t)
        assert_close_normwise(loss, _ref(h, w, None, t)[0], 2e-5, "replicated DTensor")
    finally:
        dist.destroy_process_group()
        os.unlink(path)


# ---------------------------------------------------------------- vocab-parallel (gloo)

TP_V = 37
TP_SPLIT = (15, 22)  # uneven shards: rank 0 holds [0, 15), rank 1 [15, 37)


def _tp_case(rank, group, backend, reduction, bias, cw, reduce_hidden_grad, **kw):
    """One vocab-parallel check on this rank: loss and gradients vs the full fp64 oracle."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1234)  # identical full inputs on every rank
    N, D = 19, 9
    h_full = torch.randn(N, D, generator=gen) * 1.5
    w_full = torch.randn(TP_V, D, generator=gen) / 3.0
    b_full = torch.randn(TP_V, generator=gen) * 0.5 if bias else None
    t = torch.randint(0, TP_V, (N,), generator=gen)
    t[::4] = -100
    cwt = torch.rand(TP_V, generator=gen) + 0.5 if cw else None
    g = torch.randn(N if reduction == "none" else (), generator=gen, dtype=torch.float64)
    start = 0 if rank == 0 else TP_SPLIT[0]
    stop = start + TP_SPLIT[rank]
    h = h_full.clone().requires_grad_(True)
    w = w_full[start:stop].clone().requires_grad_(True)
    b = None if b_full is None else b_full[start:stop].clone().requires_grad_(True)
    # cw == "sharded": each rank passes its slice of the class weights
    cw_arg = cwt[start:stop].clone() if cw == "sharded" else cwt
    out = fce.linear_cross_entropy(h, w, t, bias=b, class_weight=cw_arg, reduction=reduction,
                                   chunk_size=5, tp_group=group, vocab_start=start,
                                   reduce_hidden_grad=reduce_hidden_grad, backend=backend,
                                   **kw)
    ref, hr, wr, br = _ref(h_full, w_full, b_full, t, weight=cwt, reduction=reduction, **kw)
    assert_close_normwise(out, ref, 2e-5, f"tp loss rank {rank}")
    out.backward(g.float())
    ref.backward(g)
    dh = h.grad
    if not reduce_hidden_grad:
        dist.all_reduce(dh, group=group)  # what the caller (Megatron) would do
    assert_close_normwise(dh, hr.grad, 2e-5, f"tp dh rank {rank}")
    assert_close_normwise(w.grad, wr.grad[start:stop], 2e-5, f"tp dW rank {rank}")
    if b is not None:
        assert_close_normwise(b.grad, br.grad[start:stop], 2e-5, f"tp db rank {rank}")


def _tp_dtensor_case(rank, group):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh("cpu", [0, 1])
    gen = torch.Generator().manual_seed(99)
    N, D = 11, 6
    h_full = torch.randn(N, D, generator=gen)
    w_full = torch.randn(TP_V, D, generator=gen) / 2.0
    t = torch.randint(0, TP_V, (N,), generator=gen)
    wd = distribute_tensor(w_full.clone(), mesh, [Shard(0)]).requires_grad_(True)
    h = h_full.clone().requires_grad_(True)
    # hidden that differs per rank (an FSDP2-sharded head called outside its forward):
    # refused on every rank by the validation, which then still agrees on the group
    with pytest.raises(ValueError, match="FSDP2"):
        fce.linear_cross_entropy(h_full + rank, wd, t)
    ref, hr, wr, _ = _ref(h_full, w_full, None, t)
    # the weight's mesh is the vocabulary group, named or not (then hidden is checked)
    for kw in (dict(), dict(tp_group=mesh.get_group())):
        h.grad = wd.grad = None
        loss = fce.linear_cross_entropy(h, wd, t, chunk_size=4, **kw)
        assert_close_normwise(loss, ref, 2e-5, f"dtensor loss {kw}")
        loss.backward()
        assert_close_normwise(h.grad, torch.autograd.grad(ref, hr, retain_graph=True)[0],
                              2e-5, "dtensor dh")
        assert_close_normwise(wd.grad.full_tensor(),
                              torch.autograd.grad(ref, wr, retain_graph=True)[0], 2e-5,
                              "dtensor dW")
    with fce.validation(False):
        assert_close_normwise(fce.linear_cross_entropy(h, wd, t), ref, 2e-5,
                              "dtensor loss, validation off")
    # replicated DTensor hidden on the same mesh marks the weight as a vocab shard
    hd = distribute_tensor(h_full.clone(), mesh, [Replicate()]).requires_grad_(True)
    wd.grad = None
    loss2 = fce.linear_cross_entropy(hd, wd, t, reduction="sum")
    ref2, hr2, _, _ = _ref(h_full, w_full, None, t, reduction="sum")
    assert_close_normwise(loss2, ref2, 2e-5, "dtensor loss (replicated hidden)")
    loss2.backward()
    ref2.backward()
    assert_close_normwise(hd.grad.full_tensor(), hr2.grad, 2e-5, "dtensor dh (replicated)")
    dist.barrier(group=group)


def _tp_layout_change_case(rank, group):
    """Uneven shards whose layout changes between calls on one rank only: with validation
    every rank gathers the layout, so a gap raises the same ValueError on every rank (no
    collective mismatch) and a valid new layout gives the new vocabulary's loss."""
    import pytest

    gen = torch.Generator().manual_seed(11)
    W = torch.randn(30, 4, generator=gen)
    h = torch.randn(6, 4, generator=gen)
    t = torch.randint(0, 25, (6,), generator=gen)

    def call(bounds):
        s, e = bounds[rank]
        return fce.linear_cross_entropy(h, W[s:e], t, tp_group=group, vocab_start=s)

    full = fce.linear_cross_entropy(h, W, t)
    assert torch.allclose(call([(0, 11), (11, 30)]), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gap at column 11"):
        call([(0, 11), (12, 30)])  # rank 0's shard is unchanged, rank 1's moved
    got = call([(0, 11), (11, 25)])
    assert torch.allclose(got, fce.linear_cross_entropy(h, W[:25], t), rtol=1e-5, atol=1e-6)


def _tp_linear_checks_case(rank, group):
    """Under TP with validation, one rank's bad argument raises on every rank (no rank left
    in a collective); uneven shards with chunk_size="auto" cut the same chunks on every
    rank (the budget is sized from the mean shard), so a budget that binds stays right."""
    import pytest

    from fusedce import linear

    gen = torch.Generator().manual_seed(12)
    W = torch.randn(30, 4, generator=gen)
    h = torch.randn(40, 4, generator=gen)
    t = torch.randint(0, 30, (40,), generator=gen)
    s, e = [(0, 7), (7, 30)][rank]
    last = rank == 1

    def call(**kw):
        kw.setdefault("tp_group", group)
        kw.setdefault("vocab_start", s)
        return fce.linear_cross_entropy(h, W[s:e], kw.pop("target", t), **kw)

    with pytest.raises(ValueError, match="label_smoothing"):
        call(label_smoothing=-0.5 if last else 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0 if rank == 0 else 8)
    bad = t.clone()
    if last:
        bad[3] = 30
    with pytest.raises(ValueError, match="target"):
        call(target=bad)
    with pytest.raises(ValueError, match="options"):
        call(z_loss=1e-3 if last else 0.0)
    full = fce.linear_cross_entropy(h, W, t, label_smoothing=0.1)
    old = linear.DEFAULT_CHUNK_BYTES_CPU
    try:
        linear.DEFAULT_CHUNK_BYTES_CPU = 15 * 4 * 9  # ~9 rows of the mean shard
        for validate in (True, False):
            with fce.validation(validate):
                got = call(label_smoothing=0.1)
            assert torch.allclose(got, full, rtol=1e-5, atol=1e-6), (validate, got, full)
    finally:
        linear.DEFAULT_CHUNK_BYTES_CPU = old


def _tp_worker(ctx, backends):
    import torch.distributed as dist

    if "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rank, group = ctx.rank, dist.group.WORLD
    for be in backends:
        progress(f"{be} mean")
        _tp_case(rank, group, be, "mean", True, False, True)
        progress(f"{be} none")
        _tp_case(rank, group, be, "none", True, True, True, label_smoothing=0.1)
        progress(f"{be} sum, partial dh")
        _tp_case(rank, group, be, "sum", False, True, False, z_loss=1e-3, softcap=6.0)
    progress("normalizer")
    _tp_case(rank, group, "torch", "sum", True, True, True, label_smoothing=0.2,
             normalizer=4.0, logit_scale=1.3)
    progress("class weights sharded like the head")
    _tp_case(rank, group, "torch", "mean", False, "sharded", True, label_smoothing=0.1)
    with fce.validation(False):
        _tp_case(rank, group, "torch", "none", True, "sharded", True)
    progress("dtensor")
    _tp_dtensor_case(rank, group)
    progress("layout change")
    _tp_layout_change_case(rank, group)
    progress("checks")
    _tp_linear_checks_case(rank, group)
    return True


def test_vocab_parallel_gloo():
    backends = ["torch"] + (["triton"] if HAS_TRITON_BACKEND else [])
    assert run_ranks(_tp_worker, 2, backends, backend="gloo") == [True, True]
