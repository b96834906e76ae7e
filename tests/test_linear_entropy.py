"""RL ops from hidden states (fusedce.linear.linear_logprobs, linear_entropy) against an
fp64 oracle built from hidden @ weight.T + bias: values and the gradients of hidden, weight
and bias for log-probs, entropy and both at once (random upstream gradients on each), both
backends, fp32 / bf16 / fp16, softcap and logit_scale (temperature), ignored rows, chunk
sizes that do not divide N, frozen heads and frozen hidden states (no dW / dH work),
inference_only, poisoned internal buffers, rows whose logits all lie near 1e6 or 1e8, and
vocabulary parallelism over gloo with 2 and 3 ranks (uneven shards, DTensor heads)."""

from __future__ import annotations

import pytest
import torch

import fusedce as fce
from fusedce import linear as fce_linear
from fusedce.linear import linear_entropy, linear_logprobs
from dist_utils import progress, run_ranks
from oracle import assert_close_normwise, tol, transform64

try:
    import fusedce.triton.backend as _triton_backend  # noqa: F401

    HAS_TRITON_BACKEND = True
    TRITON_SKIP = ""
except Exception as _exc:  # pragma: no cover - depends on the platform
    HAS_TRITON_BACKEND = False
    TRITON_SKIP = f"fusedce.triton.backend is not importable ({_exc!r})"

BACKENDS = ["torch", "triton"]
MODES = ["lp", "ent", "both"]


def _backend(backend):
    if backend == "triton" and not HAS_TRITON_BACKEND:
        pytest.skip(TRITON_SKIP)
    return backend


# ---------------------------------------------------------------- helpers


def _inputs(lead, D, V, dtype, bias=True, ignore_frac=0.25, ignore_index=-100, gen=None):
    h = (torch.randn(*lead, D, generator=gen) * 1.5).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5 * 2.0).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, lead, generator=gen)
    if ignore_frac:
        drop = torch.rand(lead, generator=gen) < ignore_frac
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return h, w, b, t


def _ref(h, w, b, t, mode, *, softcap=None, logit_scale=1.0, ignore_index=-100):
    """fp64 (log-probs, entropy) as ``mode`` asks, and the leaf copies whose .grad they fill."""
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = None if b is None else b.detach().double().requires_grad_(True)
    x = hr @ wr.t()
    if br is not None:
        x = x + br
    lsm = torch.log_softmax(transform64(x, softcap, logit_scale), dim=-1)
    outs = []
    if mode in ("lp", "both"):
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        lp = lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        outs.append(torch.where(valid, lp, torch.zeros_like(lp)))
    if mode in ("ent", "both"):
        outs.append(-(lsm.exp() * lsm).sum(-1))
    return tuple(outs), (hr, wr, br)


def _call(mode, h, w, b, t, **kw):
    if mode == "lp":
        return (linear_logprobs(h, w, t, bias=b, **kw),)
    if mode == "ent":
        kw.pop("ignore_index", None)
        return (linear_entropy(h, w, bias=b, **kw),)
    return linear_logprobs(h, w, t, bias=b, return_entropy=True, **kw)


def _check(backend, dtype, mode, lead=(3, 7), D=13, V=37, bias=True, chunk_size=5,
           frozen=(), rtol=None, **kw):
    """Values and gradients (random upstream on every output) vs the fp64 oracle."""
    h, w, b, t = _inputs(lead, D, V, dtype, bias=bias, ignore_index=kw.get("ignore_index", -100))
    leaves = {"hidden": h, "weight": w, "bias": b}
    for name in frozen:
        leaves[name].requires_grad_(False)
    outs = _call(mode, h, w, b, t, chunk_size=chunk_size, backend=backend, **kw)
    refs, (hr, wr, br) = _ref(h, w, b, t, mode, **kw)
    rt = rtol or max(tol(dtype), 1e-5) * 2
    for out, ref in zip(outs, refs, strict=True):
        assert out.dtype == torch.float32 and out.shape == t.shape
        # an error relative to the logits' scale (~1), not to a tiny value
        assert_close_normwise(out, ref, rt, f"{mode} value", floor=1.0)
    if mode in ("lp", "both"):
        ignored = t == kw.get("ignore_index", -100)
        assert torch.all(outs[0][ignored] == 0) and not torch.signbit(outs[0][ignored]).any()
    gs = [torch.randn(t.shape, dtype=torch.float64) for _ in outs]
    torch.autograd.backward(list(outs), [g.float() for g in gs])
    torch.autograd.backward(list(refs), gs)
    for name, leaf, ref_leaf in (("hidden", h, hr), ("weight", w, wr), ("bias", b, br)):
        if leaf is None:
            continue
        if name in frozen:
            assert leaf.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert leaf.grad.dtype == dtype
        assert_close_normwise(leaf.grad, ref_leaf.grad, rt, f"{mode} grad {name}", floor=1e-2)


# ---------------------------------------------------------------- values and gradients

OPTION_SETS = [
    dict(),
    dict(softcap=4.0),
    dict(logit_scale=1 / 0.7),  # temperature 0.7
    dict(softcap=3.0, logit_scale=1.6, ignore_index=5),
]


def _ids(o):
    return ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in o.items()) or "default"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_ids)
def test_values_and_grads_fp32(backend, mode, opts):
    _check(_backend(backend), torch.float32, mode, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["lp", "both"])
def test_low_precision(backend, dtype, mode):
    _check(_backend(backend), dtype, mode, lead=(2, 9), D=24, V=70, chunk_size=4, softcap=6.0)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64, "auto"])
def test_chunk_sizes(chunk_size):
    # N = 23: no chunk size above divides it
    _check("torch", torch.float32, "both", lead=(23,), D=11, V=29, chunk_size=chunk_size)


def test_odd_shapes():
    for N, D, V in [(1, 1, 1), (1, 5, 2), (13, 3, 97), (5, 129, 33)]:
        _check("torch", torch.float32, "both", lead=(N,), D=D, V=V, bias=N % 2 == 1,
               chunk_size=4)


def test_empty_rows():
    h = torch.randn(0, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    lp, ent = linear_logprobs(h, w, torch.zeros(0, dtype=torch.int64), return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(w.grad) == 0 and h.grad.shape == (0, 5)


def test_matches_materialised_logits():
    """The same numbers as fce.logprobs / fce.entropy on the materialised logits."""
    h, w, b, t = _inputs((4, 6), 12, 33, torch.float32)
    lp, ent = linear_logprobs(h, w, t, bias=b, logit_scale=0.8, return_entropy=True,
                              chunk_size=5)
    x = (h @ w.t() + b).detach()
    assert torch.allclose(lp, fce.logprobs(x, t, logit_scale=0.8), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ent, fce.entropy(x, logit_scale=0.8), rtol=1e-5, atol=1e-5)
    assert torch.allclose(linear_entropy(h, w, bias=b, logit_scale=0.8), ent, atol=1e-6)


def test_one_output_used():
    """With return_entropy, an upstream gradient on one output alone gives that output's
    gradient (the other contributes nothing)."""
    h, w, b, t = _inputs((15,), 9, 31, torch.float32)
    refs, (hr, wr, br) = _ref(h, w, b, t, "both")
    for k in range(2):
        for x in (h, w, b, hr, wr, br):
            x.grad = None
        outs = linear_logprobs(h, w, t, bias=b, return_entropy=True, chunk_size=4)
        (outs[k] * 1.7).sum().backward()
        (refs[k] * 1.7).sum().backward(retain_graph=True)
        for got, exp, what in ((h.grad, hr.grad, "dh"), (w.grad, wr.grad, "dW"),
                               (b.grad, br.grad, "db")):
            assert_close_normwise(got, exp, 2e-5, f"output {k} {what}", floor=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combined_gradient_edge_rows(backend, dtype):
    """Both outputs' upstream gradients in every pattern a row can have (one of them 0, one
    tiny next to the other, both 0), on confident rows (p_t near 1, where 1 - p_t must not
    come from a difference of rounded terms) and ordinary ones."""
    be = _backend(backend)
    gen = torch.Generator().manual_seed(8)
    h, w, b, t = _inputs((16,), 12, 40, torch.float32, ignore_frac=0.0, gen=gen)
    with torch.no_grad():
        # confident rows: hidden along the target's row of the head
        h[:6] = 6.0 * w[t[:6]] / w[t[:6]].norm(dim=1, keepdim=True) ** 2 * 4.0
        h, w, b = (x.detach().to(dtype).requires_grad_(True) for x in (h, w, b))
    t[7] = -100
    g_t = torch.tensor([1.0, 0.0, 1.0, 1e-12, 0.0, -2.0, 1.0, 3.0, 0.0, 1.0, 1.0, 1e-3, 0.5,
                        -1.0, 2.0, 1.0], dtype=torch.float64)
    g_h = torch.tensor([0.0, 1.0, 1e-12, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 1e-9,
                        2.0, 0.0, 1.0], dtype=torch.float64)
    lp, ent = linear_logprobs(h, w, t, bias=b, return_entropy=True, chunk_size=5, backend=be,
                              softcap=60.0, logit_scale=1.5)
    refs, (hr, wr, br) = _ref(h, w, b, t, "both", softcap=60.0, logit_scale=1.5)
    assert refs[0][:6].min() > -0.05  # confident indeed
    torch.autograd.backward([lp, ent], [g_t.float(), g_h.float()])
    torch.autograd.backward(list(refs), [g_t, g_h])
    rt = 2e-5 if dtype == torch.float32 else 3e-2
    assert_close_normwise(h.grad, hr.grad, rt, "dh", floor=1e-2)
    assert_close_normwise(w.grad, wr.grad, rt, "dW", floor=1e-2)
    assert_close_normwise(b.grad, br.grad, rt, "db", floor=1e-2)
    # row by row, each on its own scale (a confident row's gradient is ~1e-6): in fp32 to
    # the resolution of s = 1 + (1 - p_t) / p_t, which bounds every fp32 statistic
    for r in range(16):
        if g_t[r] == 0 and g_h[r] == 0:
            assert torch.count_nonzero(h.grad[r]) == 0
        elif dtype == torch.float32:
            assert_close_normwise(h.grad[r], hr.grad[r], 1e-2, f"dh row {r}", floor=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_confident_rows_bf16(backend, mode):
    """Rows with p_t = 1 - 1e-5 and bf16 logits that are exact (grid values): each row's
    gradient to bf16 resolution of its own (tiny) scale; 1 - p_t formed as g_t - g_t p_t
    from a bf16 chunk would lose it all."""
    be = _backend(backend)
    gen = torch.Generator().manual_seed(2)
    n, V, k = 10, 40, 4
    h = torch.randint(-1, 2, (n, 8 + k), generator=gen).float()
    w = torch.randint(-3, 4, (V, 8 + k), generator=gen).float() * 0.125
    t = torch.randint(0, V, (n,), generator=gen)
    h[:, 8:] = 0.0
    w[:, 8:] = 0.0
    for r in range(k):  # row r boosts its target alone through a dimension of its own
        h[r, 8 + r] = 1.0
        w[t[r], 8 + r] = 16.0
    h = h.to(torch.bfloat16).requires_grad_(True)
    w = w.to(torch.bfloat16).requires_grad_(True)
    outs = _call(mode, h, w, None, t, chunk_size=3, backend=be)
    refs, (hr, wr, _) = _ref(h, w, None, t, mode)
    if mode != "ent":
        assert refs[0][:k].min() > -1e-4 and refs[0][:k].max() < -1e-7  # confident indeed
    gs = [torch.full((n,), 1.0, dtype=torch.float64),
          torch.full((n,), 0.5, dtype=torch.float64)][:len(outs)]
    torch.autograd.backward(list(outs), [g.float() for g in gs])
    torch.autograd.backward(list(refs), gs)
    for r in range(n):
        assert_close_normwise(h.grad[r], hr.grad[r], 2e-2, f"dh row {r}", floor=1e-9)
    assert_close_normwise(w.grad, wr.grad, 2e-2, "dW", floor=1e-9)


def test_backward_twice():
    """The graph keeps hidden and the statistics only: it can be differentiated again."""
    for frozen in (False, True):  # recomputing backward, and the frozen-head form
        h, w, _, t = _inputs((12,), 6, 15, torch.float32, bias=False)
        w.requires_grad_(not frozen)
        lp = linear_logprobs(h, w, t, chunk_size=5)
        lp.sum().backward(retain_graph=True)
        first = h.grad.clone()
        lp.sum().backward()
        assert torch.allclose(h.grad, 2 * first)


def test_noncontiguous_and_int32():
    h_leaf = torch.randn(6, 4, 10, requires_grad=True)
    hv = h_leaf.transpose(0, 1)
    w_store = torch.randn(10, 27, requires_grad=True)
    w = w_store.t()  # [V, D] with stride (1, V)
    t = torch.randint(0, 27, (4, 6), dtype=torch.int32)
    lp, ent = linear_logprobs(hv, w, t, return_entropy=True, chunk_size=5)
    (refs, (hr, wr, _)) = _ref(hv, w, None, t, "both")
    assert_close_normwise(lp, refs[0], 2e-5, "lp", floor=1.0)
    assert_close_normwise(ent, refs[1], 2e-5, "ent", floor=1.0)
    (lp.sum() + 0.5 * ent.sum()).backward()
    (refs[0].sum() + 0.5 * refs[1].sum()).backward()
    assert_close_normwise(h_leaf.grad.transpose(0, 1), hr.grad, 2e-5, "dh")
    assert_close_normwise(w_store.grad.t(), wr.grad, 2e-5, "dW")


def test_autocast_cpu():
    h, w, b, t = _inputs((10,), 8, 17, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ent = linear_entropy(h, w, bias=b)
    ent.sum().backward()
    assert ent.dtype == torch.float32 and w.grad.dtype == torch.float32
    refs, (_, wr, _) = _ref(h, w, b, t, "ent")
    refs[0].sum().backward()
    assert_close_normwise(ent, refs[0], 2e-2, "entropy", floor=1.0)
    assert_close_normwise(w.grad, wr.grad, 5e-2, "dW")


# ---------------------------------------------------------------- frozen inputs: no work


class _Spy:
    """Counts the logits GEMMs (rows per chunk) and the dW GEMMs of fusedce.linear."""

    def __init__(self, monkeypatch):
        self.logit_rows = []
        self.dw_calls = 0
        self.dh_buffers = []
        orig_logits = fce_linear._logits_into
        orig_dw = fce_linear._accumulate_dw
        orig_grads = fce_linear._Grads

        def logits_into(h, w, b, out):
            self.logit_rows.append(out.shape[0])
            orig_logits(h, w, b, out)

        def accumulate_dw(*a, **k):
            self.dw_calls += 1
            orig_dw(*a, **k)

        spy = self

        class Grads(orig_grads):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                spy.dh_buffers.append(self.dh is not None)

        monkeypatch.setattr(fce_linear, "_logits_into", logits_into)
        monkeypatch.setattr(fce_linear, "_accumulate_dw", accumulate_dw)
        monkeypatch.setattr(fce_linear, "_Grads", Grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_frozen_head_no_dw(mode, backend, monkeypatch):
    """LoRA / frozen LM head: no dW GEMM, weight.grad stays None, dH exact. One output
    takes the forward-time dH (the logits of each chunk are formed once); both outputs take
    the recomputing backward (twice)."""
    spy = _Spy(monkeypatch)
    _check(_backend(backend), torch.float32, mode, lead=(21,), D=9, V=31, chunk_size=6,
           frozen=("weight", "bias"))
    assert spy.dw_calls == 0
    assert sum(spy.logit_rows) == (21 if mode != "both" else 42)
    assert max(spy.logit_rows) <= 6


@pytest.mark.parametrize("mode", MODES)
def test_frozen_hidden_no_dh(mode, monkeypatch):
    spy = _Spy(monkeypatch)
    _check("torch", torch.float32, mode, lead=(13,), D=7, V=23, chunk_size=4,
           frozen=("hidden",))
    assert spy.dh_buffers == [False] and spy.dw_calls == 4


def test_frozen_head_bf16_and_ignored_rows(monkeypatch):
    spy = _Spy(monkeypatch)
    _check("torch", torch.bfloat16, "lp", lead=(3, 11), D=16, V=50, chunk_size=7,
           frozen=("weight", "bias"), softcap=5.0, logit_scale=1.3)
    assert spy.dw_calls == 0


@pytest.mark.parametrize("mode", MODES)
def test_inference_only(mode, monkeypatch):
    spy = _Spy(monkeypatch)
    h, w, b, t = _inputs((17,), 8, 29, torch.float32)
    outs = _call(mode, h, w, b, t, chunk_size=5, inference_only=True, softcap=7.0)
    refs, _ = _ref(h, w, b, t, mode, softcap=7.0)
    for out, ref in zip(outs, refs, strict=True):
        assert not out.requires_grad and out.grad_fn is None
        assert_close_normwise(out, ref, 2e-5, "inference", floor=1.0)
    assert sum(spy.logit_rows) == 17 and spy.dw_calls == 0 and spy.dh_buffers == []
    with torch.no_grad():
        again = _call(mode, h, w, b, t, chunk_size=5, softcap=7.0)
    for a, c in zip(outs, again, strict=True):
        assert torch.equal(a, c) and not c.requires_grad


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_nan_logits(backend):
    """Ignored rows give +0.0 log-probs and no log-prob gradient, whatever their logits
    hold (+-inf here, from a hidden state whose products overflow fp32); their entropy is
    their row's entropy (not finite for such a row), and a zero upstream gradient there
    leaves every gradient finite."""
    h, w, b, t = _inputs((9,), 6, 21, torch.float32, ignore_frac=0.0)
    t[2] = -100
    t[5] = -100
    with torch.no_grad():
        h[2] = 3e38
    be = _backend(backend)
    lp, ent = linear_logprobs(h, w, t, bias=b, return_entropy=True, chunk_size=4, backend=be)
    assert lp[2].item() == 0.0 and not torch.signbit(lp[[2, 5]]).any()
    assert not torch.isfinite(ent[2]) and torch.isfinite(ent[torch.arange(9) != 2]).all()
    g_ent = torch.ones(9)
    g_ent[2] = 0.0
    torch.autograd.backward([lp, ent], [torch.ones(9), g_ent])
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert torch.isfinite(b.grad).all() and torch.count_nonzero(h.grad[2]) == 0
    # without entropy, an ignored row has no gradient at all
    h.grad = None
    linear_logprobs(h, w, t, bias=b, chunk_size=4, backend=be).sum().backward()
    assert torch.count_nonzero(h.grad[[2, 5]]) == 0 and torch.isfinite(w.grad).all()
    # the entropy of an ignored finite row is its entropy, with its gradient
    refs, _ = _ref(h, w, b, t, "ent")
    assert abs(ent[5].item() - refs[0][5].item()) < 1e-5


def _grid_inputs(offset, step, n=12, D=6, V=40, seed=0):
    """Inputs whose fp32 logits are exact: hidden in {-1, 0, 1}, weight on a grid of
    ``step``, a bias of ``offset`` (the partial sums are multiples of ``step`` below 2**24
    steps, so every GEMM order gives the same exact logits)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(-1, 2, (n, D), generator=gen).float().requires_grad_(True)
    w = (torch.randint(-3, 4, (V, D), generator=gen).float() * step).requires_grad_(True)
    b = (torch.full((V,), float(offset)) + torch.randint(-2, 3, (V,), generator=gen).float()
         * step).requires_grad_(True)
    t = torch.randint(0, V, (n,), generator=gen)
    t[3] = -100
    return h, w, b, t


@pytest.mark.parametrize("offset,step,scale", [(1e6, 0.125, 1.0), (1e8, 8.0, 1 / 16)],
                         ids=["1e6", "1e8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_rows(offset, step, scale, backend):
    """All logits of a row near 1e6 (1e8): log-probs and entropy still right (the lse form
    loses them to the rounding of lse), and the gradients too."""
    be = _backend(backend)
    h, w, b, t = _grid_inputs(offset, step)
    lp, ent = linear_logprobs(h, w, t, bias=b, logit_scale=scale, return_entropy=True,
                              chunk_size=5, backend=be)
    lp1 = linear_logprobs(h, w, t, bias=b, logit_scale=scale, chunk_size=5, backend=be)
    refs, (hr, wr, br) = _ref(h, w, b, t, "both", logit_scale=scale)
    assert refs[1].min() > 0.1  # the rows are far from one-hot: a real entropy
    for got, ref, what in ((lp, refs[0], "lp"), (lp1, refs[0], "lp alone"),
                           (ent, refs[1], "entropy")):
        assert (got.double() - ref).abs().max() < 1e-5, what
    gs = [torch.randn(12, dtype=torch.float64) for _ in range(2)]
    torch.autograd.backward([lp, ent], [g.float() for g in gs])
    torch.autograd.backward(list(refs), gs)
    assert_close_normwise(h.grad, hr.grad, 1e-5, "dh")
    assert_close_normwise(w.grad, wr.grad, 1e-5, "dW")
    assert_close_normwise(b.grad, br.grad, 1e-5, "db")


def test_offset_invariance():
    """A common offset of every logit (a constant bias) changes nothing beyond rounding."""
    h, w, b, t = _grid_inputs(0.0, 0.125, seed=3)
    base = linear_logprobs(h, w, t, bias=b, return_entropy=True)
    for c in (1e4, 1e6, -1e6):
        shifted = linear_logprobs(h, w, t, bias=b.detach() + c, return_entropy=True)
        for a, s in zip(base, shifted, strict=True):
            assert torch.allclose(a, s, atol=1e-5, rtol=0), c


class _PoisonTorch:
    """The torch module with every new buffer filled with garbage (NaN for floats): each
    element fusedce.linear allocates must be written before it is read."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(x):
        if x.is_floating_point():
            return x.fill_(float("nan"))
        return x.fill_(True) if x.dtype == torch.bool else x.fill_(7)

    def empty(self, *a, **k):
        return self._poison(torch.empty(*a, **k))

    def empty_like(self, *a, **k):
        return self._poison(torch.empty_like(*a, **k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [(), ("weight", "bias")], ids=["trained", "frozen_head"])
@pytest.mark.parametrize("mode", MODES)
def test_poisoned_buffers(mode, frozen, backend, monkeypatch):
    be = _backend(backend)
    monkeypatch.setattr(fce_linear, "torch", _PoisonTorch())
    _check(be, torch.float32, mode, lead=(19,), D=8, V=27, chunk_size=6, frozen=frozen,
           softcap=6.0)


# ---------------------------------------------------------------- API and bad input


def test_export():
    """fusedce.linear_entropy is fusedce.linear.linear_entropy (once exported)."""
    if not hasattr(fce, "linear_entropy"):
        pytest.skip("fusedce/__init__.py does not export linear_entropy yet")
    assert fce.linear_entropy is linear_entropy
    assert fce.linear_logprobs is linear_logprobs


def test_defaults_keep_the_old_call():
    h, w, b, t = _inputs((2, 5), 7, 26, torch.float32)
    lp = fce.linear_logprobs(h, w, t, bias=b, logit_scale=0.7, chunk_size=4, backend="torch")
    refs, _ = _ref(h, w, b, t, "lp", logit_scale=0.7)
    assert isinstance(lp, torch.Tensor) and lp.shape == t.shape
    assert_close_normwise(lp, refs[0], 2e-5, "lp", floor=1.0)


BAD = [
    (lambda h, w, t: linear_logprobs(h, w, t, return_entropy=1), TypeError, "return_entropy"),
    (lambda h, w, t: linear_logprobs(h, w, t, inference_only="yes"), TypeError,
     "inference_only"),
    (lambda h, w, t: linear_entropy(h, w, reduce_hidden_grad=None), TypeError,
     "reduce_hidden_grad"),
    (lambda h, w, t: linear_entropy(h, w[:, :-1]), ValueError, "D ="),
    (lambda h, w, t: linear_entropy(h, w.double()), TypeError, "dtype"),
    (lambda h, w, t: linear_entropy(h.long(), w), TypeError, "hidden"),
    (lambda h, w, t: linear_entropy(h.numpy(), w), TypeError, "hidden"),
    (lambda h, w, t: linear_entropy(h, w, bias=torch.zeros(3)), ValueError, "bias"),
    (lambda h, w, t: linear_entropy(h, w, softcap=-1.0), ValueError, "softcap"),
    (lambda h, w, t: linear_entropy(h, w, logit_scale=0.0), ValueError, "logit_scale"),
    (lambda h, w, t: linear_entropy(h, w, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, t: linear_entropy(h, w, vocab_start=3), ValueError, "tp_group"),
    (lambda h, w, t: linear_entropy(h, w, tp_group=3), TypeError, "tp_group"),
    (lambda h, w, t: linear_entropy(h, w, backend="cuda"), ValueError, "backend"),
    (lambda h, w, t: linear_entropy(h, w, accum_dtype=torch.float16), ValueError,
     "accum_dtype"),
    (lambda h, w, t: linear_logprobs(h, w, t[:-1]), ValueError, "target"),
    (lambda h, w, t: linear_logprobs(h, w, t.float()), TypeError, "int64"),
    (lambda h, w, t: linear_logprobs(h, w, t + 100), ValueError, "class ids"),
    (lambda h, w, t: linear_logprobs(h, w, t, softcap=float("inf")), ValueError, "softcap"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(bad, exc, match):
    h = torch.randn(5, 4)
    w = torch.randn(9, 4)
    t = torch.randint(0, 9, (5,))
    with pytest.raises(exc, match=match):
        bad(h, w, t)
    with pytest.raises(ValueError):  # fce.InputError is both
        bad(h, w, t)


# ---------------------------------------------------------------- vocab-parallel (gloo)

TP_V = 37
TP_SPLITS = {2: (15, 22), 3: (5, 20, 12)}  # uneven shards tiling [0, 37)


def _shard(world, rank):
    sizes = TP_SPLITS[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _tp_case(rank, world, group, mode, backend="torch", bias=True, frozen=(),
             reduce_hidden_grad=True, grid=None, chunk_size=4, **kw):
    """One vocab-parallel check on this rank: every output and gradient vs the full fp64
    oracle (the same full inputs on every rank)."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(4321)
    if grid is None:
        h_full, w_full, b_full, t = _inputs((19,), 9, TP_V, torch.float32, bias=bias, gen=gen,
                                            ignore_index=kw.get("ignore_index", -100))
    else:
        h_full, w_full, b_full, t = _grid_inputs(*grid, n=19, D=9, V=TP_V)
    h_full, w_full = h_full.detach(), w_full.detach()
    b_full = None if b_full is None else b_full.detach()
    start, stop = _shard(world, rank)
    h = h_full.clone().requires_grad_("hidden" not in frozen)
    w = w_full[start:stop].clone().requires_grad_("weight" not in frozen)
    b = None if b_full is None else b_full[start:stop].clone().requires_grad_(
        "bias" not in frozen)
    outs = _call(mode, h, w, b, t, tp_group=group, vocab_start=start, chunk_size=chunk_size,
                 backend=backend, reduce_hidden_grad=reduce_hidden_grad, **kw)
    kw.pop("inference_only", None)
    refs, (hr, wr, br) = _ref(h_full, w_full, b_full, t, mode, **kw)
    for out, ref in zip(outs, refs, strict=True):
        assert_close_normwise(out, ref, 2e-5, f"tp {mode} value rank {rank}", floor=1.0)
    if not any(o.requires_grad for o in outs):
        return
    gs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _ in outs]
    torch.autograd.backward(list(outs), [g.float() for g in gs])
    torch.autograd.backward(list(refs), gs)
    if "hidden" in frozen:
        assert h.grad is None
    else:
        dh = h.grad
        if not reduce_hidden_grad:
            dist.all_reduce(dh, group=group)  # what the caller (Megatron) does
        assert_close_normwise(dh, hr.grad, 2e-5, f"tp {mode} dh rank {rank}", floor=1e-2)
    if "weight" in frozen:
        assert w.grad is None
    else:
        assert_close_normwise(w.grad, wr.grad[start:stop], 2e-5, f"tp dW rank {rank}",
                              floor=1e-2)
    if b is not None and "bias" not in frozen:
        assert_close_normwise(b.grad, br.grad[start:stop], 2e-5, f"tp db rank {rank}",
                              floor=1e-2)


def _tp_dtensor_case(rank, world, group):
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh("cpu", list(range(world)))
    gen = torch.Generator().manual_seed(77)
    h_full, w_full, _, t = _inputs((11,), 6, TP_V, torch.float32, bias=False, gen=gen)
    h_full, w_full = h_full.detach(), w_full.detach()
    refs, (hr, wr, _) = _ref(h_full, w_full, None, t, "both", softcap=5.0)
    wd = distribute_tensor(w_full.clone(), mesh, [Shard(0)]).requires_grad_(True)
    h = h_full.clone().requires_grad_(True)
    lp, ent = linear_logprobs(h, wd, t, return_entropy=True, softcap=5.0, chunk_size=4)
    assert_close_normwise(lp, refs[0], 2e-5, "dtensor lp", floor=1.0)
    assert_close_normwise(ent, refs[1], 2e-5, "dtensor entropy", floor=1.0)
    (lp.sum() + ent.sum()).backward()
    (refs[0].sum() + refs[1].sum()).backward()
    assert_close_normwise(h.grad, hr.grad, 2e-5, "dtensor dh")
    assert_close_normwise(wd.grad.full_tensor(), wr.grad, 2e-5, "dtensor dW")
    # hidden that differs per rank (an FSDP2 shard) is refused on every rank
    with pytest.raises(ValueError, match="FSDP2"):
        linear_entropy(h_full + rank, wd)
    hd = distribute_tensor(h_full.clone(), mesh, [Replicate()])
    ent2 = linear_entropy(hd, wd.detach(), softcap=5.0)
    assert_close_normwise(ent2, refs[1], 2e-5, "dtensor entropy (replicated hidden)", floor=1.0)


def _tp_checks_case(rank, world, group):
    """With validation, one rank's bad argument raises on every rank, and ranks that
    disagree on what is exchanged raise instead of hanging; ranks may cut different chunks
    (the statistics are exchanged once per call)."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(TP_V, 4, generator=gen)
    h = torch.randn(10, 4, generator=gen)
    t = torch.randint(0, TP_V, (10,), generator=gen)
    s, e = _shard(world, rank)
    last = rank == world - 1

    def call(**kw):
        kw.setdefault("tp_group", group)
        kw.setdefault("vocab_start", s)
        return linear_logprobs(h, W[s:e], kw.pop("target", t), **kw)

    with pytest.raises(ValueError, match="softcap"):
        call(softcap=-1.0 if last else None)
    with pytest.raises(ValueError, match="options"):
        call(return_entropy=last)
    bad = t.clone()
    if last:
        bad[1] = TP_V
    with pytest.raises(ValueError, match="target"):
        call(target=bad)
    with pytest.raises(ValueError, match="rows"):
        linear_entropy(h[:9 + rank], W[s:e], tp_group=group)
    full = linear_logprobs(h, W, t, return_entropy=True)
    for validate in (True, False):
        with fce.validation(validate):
            got = call(return_entropy=True, chunk_size=3 + rank)
        for a, c in zip(got, full, strict=True):
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-5), validate


def _tp_worker(ctx, backends):
    import os

    import torch.distributed as dist

    if "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rank, world, group = ctx.rank, ctx.world_size, dist.group.WORLD
    for be in backends:
        progress(f"{be} log-probs")
        _tp_case(rank, world, group, "lp", backend=be, logit_scale=1.25)
        progress(f"{be} log-probs and entropy")
        _tp_case(rank, world, group, "both", backend=be, softcap=5.0)
    progress("both, softcap, temperature")
    _tp_case(rank, world, group, "both", logit_scale=1 / 0.8)
    progress("entropy, partial dh")
    _tp_case(rank, world, group, "ent", bias=False, reduce_hidden_grad=False)
    progress("frozen head")
    _tp_case(rank, world, group, "lp", frozen=("weight", "bias"))
    _tp_case(rank, world, group, "both", frozen=("weight", "bias"), ignore_index=3)
    progress("frozen hidden")
    _tp_case(rank, world, group, "ent", frozen=("hidden",))
    progress("large offset")
    _tp_case(rank, world, group, "both", grid=(1e6, 0.125))
    progress("inference only")
    _tp_case(rank, world, group, "both", inference_only=True, chunk_size="auto")
    with fce.validation(False):
        progress("validation off")
        _tp_case(rank, world, group, "both", softcap=4.0)
    progress("dtensor")
    _tp_dtensor_case(rank, world, group)
    progress("checks")
    _tp_checks_case(rank, world, group)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_gloo(world):
    backends = ["torch"] + (["triton"] if HAS_TRITON_BACKEND and world == 2 else [])
    assert run_ranks(_tp_worker, world, backends, backend="gloo") == [True] * world
