"""Guarantees under adversarial input: offset invariance and extreme values, in place visible
to autograd, a context-local validation switch, strict flag and meta-tensor checks, options
finite in fp32, bf16 gradients rounded once, and a differentiable lse (both backends; Triton
through the interpreter)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import fusedce as fce
from oracle import assert_close_normwise, ref_cross_entropy, ref_entropy, ref_logprobs
from test_core import BACKENDS as CPU_BACKENDS

FP32_MAX = torch.finfo(torch.float32).max
# on a GPU machine the same tests run on CUDA tensors (the compiled Triton kernels); on the
# CPU the Triton kernels run through the interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEV == "cuda" else CPU_BACKENDS


@pytest.fixture(autouse=True)
def _default_device():
    if DEV == "cpu":
        yield
        return
    torch.set_default_device(DEV)
    try:
        yield
    finally:
        torch.set_default_device(None)


# ---------------------------------------------------------------------------- offsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e6, 1e8, 2.5e38])
def test_equal_large_logits_give_log_v(backend, offset):
    """A row of equal logits gives log V and gradient 1/V - [j = t], whatever their value
    (F.cross_entropy in fp32 does; (m + log s) - z_t would give 0 and gradient 1)."""
    V = 1000
    x = torch.full((3, V), offset, requires_grad=True)
    t = torch.tensor([1, 2, 999])
    loss = fce.cross_entropy(x, t, backend=backend)
    assert abs(loss.item() - math.log(V)) < 1e-5
    loss.backward()
    expect = torch.full((3, V), 1.0 / V / 3)
    expect[torch.arange(3), t] -= 1.0 / 3
    assert torch.allclose(x.grad, expect, atol=1e-7)
    lp = fce.logprobs(x.detach(), t, backend=backend)
    assert torch.allclose(lp, torch.full((3,), -math.log(V)), atol=1e-5)
    h = fce.entropy(x.detach(), backend=backend)
    assert torch.allclose(h, torch.full((3,), math.log(V)), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_offset_invariance_random_rows(backend, offset):
    """A common offset changes no output beyond the fp32 rounding of the differences: the
    offset rows' fp32 values are exact, so the fp64 reference is taken of those values."""
    V = 300
    x = (torch.randn(6, V) * 2 + offset).requires_grad_(True)
    t = torch.randint(0, V, (6,))
    t[2] = -100
    xr = x.detach().double().requires_grad_(True)
    # (a power-of-two scale: other scales round z = scale * x itself at this magnitude)
    for kw in (dict(), dict(z_loss=1e-6), dict(logit_scale=0.5)):
        loss = fce.cross_entropy(x, t, backend=backend, **kw)
        ref = ref_cross_entropy(xr, t, **kw)
        # the reference differences are those of the rounded fp32 inputs: errors are a few
        # ulps of the row's magnitude times the gradient's sensitivity
        assert_close_normwise(loss, ref, 1e-5, f"loss {kw}", floor=1.0)
        (g,) = torch.autograd.grad(loss, x)
        (gr,) = torch.autograd.grad(ref, xr)
        assert_close_normwise(g, gr, 1e-4, f"grad {kw}")
    lp = fce.logprobs(x.detach(), t, backend=backend)
    assert_close_normwise(lp, ref_logprobs(x.detach(), t), 1e-5, "logprobs", floor=1.0)
    xe = x.detach().clone().requires_grad_(True)
    h = fce.entropy(xe, backend=backend)
    xer = x.detach().double().requires_grad_(True)
    hr = ref_entropy(xer)
    assert_close_normwise(h, hr, 1e-5, "entropy", floor=1.0)
    g = torch.randn(6)
    (dh,) = torch.autograd.grad(h, xe, g)
    (dhr,) = torch.autograd.grad(hr, xer, g.double())
    assert_close_normwise(dh, dhr, 1e-4, "entropy grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_near_fp32_max_are_finite(backend):
    """Finite logits up to the fp32 maximum give finite loss, lse and gradient."""
    V = 64
    x = torch.randn(4, V)
    x[0] = FP32_MAX
    x[1, 5] = 3.0e38
    x[1, 6] = 2.9e38
    x[2] = torch.linspace(2.4e38, 3.3e38, V)
    x.requires_grad_(True)
    t = torch.tensor([0, 5, 63, 3])
    out = fce.cross_entropy(x, t, backend=backend, reduction="none", return_aux=True)
    assert torch.isfinite(out.loss).all(), (out.loss, x[1].tolist())
    assert torch.isfinite(out.lse).all(), out.lse
    out.loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    ref = torch.nn.functional.cross_entropy(x.detach().double(), t, reduction="none")
    assert torch.allclose(out.loss.double(), ref, rtol=1e-5, atol=1e-4)
    h = fce.entropy(x.detach(), backend=backend)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_gradient_accuracy_matches_torch_fp32(backend):
    """The softcap's tanh keeps its relative accuracy where |x| << cap (the usual case): the
    gradient's error against fp64 is no worse than torch's fp32 computation of it."""
    # the worst element over 256 rows: the maximum of many relative errors varies little
    # from draw to draw (fewer rows make the ratio below a coin toss near its bound)
    V, cap = 512, 30.0
    x = torch.randn(256, V) * 2.0
    t = torch.randint(0, V, (256,))

    def worst(g, gr):
        return float(((g.double() - gr).abs() / gr.abs().clamp_min(1e-30)).max())

    xr = x.double().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref_cross_entropy(xr, t, softcap=cap, reduction="sum"), xr)
    xt = x.clone().requires_grad_(True)
    zt = cap * torch.tanh(xt / cap)
    (g_torch,) = torch.autograd.grad(torch.nn.functional.cross_entropy(zt, t, reduction="sum"), xt)
    xf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fce.cross_entropy(xf, t, softcap=cap, reduction="sum",
                                                 backend=backend), xf)
    assert worst(g, gr) <= max(1.6 * worst(g_torch, gr), 1e-6), (worst(g, gr), worst(g_torch, gr))


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw,name", [
    (dict(softcap=1e39), "softcap"), (dict(logit_scale=1e39), "logit_scale"),
    (dict(normalizer=4e-240, reduction="sum"), "normalizer"), (dict(z_loss=1e39), "z_loss"),
    (dict(softcap=10**400), "softcap"), (dict(logit_scale=10**400), "logit_scale"),
    (dict(z_loss=10**400), "z_loss"), (dict(normalizer=10**400), "normalizer"),
    (dict(softcap=1e-40), "softcap"), (dict(logit_scale=1e-50), "logit_scale"),
    (dict(softcap=1e-30, logit_scale=1e10), "softcap"),
    (dict(normalizer=torch.tensor(1e-300, dtype=torch.float64)), "normalizer"),
])
def test_options_not_finite_in_fp32_raise(kw, name):
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=name):
        fce.cross_entropy(x, t, **kw)
    assert x.grad is None


@pytest.mark.parametrize("flag", ["inplace_backward", "return_aux", "differentiable_lse"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, 1.0])
def test_flags_must_be_bools(flag, value):
    x = torch.randn(4, 10)
    keep = x.clone()
    t = torch.randint(0, 10, (4,))
    with pytest.raises(fce.InputError, match=flag):
        fce.cross_entropy(x.requires_grad_(True), t, **{flag: value})
    assert torch.equal(x.detach(), keep)  # nothing written


def test_inference_only_must_be_bool():
    with pytest.raises(fce.InputError, match="inference_only"):
        fce.logprobs(torch.randn(3, 7), torch.zeros(3, dtype=torch.long), inference_only="yes")


def test_meta_tensors_are_input_errors():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(fce.InputError, match="logits"):
        fce.cross_entropy(x.to("meta"), t.to("meta"))
    with pytest.raises(fce.InputError, match="target"):
        fce.cross_entropy(x, t.to("meta"))
    with pytest.raises(fce.InputError, match="normalizer"):
        fce.cross_entropy(x, t, reduction="sum", normalizer=torch.tensor(2.0, device="meta"))
    with pytest.raises(fce.InputError, match="weight"):
        fce.cross_entropy(x, t, weight=torch.ones(10, device="meta"))
    with pytest.raises(fce.InputError, match="logits"):
        fce.entropy(x.to("meta"))
    with pytest.raises(fce.InputError, match="logits"):
        fce.logprobs(x.to("meta"), t.to("meta"))


# ---------------------------------------------------------------------------- in place


# producers whose backward reads their own output
_SAVING = {
    "exp": lambda a: a.exp(),
    "tanh": lambda a: torch.tanh(a),
    "sigmoid": lambda a: torch.sigmoid(a),
    "relu": lambda a: torch.relu(a),
    "softcap": lambda a: torch.tanh(a / 10.0).mul(10.0).tanh(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("producer", sorted(_SAVING))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_through_a_saving_producer_raises(backend, producer, reduction):
    """inplace_backward overwrites the logits: an op that saved them for its own backward
    must make backward raise (never differentiate the overwritten values)."""
    a = torch.randn(4, 33, requires_grad=True)
    t = torch.randint(0, 33, (4,))
    logits = _SAVING[producer](a)
    loss = fce.cross_entropy(logits, t, inplace_backward=True, backend=backend,
                             reduction=reduction)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_through_matmul_and_views_works(backend, reduction):
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    g = torch.randn(6) if reduction == "none" else torch.tensor(1.0)
    loss = fce.cross_entropy(h @ w.t(), t, inplace_backward=True, backend=backend,
                             reduction=reduction)
    loss.backward(g)
    hr, wr = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref_cross_entropy(hr @ wr.t(), t, reduction=reduction).backward(g.double())
    assert_close_normwise(h.grad, hr.grad, 1e-5, "dh")
    assert_close_normwise(w.grad, wr.grad, 1e-5, "dw")
    # a view of a leaf
    leaf = torch.randn(2, 5, 41, requires_grad=True)
    x0 = leaf.detach().clone()
    tt = torch.randint(0, 40, (2, 4))
    fce.cross_entropy(leaf[:, :-1, :40], tt, inplace_backward=True, backend=backend).backward()
    xr = x0[:, :-1, :40].double().requires_grad_(True)
    ref_cross_entropy(xr, tt).backward()
    assert_close_normwise(leaf.grad[:, :-1, :40], xr.grad, 1e-5, "view grad")
    assert torch.count_nonzero(leaf.grad[:, -1]) == 0
    # a softcap written as cap * tanh(x / cap): the product saves nothing of its output
    a = torch.randn(4, 33, requires_grad=True)
    ar = a.detach().double().requires_grad_(True)
    t4 = torch.randint(0, 33, (4,))
    fce.cross_entropy(10.0 * torch.tanh(a / 10.0), t4, inplace_backward=True,
                      backend=backend).backward()
    ref_cross_entropy(10.0 * torch.tanh(ar / 10.0), t4).backward()
    assert_close_normwise(a.grad, ar.grad, 1e-5, "softcap by hand")


# ---------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_per_row_upstream_gradient_rounded_once(backend, dtype):
    """reduction="none" with a per-token upstream gradient (RL advantages): the bf16 / fp16
    gradient is the fp32 gradient rounded once (not written in the forward and scaled)."""
    V = 96
    x = (torch.randn(16, V) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (16,))
    g = torch.randn(16) * 3
    fce.cross_entropy(x, t, reduction="none", backend=backend).backward(g)
    xr = x.detach().double().requires_grad_(True)
    ref_cross_entropy(xr, t, reduction="none").backward(g.double())
    once = xr.grad.to(dtype)
    diff = (x.grad.double() - once.double()).abs()
    ulp = once.double().abs().clamp_min(1e-30) * (2.0 ** -7 if dtype == torch.bfloat16
                                                  else 2.0 ** -10)
    # the fp32 computation may sit on the other side of a rounding boundary from fp64:
    # a few elements, never more than one ulp
    assert (diff <= ulp * 1.01).all()
    assert (diff > 0).float().mean() < 0.03, float((diff > 0).float().mean())


# ---------------------------------------------------------------------------- validation


def test_validation_block_is_thread_local():
    """A thread inside validation(False) does not turn another thread's checks off, and
    overlapping blocks restore the default."""
    x = torch.randn(4, 10)
    bad = torch.tensor([0, 1, 10, 2])
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def quiet():
        with fce.validation(False):
            inside.set()
            release.wait(10)
            seen["quiet"] = fce.validation_enabled()

    th = threading.Thread(target=quiet)
    th.start()
    assert inside.wait(10)
    try:
        assert fce.validation_enabled()
        with pytest.raises(ValueError, match="target"):
            fce.cross_entropy(x, bad)
    finally:
        release.set()
        th.join(10)
    assert seen["quiet"] is False
    # overlapping blocks in two threads, exited out of order
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with fce.validation(False):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with fce.validation(False):
            b_in.set()
            a_out.wait(10)

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(10)
    assert fce.validation_enabled()
    with pytest.raises(ValueError, match="target"):
        fce.cross_entropy(x, bad)


def test_set_validation_is_the_process_default():
    x = torch.randn(4, 10)
    bad = torch.tensor([0, 1, 10, 2])
    try:
        fce.set_validation(False)
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("v", fce.validation_enabled()))
        th.start()
        th.join(10)
        assert res["v"] is False
        with fce.validation(True):
            with pytest.raises(ValueError, match="target"):
                fce.cross_entropy(x, bad)
    finally:
        fce.set_validation(True)
    with pytest.raises(fce.InputError, match="enabled"):
        fce.set_validation("no")


def test_validation_is_task_local():
    import asyncio

    async def quiet(ev_in, ev_go):
        with fce.validation(False):
            ev_in.set()
            await ev_go.wait()
            return fce.validation_enabled()

    async def loud(ev_in, ev_go):
        await ev_in.wait()
        v = fce.validation_enabled()
        ev_go.set()
        return v

    async def main():
        ev_in, ev_go = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(quiet(ev_in, ev_go), loud(ev_in, ev_go))

    assert asyncio.run(main()) == [False, True]


# ---------------------------------------------------------------------------- lse


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_lse(backend):
    V = 50
    x = (torch.randn(2, 5, V) * 2).requires_grad_(True)
    t = torch.randint(0, V, (2, 5))
    t[0, 1] = -100
    out = fce.cross_entropy(x, t, return_aux=True, differentiable_lse=True, softcap=8.0,
                            logit_scale=1.3, z_loss=1e-3, backend=backend)
    assert out.lse.requires_grad and out.lse.shape == t.shape
    obj = out.loss + 0.01 * (out.lse ** 2).mean()
    obj.backward()
    xr = x.detach().double().requires_grad_(True)
    ref_loss = ref_cross_entropy(xr, t, softcap=8.0, logit_scale=1.3, z_loss=1e-3)
    z = 8.0 * torch.tanh(xr * 1.3 / 8.0)
    lse = torch.logsumexp(z, dim=-1)
    assert_close_normwise(out.lse, lse, 1e-6, "lse")
    (ref_loss + 0.01 * (lse ** 2).mean()).backward()
    assert_close_normwise(x.grad, xr.grad, 1e-5, "grad with lse term")
    # without the option the lse carries no gradient
    out2 = fce.cross_entropy(x.detach().requires_grad_(True), t, return_aux=True,
                             backend=backend)
    assert not out2.lse.requires_grad
    with pytest.raises(ValueError, match="inplace_backward"):
        fce.cross_entropy(x, t, return_aux=True, differentiable_lse=True, inplace_backward=True)


def test_compat_entry_points_are_offset_invariant():
    """The seed adapters inherit the core's offset invariance (equal logits 1e8: log V)."""
    from fusedce.compat import nemo_automodel, nemo_rl, torch_npu, transformer_engine

    V = 500
    x = torch.full((1, 4, V), 1e8)
    t = torch.tensor([[1, 2, 3, 499]])
    logv = math.log(V)
    ls = nemo_rl._compute_distributed_log_softmax(x, None)
    assert torch.allclose(ls, torch.full_like(ls, -logv), atol=1e-5)
    lp = nemo_rl.from_parallel_logits_to_logprobs(x, t, 0, V, None)
    assert torch.allclose(lp, torch.full_like(lp, -logv), atol=1e-5)
    loss, log_prob, _, _ = torch_npu.npu_cross_entropy_loss(x[0], t[0], reduction="none")
    assert torch.allclose(loss.float(), torch.full((4,), logv), atol=1e-5)
    assert torch.allclose(log_prob.float(), torch.full((4, V), -logv), atol=1e-5)
    te = transformer_engine.parallel_cross_entropy(x.clone(), t, 0.0, False, None)
    assert torch.allclose(te.float(), torch.full_like(te.float(), logv), atol=1e-5)
    ce = nemo_automodel.ChunkedCrossEntropy(compile=False)(x, t)
    assert abs(float(ce) - 4 * logv) < 1e-3 * 4 * logv


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_differentiable_lse(backend):
    N, D, V = 9, 6, 40
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    out = fce.linear_cross_entropy(h, w, t, bias=b, return_aux=True, differentiable_lse=True,
                                   softcap=5.0, logit_scale=0.9, backend=backend)
    assert out.lse.requires_grad
    (out.loss + 0.1 * (out.lse ** 2).mean()).backward()
    hr, wr, br = (a.detach().double().requires_grad_(True) for a in (h, w, b))
    z = 5.0 * torch.tanh((hr @ wr.t() + br) * 0.9 / 5.0)
    lse = torch.logsumexp(z, -1)
    assert_close_normwise(out.lse, lse, 1e-5, "lse")
    ref = ref_cross_entropy(hr @ wr.t() + br, t, softcap=5.0, logit_scale=0.9)
    (ref + 0.1 * (lse ** 2).mean()).backward()
    for a, ar, name in ((h, hr, "dh"), (w, wr, "dw"), (b, br, "db")):
        assert_close_normwise(a.grad, ar.grad, 1e-5, name)


@pytest.mark.parametrize("flag", ["return_aux", "inplace_backward", "reduce_hidden_grad",
                                  "differentiable_lse"])
def test_linear_flags_must_be_bools(flag):
    with pytest.raises(fce.InputError, match=flag):
        fce.linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4),
                                 torch.zeros(3, dtype=torch.long), **{flag: "False"})
