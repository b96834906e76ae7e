"""Core API tests: cross_entropy / logprobs / entropy / CrossEntropyLoss against the fp64
oracle, for every backend that runs here (torch; triton through the interpreter on CPU)."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import torch.nn.functional as F

import fusedce as fce
from fusedce import spec, torch_backend
from oracle import (assert_close_normwise, ref_cross_entropy, ref_entropy, ref_logprobs, tol)


def _backends():
    out = ["torch"]
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        # these tests build CPU tensors: Triton runs on them only through the interpreter
        # (tests/test_gpu.py covers the CUDA kernels)
        return out
    try:
        import fusedce.triton.backend  # noqa: F401

        out.append("triton")
    except Exception:  # pragma: no cover - triton backend missing
        pass
    return out


BACKENDS = _backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, V, dtype, ignore_frac=0.2, ignore_index=-100, scale=3.0, tdtype=torch.int64):
    x = (torch.randn(*shape, V) * scale).to(dtype)
    t = torch.randint(0, V, shape, dtype=tdtype)
    if ignore_frac:
        mask = torch.rand(shape) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return x, t


def _check(backend, dtype, shape=(3, 5), V=37, upstream=None, **kw):
    """Loss and gradient of fce.cross_entropy vs the fp64 oracle."""
    weight = kw.pop("weight", None)
    x, t = _inputs(shape, V, dtype, ignore_index=kw.get("ignore_index", -100))
    x.requires_grad_(True)
    out = fce.cross_entropy(x, t, weight=weight, backend=backend, **kw)
    xr = x.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(xr, t, weight=weight, **kw)
    assert out.dtype == torch.float32
    assert_close_normwise(out, ref, max(tol(dtype), 1e-5) * 2, "loss", floor=1.0)
    g = torch.randn(out.shape, dtype=torch.float64) if upstream is None else upstream
    out.backward(g.float())
    ref.backward(g)
    assert x.grad.dtype == dtype
    assert_close_normwise(x.grad, xr.grad, tol(dtype) * 2, "grad")


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
    dict(weight="w"),
    dict(weight="w", label_smoothing=0.2),
    dict(weight="w", reduction="sum", z_loss=1e-2),
    dict(label_smoothing=0.3, z_loss=1e-2, softcap=4.0, logit_scale=1.7),
    dict(reduction="none", label_smoothing=0.1, softcap=3.0, weight="w"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_options_fp32(backend, opts):
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(37) + 0.1
    _check(backend, torch.float32, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum"),
               dict(softcap=6.0, reduction="none")):
        _check(backend, dtype, shape=(16,), V=301, **kw)


def test_random_option_combinations():
    rng = random.Random(1234)
    choices = dict(reduction=["mean", "sum", "none"], label_smoothing=[0.0, 0.15],
                   z_loss=[0.0, 1e-3], softcap=[None, 8.0], logit_scale=[1.0, 0.7],
                   ignore_index=[-100, 0, 5], weight=[False, True])
    combos = list(itertools.product(*choices.values()))
    for combo in rng.sample(combos, 40):
        kw = dict(zip(choices.keys(), combo))
        kw["weight"] = torch.rand(23) + 0.05 if kw["weight"] else None
        _check("torch", torch.float32, shape=(2, 7), V=23, **kw)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_zero(backend):
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.full((4,), -100)
    for kw in (dict(), dict(weight=torch.rand(9)), dict(z_loss=1e-2, label_smoothing=0.1)):
        x.grad = None
        loss = fce.cross_entropy(x, t, backend=backend, **kw)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(loss)
        assert torch.count_nonzero(x.grad) == 0
    assert fce.cross_entropy(x, t, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_divides_by_negative_weight_sums_as_torch(backend):
    """"mean" divides by the sum of the target weights exactly as F.cross_entropy does, a
    negative sum included; only a zero sum (all ignored, or target weights all 0) gives 0."""
    x = (torch.randn(13, 37) * 3).requires_grad_(True)
    t = torch.randint(0, 37, (13,))
    t[3] = -100
    for w in (-torch.ones(37), torch.rand(37) - 0.9, torch.rand(37) - 0.5):
        x.grad = None
        loss = fce.cross_entropy(x, t, weight=w, backend=backend)
        loss.backward()
        xr = x.detach().double().requires_grad_(True)
        ref = F.cross_entropy(xr, t, weight=w.double())
        ref.backward()
        assert_close_normwise(loss.detach(), ref, 1e-5, "loss")
        assert_close_normwise(x.grad, xr.grad, 1e-5, "grad")
    w0 = torch.rand(37)
    w0[t[t != -100]] = 0.0  # target weights all 0: a zero denominator gives 0, not NaN
    loss = fce.cross_entropy(x, t, weight=w0, backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_have_zero_grad(backend):
    x, t = _inputs((12,), 17, torch.float32, ignore_frac=0.5)
    x.requires_grad_(True)
    fce.cross_entropy(x, t, z_loss=1e-2, label_smoothing=0.2, backend=backend).backward()
    ign = t == -100
    assert ign.any()
    assert torch.count_nonzero(x.grad[ign]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_views(backend):
    B, T, V = 3, 6, 29
    base = torch.randn(B, T, V)
    t = torch.randint(0, V, (B, T - 1))
    # a shifted view: rows are not uniformly strided
    leaf = base.clone().requires_grad_(True)
    xs = leaf[:, :-1]
    assert not xs.is_contiguous()
    xr = base.double().requires_grad_(True)
    out = fce.cross_entropy(xs, t, backend=backend, label_smoothing=0.1)
    ref = ref_cross_entropy(xr[:, :-1], t, label_smoothing=0.1)
    out.backward()
    ref.backward()
    assert_close_normwise(out, ref, 1e-5, "shifted loss")
    assert_close_normwise(leaf.grad, xr.grad, 1e-5, "shifted grad")
    # transposed [T, B, V] -> [B, T, V] view
    y = torch.randn(T, B, V).transpose(0, 1).requires_grad_(True)
    ty = torch.randint(0, V, (B, T))
    out = fce.cross_entropy(y, ty, reduction="none", backend=backend)
    yr = y.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(yr, ty, reduction="none")
    g = torch.randn(B, T)
    out.backward(g)
    ref.backward(g.double())
    assert_close_normwise(out, ref, 1e-5, "transposed loss")
    assert_close_normwise(y.grad, yr.grad, 1e-5, "transposed grad")
    # column stride != 1
    z = torch.randn(10, 2 * V)[:, ::2].requires_grad_(False)
    tz = torch.randint(0, V, (10,))
    zr = z.double()
    assert_close_normwise(fce.cross_entropy(z, tz, backend=backend),
                          ref_cross_entropy(zr, tz), 1e-5, "column-strided")


@pytest.mark.parametrize("V", [1, 31, 1001, 65537])
def test_odd_vocab_sizes(V):
    n = 4 if V > 10000 else 9
    _check("torch", torch.float32, shape=(n,), V=V, label_smoothing=0.1, z_loss=1e-3)


def test_odd_vocab_sizes_triton():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not present")
    for V in (1, 31, 1001):
        _check("triton", torch.float32, shape=(5,), V=V, label_smoothing=0.1)


def test_torch_backend_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(torch_backend, "default_chunk_rows", lambda V, budget=None: 3)
    for shape in ((10,), (4, 5)):
        _check("torch", torch.float32, shape=shape, V=13, label_smoothing=0.1, z_loss=1e-3)
    # the shifted view takes the per-batch chunking path
    base = torch.randn(3, 8, 13)
    x = base[:, 1:].requires_grad_(False)
    t = torch.randint(0, 13, (3, 7))
    assert_close_normwise(fce.cross_entropy(x, t, reduction="none"),
                          ref_cross_entropy(x.double(), t, reduction="none"), 1e-5, "chunks")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_upstream(backend):
    g = torch.randn(6, 4, dtype=torch.float64)
    _check(backend, torch.float32, shape=(6, 4), V=19, reduction="none", upstream=g,
           z_loss=1e-3, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_finite(backend):
    x = torch.randn(8, 50) * 1e4
    t = torch.randint(0, 50, (8,))
    x.requires_grad_(True)
    loss = fce.cross_entropy(x, t, backend=backend, z_loss=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    ref = ref_cross_entropy(x.detach(), t, z_loss=1e-4)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    x = torch.randn(5, 11)
    x[2, 4] = float("nan")
    t = torch.randint(0, 11, (5,))
    rows = fce.cross_entropy(x, t, reduction="none", backend=backend)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4]]).all()
    assert torch.isnan(fce.cross_entropy(x, t, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    x = torch.randn(7, 21)
    t = torch.randint(0, 21, (7,), dtype=torch.int32)
    assert_close_normwise(fce.cross_entropy(x, t, backend=backend),
                          ref_cross_entropy(x, t.long()), 1e-5, "int32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_tensor_and_float(backend):
    x = torch.randn(9, 13)
    t = torch.randint(0, 13, (9,))
    a = fce.cross_entropy(x, t, normalizer=4.0, backend=backend)
    b = fce.cross_entropy(x, t, normalizer=torch.tensor(4.0), backend=backend)
    ref = ref_cross_entropy(x, t, reduction="sum") / 4.0
    assert_close_normwise(a, ref, 1e-5)
    assert_close_normwise(b, ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_aux(backend):
    x, t = _inputs((4, 6), 15, torch.float32)
    out = fce.cross_entropy(x, t, z_loss=1e-2, return_aux=True, backend=backend)
    assert isinstance(out, fce.CrossEntropyOutput)
    rows, lse = ref_cross_entropy(x, t, z_loss=1e-2, return_rows=True)
    assert out.lse.shape == t.shape and out.lse.dtype == torch.float32
    assert_close_normwise(out.lse, lse, 1e-6, "lse")
    valid = t != -100
    zl = (1e-2 * lse ** 2 * valid).sum() / valid.sum()
    assert_close_normwise(out.z_loss, zl, 1e-5, "z_loss")
    acc = ((x.argmax(-1) == t) & valid).sum() / valid.sum()
    assert abs(out.accuracy.item() - acc.item()) < 1e-6
    # accuracy of a batch whose targets are the argmax
    t2 = x.argmax(-1)
    assert fce.cross_entropy(x, t2, return_aux=True, backend=backend).accuracy.item() == 1.0
    allign = torch.full_like(t, -100)
    assert fce.cross_entropy(x, allign, return_aux=True, backend=backend).accuracy.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    x, t = _inputs((10,), 23, torch.float32)
    ref_x = x.double().requires_grad_(True)
    ref = ref_cross_entropy(ref_x, t, label_smoothing=0.1)
    ref.backward()
    leaf = x.clone().requires_grad_(True)
    buf = leaf * 1.0  # a non-leaf buffer the loss may overwrite
    loss = fce.cross_entropy(buf, t, label_smoothing=0.1, inplace_backward=True, backend=backend)
    loss.backward()
    assert_close_normwise(loss, ref, 1e-5)
    assert_close_normwise(leaf.grad, ref_x.grad, 1e-5, "inplace grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_caller_tensors_not_mutated(backend):
    x, t = _inputs((6, 3), 11, torch.bfloat16)
    x0, t0 = x.clone(), t.clone()
    w = torch.rand(11)
    w0 = w.clone()
    x.requires_grad_(True)
    fce.cross_entropy(x, t, weight=w, label_smoothing=0.1, backend=backend).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0) and torch.equal(w, w0)


def test_no_grad_forward_matches():
    x, t = _inputs((20,), 40, torch.float32)
    with torch.no_grad():
        a = fce.cross_entropy(x.requires_grad_(True), t)
    assert a.grad_fn is None
    assert_close_normwise(a, ref_cross_entropy(x.detach(), t), 1e-5)


def test_empty_batch():
    x = torch.randn(0, 7, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert fce.cross_entropy(x, t).item() == 0.0
    assert fce.cross_entropy(x, t, reduction="none").shape == (0,)


# ---------------------------------------------------------------- logprobs / entropy


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs(backend):
    x, t = _inputs((3, 4), 27, torch.float32)
    x.requires_grad_(True)
    lp = fce.logprobs(x, t, logit_scale=0.8, backend=backend)
    xr = x.detach().double().requires_grad_(True)
    ref = ref_logprobs(xr, t, logit_scale=0.8)
    assert lp.shape == t.shape and lp.dtype == torch.float32
    assert_close_normwise(lp, ref, 1e-5, "logprobs")
    assert (lp[t == -100] == 0).all()
    g = torch.randn(t.shape)
    lp.backward(g)
    ref.backward(g.double())
    assert_close_normwise(x.grad, xr.grad, 1e-5, "logprobs grad")
    inf = fce.logprobs(x, t, logit_scale=0.8, inference_only=True, backend=backend)
    assert inf.grad_fn is None and torch.allclose(inf, lp.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy(backend, dtype):
    x = (torch.randn(2, 5, 33) * 2).to(dtype).requires_grad_(True)
    h = fce.entropy(x, logit_scale=1.3, backend=backend)
    xr = x.detach().double().requires_grad_(True)
    ref = ref_entropy(xr, logit_scale=1.3)
    assert h.shape == (2, 5) and h.dtype == torch.float32
    assert_close_normwise(h, ref, tol(dtype), "entropy")
    g = torch.randn(2, 5)
    h.backward(g)
    ref.backward(g.double())
    assert_close_normwise(x.grad, xr.grad, tol(dtype) * 2, "entropy grad")


def test_entropy_with_neg_inf_logits():
    x = torch.randn(3, 8)
    x[:, :3] = float("-inf")
    h = fce.entropy(x)
    assert torch.isfinite(h).all()
    assert_close_normwise(h, ref_entropy(x[:, 3:]), 1e-5)


# ---------------------------------------------------------------- module


def test_module_form():
    w = torch.rand(17)
    mod = fce.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    x, t = _inputs((5,), 17, torch.float32)
    assert_close_normwise(mod(x, t), ref_cross_entropy(x, t, weight=w, label_smoothing=0.1,
                                                       reduction="sum"), 1e-5)
    assert "label_smoothing" in repr(mod)


@pytest.mark.parametrize("bad, exc", [
    (dict(reduction="avg"), ValueError), (dict(reductoin="sum"), TypeError),
    (dict(softcap=-1.0), ValueError), (dict(label_smoothing=2.0), ValueError),
    (dict(bias=None), TypeError), (dict(backend="cuda"), ValueError),
])
def test_module_forms_check_their_options_at_construction(bad, exc):
    """A bad or unknown option fails when the module is built, not at its first call."""
    for module in (fce.CrossEntropyLoss, fce.LinearCrossEntropyLoss):
        with pytest.raises(exc):
            module(**bad)
    fce.LinearCrossEntropyLoss(chunk_size=64, reduce_hidden_grad=False, z_loss=1e-3)
    with pytest.raises(ValueError, match="chunk_size"):
        fce.LinearCrossEntropyLoss(chunk_size=0)


def test_matches_torch_functional_exactly_in_fp64_sense():
    x = torch.randn(64, 100)
    t = torch.randint(0, 100, (64,))
    assert abs(fce.cross_entropy(x, t).item() - F.cross_entropy(x, t).item()) < 1e-5


# ---------------------------------------------------------------- bad input


def _poisoned():
    x = torch.randn(4, 10, requires_grad=True)
    return x, torch.randint(0, 10, (4,))


@pytest.mark.parametrize("bad, exc, match", [
    (dict(target=torch.tensor([0, 1, 10, 2])), ValueError, "target.*10"),
    (dict(target=torch.tensor([0, -1, 3, 2])), ValueError, "target.*-1"),
    # beside ignored rows (the targets' own extremes do not settle the check)
    (dict(target=torch.tensor([0, -100, 10, 2])), ValueError, "target.*10"),
    (dict(target=torch.tensor([-100, -5, 3, 2])), ValueError, "target.*-5"),
    (dict(target=torch.tensor([3, 3, 11, 2]), ignore_index=3), ValueError, "target.*11"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target.*shape"),
    (dict(target=torch.zeros(4)), TypeError, "target.*int"),
    (dict(logits=torch.zeros(4, 10, dtype=torch.long)), TypeError, "logits"),
    (dict(weight=torch.ones(9)), ValueError, "weight"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.01), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=torch.tensor(0.1)), TypeError, "label_smoothing"),
    (dict(z_loss=True), TypeError, "z_loss"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(ignore_index=2**64), ValueError, "ignore_index"),
    (dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer"),
    (dict(normalizer=torch.tensor(-2.0)), ValueError, "normalizer"),
    (dict(normalizer=torch.tensor(float("inf"))), ValueError, "normalizer"),
    (dict(normalizer=torch.tensor(True)), TypeError, "normalizer"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-3.0), ValueError, "softcap"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(reduction="none", normalizer=2.0), ValueError, "normalizer"),
    (dict(normalizer=0.0), ValueError, "normalizer"),
    (dict(vocab_start=5), ValueError, "vocab_start"),
    (dict(target=[0, 1, 2, 3]), TypeError, "target.*Tensor"),
    (dict(target=None), TypeError, "target.*Tensor"),
    (dict(target=torch.zeros(4, dtype=torch.int16)), TypeError, "target.*int"),
    (dict(target=torch.zeros(4, dtype=torch.bool)), TypeError, "target.*int"),
    (dict(tp_group="tp"), TypeError, "tp_group"),
])
def test_bad_input(bad, exc, match):
    x, t = _poisoned()
    kw = dict(bad)
    logits = kw.pop("logits", x)
    target = kw.pop("target", t)
    x0 = x.detach().clone()
    with pytest.raises(exc, match=match):
        fce.cross_entropy(logits, target, **kw)
    assert torch.equal(x.detach(), x0) and x.grad is None
    # a forward that keeps nothing takes other paths: the same error
    with pytest.raises(exc, match=match), torch.no_grad():
        fce.cross_entropy(logits, target, **kw)


def test_type_errors_are_value_errors_too():
    """A bad type or dtype raises fce.InputError, a TypeError and a ValueError at once (the
    spec says bad targets raise ValueError; Python says a wrong type is a TypeError): the
    same for logprobs, the module form, entropy and the linear functions."""
    assert issubclass(fce.InputError, TypeError) and issubclass(fce.InputError, ValueError)
    x, t = _poisoned()
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    calls = [
        lambda: fce.cross_entropy(x, t.float()),
        lambda: fce.cross_entropy(x, [0, 1, 2, 3]),
        lambda: fce.cross_entropy(x.detach().long(), t),
        lambda: fce.cross_entropy(x, t, weight=[1.0] * 10),
        lambda: fce.logprobs(x, t.to(torch.uint8)),
        lambda: fce.logprobs(x, None),
        lambda: fce.CrossEntropyLoss()(x, t.double()),
        lambda: fce.entropy([1.0, 2.0]),
        lambda: fce.cross_entropy(x, t, tp_group=object()),
        lambda: fce.linear_cross_entropy(h, w, t.float()),
        lambda: fce.linear_cross_entropy(h, w, [0, 1, 2, 3]),
        lambda: fce.linear_cross_entropy(h, w, t, tp_group=3),
        lambda: fce.linear_logprobs(h, w.long(), t),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, fce.InputError), info.value
    assert x.grad is None


def test_linear_signature_matches_cross_entropy():
    """linear_cross_entropy takes cross_entropy's loss options with the same defaults."""
    import inspect

    ce = inspect.signature(fce.cross_entropy).parameters
    lin = inspect.signature(fce.linear_cross_entropy).parameters
    for name, p in ce.items():
        if name in ("logits", "target", "weight"):
            continue
        assert name in lin and lin[name].default == p.default, name
    assert lin["class_weight"].default is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_non_finite_logits_get_zero_gradient(backend):
    """Ignored rows contribute 0 loss and exactly 0 gradient even where their logits are
    NaN, +inf or all -inf (a masked padding row): 0 * exp(z - lse) would be NaN there and
    reach the parameters while the loss looks fine. Valid rows keep F.cross_entropy's
    values; logprobs gives +0.0 on ignored rows."""
    V = 7
    x = torch.randn(5, V) * 2
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    t = torch.tensor([2, -100, -100, -100, 5])
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    for extra in ({}, {"reduction": "none"}, {"inplace_backward": True}):
        leaf = x.clone().requires_grad_(True)
        xi = leaf.clone() if extra.get("inplace_backward") else leaf
        loss = fce.cross_entropy(xi, t, backend=backend, **kw, **extra)
        loss.sum().backward()
        assert torch.isfinite(loss).all()
        assert torch.count_nonzero(leaf.grad[1:4]) == 0, leaf.grad[1:4]
        assert torch.isfinite(leaf.grad).all()
        keep = torch.tensor([0, 4])
        ref = x[keep].double().requires_grad_(True)
        r = ref_cross_entropy(ref, t[keep], reduction="sum", **kw)
        r.backward()
        if extra.get("reduction") != "none":
            assert_close_normwise(leaf.grad[keep] * 2, ref.grad, 1e-5, "valid rows")
    leaf = x.clone().requires_grad_(True)
    lp = fce.logprobs(leaf, t, backend=backend)
    lp.sum().backward()
    assert torch.equal(lp[1:4], torch.zeros(3)) and not torch.signbit(lp[1:4]).any()
    assert torch.count_nonzero(leaf.grad[1:4]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_with_a_wide_ignore_index(backend):
    """int32 targets and an ignore_index outside the int32 range: no row is ignored (compared
    in int32, 2**32 would wrap onto class 0); the same as with int64 targets."""
    x = torch.randn(4, 6)
    t = torch.tensor([0, 1, 0, 5], dtype=torch.int32)
    for ii in (2**32, 2**40, -2**33):
        got = fce.cross_entropy(x, t, ignore_index=ii, reduction="none", backend=backend)
        want = fce.cross_entropy(x, t.long(), ignore_index=ii, reduction="none",
                                 backend=backend)
        assert torch.equal(got, want) and torch.count_nonzero(got) == 4
        h, w = torch.randn(4, 3), torch.randn(6, 3)
        got = fce.linear_cross_entropy(h, w, t, ignore_index=ii, reduction="none")
        assert torch.count_nonzero(got) == 4


def test_label_smoothing_one_is_the_uniform_target():
    """label_smoothing = 1 (allowed by F.cross_entropy): the loss against the uniform
    distribution, with and without class weights."""
    x = torch.randn(6, 7, dtype=torch.float64)
    t = torch.tensor([0, 1, -100, 3, 4, 5])
    w = torch.rand(7, dtype=torch.float64) + 0.1
    for kw in ({}, {"weight": w}):
        a = x.float().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        la = fce.cross_entropy(a, t, label_smoothing=1.0, **{k: v.float() for k, v in kw.items()})
        lb = F.cross_entropy(b, t, label_smoothing=1.0, **kw)
        la.backward()
        lb.backward()
        assert_close_normwise(la, lb, 1e-6, "loss")
        assert_close_normwise(a.grad, b.grad, 1e-5, "grad")


def test_validation_switch():
    x = torch.randn(3, 5)
    t = torch.tensor([0, 7, 1])
    with pytest.raises(ValueError):
        fce.cross_entropy(x, t)
    with fce.validation(False):
        assert not fce.validation_enabled()
        fce.cross_entropy(x, torch.tensor([0, 4, 1]))
    assert fce.validation_enabled()


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        fce.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")


def test_torch_compile_fullgraph_cpu():
    x = torch.randn(8, 50, requires_grad=True)
    t = torch.randint(0, 50, (8,))
    f = torch.compile(lambda a, b: fce.cross_entropy(a, b, label_smoothing=0.1, z_loss=1e-3),
                      fullgraph=True)
    loss = f(x, t)
    loss.backward()
    xr = x.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(xr, t, label_smoothing=0.1, z_loss=1e-3)
    ref.backward()
    assert_close_normwise(loss, ref, 1e-5, "compiled loss")
    assert_close_normwise(x.grad, xr.grad, 1e-5, "compiled grad")


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 4)])
def test_torch_compile_fullgraph_leading_dims(shape):
    """[B, T, V] and [B, T, U, V] logits under torch.compile(fullgraph=True): the unused
    outputs and the [B * T, V] view stay traceable (Dynamo's backward speculation, AOT
    functionalisation of the in-place gradient), for every reduction and in place."""
    V = 19
    t = torch.randint(0, V, shape)
    t[0, 0] = -100
    for kw in (dict(label_smoothing=0.1), dict(inplace_backward=True),
               dict(reduction="none", z_loss=1e-3)):
        x0 = torch.randn(*shape, V)
        x = x0.clone().requires_grad_(True)

        def f(a):
            a = a * 1.0 if kw.get("inplace_backward") else a  # (a non-leaf to write into)
            return fce.cross_entropy(a, t, **kw)

        torch._dynamo.reset()
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        loss.sum().backward()
        ref_kw = {k: v for k, v in kw.items() if k != "inplace_backward"}
        xr = x0.double().requires_grad_(True)
        ref = ref_cross_entropy(xr, t, **ref_kw)
        ref.sum().backward()
        assert_close_normwise(loss.detach(), ref.detach(), 1e-5, f"compiled loss {kw}")
        assert_close_normwise(x.grad, xr.grad, 1e-5, f"compiled grad {kw}")
    for name, fn, ref_fn in (("logprobs", lambda a: fce.logprobs(a, t.clamp_min(0)),
                              lambda a: ref_logprobs(a, t.clamp_min(0))),
                             ("entropy", fce.entropy, ref_entropy)):
        x = torch.randn(*shape, V, requires_grad=True)
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
        xr = x.detach().double().requires_grad_(True)
        ref = ref_fn(xr)
        ref.sum().backward()
        assert_close_normwise(out.detach(), ref.detach(), 1e-5, f"compiled {name}")
        assert_close_normwise(x.grad, xr.grad, 1e-5, f"compiled {name} grad")


def test_torch_compile_dynamic_true():
    """torch.compile(dynamic=True): the option checks trace with symbolic floats (no
    math.isfinite), and one graph serves new N and V."""
    fns = {
        "ce": lambda x, t: fce.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3,
                                             normalizer=4.0),
        "logprobs": lambda x, t: fce.logprobs(x, t).sum(),
        "entropy": lambda x, t: fce.entropy(x, logit_scale=1.5).sum(),
        "linear": lambda x, t: fce.linear_cross_entropy(x[..., :5], x[:3, :5] if x.dim() == 2
                                                        else x[0, :3, :5], t.clamp_max(2)),
    }
    shapes = [(2, 5, 13), (3, 4, 11)]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12):
        # torch 2.11's Dynamo loses a symbolic size of [N, V] logits through the torch
        # backend's autograd.Function (an internal assertion in overwrite_tensor_vt_proxy);
        # the Triton backend's path compiles there (tests/test_gpu.py)
        shapes = [(6, 11), (9, 13)] + shapes
    for name, fn in fns.items():
        torch._dynamo.reset()
        cf = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
        for shape in shapes:
            x = torch.randn(*shape, requires_grad=True)
            t = torch.randint(0, shape[-1], shape[:-1])
            got = cf(x, t)
            got.backward()
            g = x.grad.clone()
            x.grad = None
            want = fn(x, t)
            want.backward()
            assert_close_normwise(got.detach(), want.detach(), 1e-6, f"{name} {shape}")
            assert_close_normwise(g, x.grad, 1e-6, f"{name} grad {shape}")


@pytest.mark.parametrize("need_am", [True, False])
def test_torch_backend_row_stats_fast_path(need_am):
    """row_stats takes s from torch's softmax and skips the argmax unless asked. With the
    argmax, m is the row maximum; without it (on CPUs) the pair is (z_t, 1 / p_t) at the
    target's column, and rows whose p_t is tiny (an unlikely target) or not a number take the
    row maximum. Either way m + log s is the fp64 logsumexp and the loss log s - (z_t - m)
    is -log p_t; masked (-inf) columns add nothing and an all -inf row gives m = -inf, s = 0
    (lse = -inf); am is the first argmax or -1; chunk boundaries change nothing."""
    V = 37
    x = torch.randn(2, 5, V) * 4
    x[0, 1, :10] = float("-inf")
    x[1, 2] = float("-inf")
    x[1, 3, 5] = x[1, 3].max() + 1.0  # a clear maximum
    t = torch.randint(0, V, (10,))
    t[1] = 12  # a finite column of the partly masked row
    t[4] = 3
    x[0, 4, 3] = x[0, 4].max() - 80.0  # p_t ~ e^-80 < 2^-64: the row maximum's pair
    t[6] = -100  # ignored: the pair is taken at the clamped column 0
    opts = spec.LossOptions()
    flat = x.reshape(10, V)
    mx = flat.max(dim=-1)
    ref = torch.logsumexp(flat.double(), dim=-1)
    fin = torch.isfinite(ref)
    valid = t != -100
    tc = t.clamp(min=0)
    col = flat.gather(1, tc.unsqueeze(1)).squeeze(1)
    for rows in (None, 3):
        st = torch_backend.row_stats(x, t, opts, need_am=need_am, chunk_rows=rows)
        lse = spec.lse_of(st)
        assert_close_normwise(lse[fin], ref[fin], 1e-6, "lse")
        assert st.s[7] == 0 and lse[7] == float("-inf") and st.m[7] == float("-inf")
        assert torch.equal(st.zt[valid], col[valid]) and st.zt[6] == 0
        keep = valid & fin
        loss = st.m[keep] - st.zt[keep] + torch.log(st.s[keep])
        assert_close_normwise(loss, (ref[keep] - col[keep].double()).float(), 1e-6, "loss")
        if need_am:
            assert torch.equal(st.m, mx.values)
            assert torch.equal(st.am[fin], mx.indices[fin])
        else:
            assert (st.am == -1).all()
            at_max = torch.tensor([i in (4, 7) for i in range(10)])
            assert torch.equal(st.m[~at_max], col[~at_max])
            assert torch.equal(st.m[at_max], mx.values[at_max])


_FUSED_OPTS = [dict(), dict(label_smoothing=0.2, weight="w"), dict(z_loss=1e-2, softcap=4.0),
               dict(logit_scale=1.7, label_smoothing=0.1, z_loss=1e-3)]


@pytest.mark.parametrize("kw", _FUSED_OPTS, ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("need_am", [False, True])
def test_torch_backend_fused_matches_row_stats_and_grad(kw, dtype, inplace, need_am):
    """fused (the statistics and dx from one softmax per chunk, written into the gradient
    destination or over the logits) gives the loss rows, lse and dx of row_stats + grad
    (two softmaxes), against fp64, at chunk boundaries, with rows whose target is very
    unlikely (the row maximum's pair), masked columns, an all -inf row and NaN / inf logits
    on ignored rows (dx exactly 0 there), for fp32 and bf16 destinations."""
    V = 29
    opts = spec.LossOptions(**{k: v for k, v in kw.items() if k != "weight"})
    w = torch.rand(V) + 0.5 if "weight" in kw else None
    x = (torch.randn(11, V) * 3)
    t = torch.randint(0, V, (11,))
    x[2, t[2]] = x[2].max() - 90.0  # p_t < 2^-64
    if opts.label_smoothing == 0:
        # (smoothing puts target mass on every column: an infinite loss there)
        x[4, :9] = float("-inf")
        t[4] = 20
    x[5], t[5] = float("-inf"), -100
    x[6, 1], t[6] = float("nan"), -100
    x[7, 0], t[7] = float("inf"), -100
    x = x.to(dtype)
    terms = spec.row_terms(t, opts, V, w)
    g0 = terms.valid.float() * 0.37
    for rows in (None, 4):
        src = x.clone().unsqueeze(0)
        out = src if inplace else torch.full_like(src, float("nan"))
        st = torch_backend.fused(src, t, opts, g0=g0, terms=terms, vocab_size=V, out=out,
                                 weight_local=w, need_am=need_am, chunk_rows=rows)
        ref = torch_backend.row_stats(x.unsqueeze(0), t, opts, weight_local=w, need_am=need_am,
                                      need_sz=opts.label_smoothing > 0, chunk_rows=rows)
        lse, lse_ref = spec.lse_of(st), spec.lse_of(ref)
        fin = torch.isfinite(lse_ref)
        assert torch.equal(fin, torch.isfinite(lse))
        assert_close_normwise(lse[fin], lse_ref[fin], 1e-6, "lse")
        loss, _, _ = spec.row_loss(st, terms, opts, V)
        loss_ref, _, _ = spec.row_loss(ref, terms, opts, V)
        assert_close_normwise(loss, loss_ref, 1e-6, "loss rows")
        assert torch.equal(st.am, ref.am)
        # dx against fp64 autograd of the reference loss on the valid rows
        xr = x.double().requires_grad_(True)
        r = ref_cross_entropy(xr, t, weight=w, reduction="sum", **{
            k: v for k, v in kw.items() if k != "weight"})
        r.backward()
        dx = out.squeeze(0)
        assert dx.dtype == dtype
        assert torch.count_nonzero(dx[5:8]) == 0 and torch.isfinite(dx).all()
        keep = torch.ones(11, dtype=torch.bool)
        keep[5:8] = False
        assert_close_normwise(dx[keep] / 0.37, xr.grad[keep], max(tol(dtype), 1e-5) * 2, "dx")


def test_second_backward_recomputes_on_the_torch_backend():
    """The torch backend writes the gradient in the forward like the Triton one, yet keeps
    the logits and statistics: with retain_graph=True a second backward recomputes the
    gradient (autograd adds it again) instead of raising; with inplace_backward (the logits
    overwritten) it raises as the Triton path does."""
    x, t = _inputs((6,), 19, torch.float32)
    leaf = x.clone().requires_grad_(True)
    loss = fce.cross_entropy(leaf, t, label_smoothing=0.1, backend="torch")
    two = torch.tensor(2.0)
    loss.backward(two, retain_graph=True)
    first = leaf.grad.clone()
    loss.backward(two)
    assert_close_normwise(leaf.grad, 2 * first, 1e-6, "second backward")
    ref = x.double().requires_grad_(True)
    (2.0 * ref_cross_entropy(ref, t, label_smoothing=0.1)).backward()
    assert_close_normwise(first, ref.grad, 1e-5, "first backward")
    buf = x.clone().requires_grad_(True) * 1.0
    loss = fce.cross_entropy(buf, t, inplace_backward=True, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum"), dict(reduction="none"),
                                dict(normalizer=7.0), dict(normalizer="tensor"),
                                dict(softcap=4.0, logit_scale=1.3), dict(ignore_index=3)],
                         ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ignored", [True, False], ids=["ignored", "none_ignored"])
def test_no_grad_plain_forward_matches_the_general_path(kw, tdtype, ignored, monkeypatch):
    """A forward that keeps nothing takes the row losses -log p_t without the row statistics
    (plain_loss_rows); it gives the general path's loss against fp64 for every reduction,
    ignored rows with NaN logits (or none ignored) and chunk boundaries, counts the
    non-ignored rows, and hands the call back to the general path (None) for a very
    unlikely or masked target and, with validation off, for a target outside [0, V)."""
    kw = dict(kw)
    if kw.get("normalizer") == "tensor":
        kw["normalizer"] = torch.tensor(5.0)
    monkeypatch.setattr(torch_backend, "default_chunk_rows", lambda V, budget=None: 4)
    V = 23
    x = torch.randn(2, 7, V) * 3
    t = torch.randint(0, V, (2, 7)).to(tdtype)
    ii = kw.get("ignore_index", -100)
    if ignored:
        t[0, 2] = ii
        x[0, 2, 5] = float("nan")
    else:
        t[t == ii] = (ii + 1) % V
    opts = spec.LossOptions(**{k: v for k, v in kw.items()
                               if k in ("ignore_index", "reduction", "softcap", "logit_scale")})
    rows, count = torch_backend.plain_loss_rows(x, t.reshape(-1), opts)
    assert count == int((t != ii).sum()) and (ignored or count == 14)
    if ignored:
        assert rows[2] == 0 and not torch.signbit(rows[2])
    with torch.no_grad():
        got = fce.cross_entropy(x, t, **kw)
    want = ref_cross_entropy(x.double(), t, **kw)
    assert_close_normwise(got, want, 1e-5, "no-grad forward", floor=1.0)
    general = fce.cross_entropy(x.clone().requires_grad_(True), t, **kw)
    assert_close_normwise(got, general.detach(), 1e-6, "vs the general path", floor=1.0)
    # a target with p_t ~ e^-100 and one in a masked column: the general path's values
    x2 = x.clone()
    x2[1, 0, t[1, 0]] = x2[1, 0].nan_to_num().max() - 100.0
    x2[1, 1, t[1, 1]] = float("-inf")
    if opts.softcap is None:  # (a softcap bounds every logit: no p_t is tiny then)
        assert torch_backend.plain_loss_rows(x2, t.reshape(-1), opts) is None
    with torch.no_grad():
        got = fce.cross_entropy(x2, t, **kw)
    general = fce.cross_entropy(x2.clone().requires_grad_(True), t, **kw)
    assert torch.equal(torch.isinf(got), torch.isinf(general.detach()))
    fin = torch.isfinite(general.detach())
    assert_close_normwise(got[fin], general.detach()[fin], 1e-6, "unlikely targets", floor=1.0)
    empty, count = torch_backend.plain_loss_rows(x[:, :0], t[:, :0].reshape(-1), opts)
    assert empty.shape == (0,) and count == 0
    with torch.no_grad():
        got = fce.cross_entropy(x[:, :0], t[:, :0], **kw)
    assert got.shape == ((2, 0) if kw.get("reduction") == "none" else ()) and (got == 0).all()
    bad = t.clone()
    bad[1, 3] = V + 2
    assert torch_backend.plain_loss_rows(x, bad.reshape(-1), opts) is None
    below = t.clone()
    below[1, 4] = -5 if ii != -5 else -6
    assert torch_backend.plain_loss_rows(x, below.reshape(-1), opts) is None
    with fce.validation(False), torch.no_grad():
        got = fce.cross_entropy(x, bad, **kw)
    with fce.validation(False):
        general = fce.cross_entropy(x.clone().requires_grad_(True), bad, **kw)
    assert_close_normwise(got, general.detach(), 1e-6, "out-of-range target", floor=1.0)


def test_per_row_upstream_on_the_torch_backend_written_in_the_forward():
    """reduction="none" on fp32 CPU logits writes the rows' gradient in the forward and scales
    each row by its upstream gradient in the backward: fp64 values for random upstream
    gradients; a valid row with NaN logits and upstream 0 gets exactly 0 (as the lazy path
    and bf16 logits give), with upstream 1 NaN; a second backward through a retained graph
    adds the same gradient again."""
    V = 13
    x, t = _inputs((9,), V, torch.float32, ignore_frac=0.0)
    x[3, 2] = float("nan")
    g = torch.randn(9, dtype=torch.float64)
    g[3] = 0.0
    valid = torch.arange(9) != 3
    for dtype in (torch.float32, torch.bfloat16):
        leaf = x.clone().to(dtype).requires_grad_(True)
        rows = fce.cross_entropy(leaf, t, reduction="none", backend="torch")
        rows.backward(g.float(), retain_graph=True)
        ref = x.to(dtype).double().requires_grad_(True)
        (ref_cross_entropy(ref, t, reduction="none")[valid] * g[valid]).sum().backward()
        assert torch.count_nonzero(leaf.grad[3]) == 0
        assert_close_normwise(leaf.grad[valid], ref.grad[valid], max(tol(dtype), 1e-5) * 2,
                              f"{dtype} rows")
        first = leaf.grad.clone()
        rows.backward(g.float())
        assert_close_normwise(leaf.grad, 2 * first, max(tol(dtype), 1e-6), "second backward")
    leaf = x.clone().requires_grad_(True)
    fce.cross_entropy(leaf, t, reduction="none", backend="torch").sum().backward()
    assert torch.isnan(leaf.grad[3]).all() and torch.isfinite(leaf.grad[valid]).all()
