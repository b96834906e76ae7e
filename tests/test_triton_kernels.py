"""Triton kernels of fusedce.triton, run through the interpreter on the CPU (conftest sets
TRITON_INTERPRET=1 without CUDA; on a GPU machine the same tests run on the device).

Every kernel is checked against the fp64 oracle (tests/oracle.py) or against the torch
backend (the executable spec, itself checked against the oracle), with fresh random inputs,
poisoned outputs and dtype-aware normwise tolerances.

Which paths run where:
  * the fused rows kernels (fused.py, fused_tp.py) run here in every mode; PEER (the
    vocabulary-parallel statistics exchanged between the ranks' kernels) one rank at a time,
    with the other ranks' records written into its buffer beforehand
    (test_fused_loss_peer_exchange); the exchange between GPUs runs in the NCCL suite
    (tests/test_distributed.py with FUSEDCE_DIST_BACKEND=nccl).
  * _stats_kernel with several segments per row (+ _fold_kernel) and with prefetch runs here
    through the config override.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fusedce as fce
from fusedce import spec, torch_backend
from fusedce.layout import as_rows3d
from fusedce.peer import PeerExchange
from oracle import assert_close_normwise as _normwise
from oracle import assert_compiled_matches_eager, ref_cross_entropy, ref_entropy, ref_logprobs, tol

tb = pytest.importorskip("fusedce.triton.backend")
configs = pytest.importorskip("fusedce.triton.configs")
launch = pytest.importorskip("fusedce.triton.launch")
fused = pytest.importorskip("fusedce.triton.fused")
fused_tp = pytest.importorskip("fusedce.triton.fused_tp")
stats = pytest.importorskip("fusedce.triton.stats")
grad_ops = pytest.importorskip("fusedce.triton.grad")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_override():
    configs.set_override(fused=None, stats=None, grad_block=None)
    yield
    configs.set_override(fused=None, stats=None, grad_block=None)


def assert_close_normwise(out, ref, rtol, what=""):
    # references live on the CPU (fp64); on a GPU machine the results come back to compare
    _normwise(out.detach().cpu(), ref.detach().cpu(), rtol, what)


def _x(shape, V, dtype, scale=3.0):
    return (torch.randn(*shape, V, device=DEV) * scale).to(dtype)


def _t(shape, V, ignore_frac=0.25, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, V, shape, device=DEV, dtype=dtype)
    drop = torch.rand(shape, device=DEV) < ignore_frac
    return torch.where(drop, torch.full_like(t, ignore_index), t)


def _ref_grad(x, t, g, **kw):
    xr = x.detach().double().cpu().requires_grad_(True)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = ref_cross_entropy(xr, t.cpu(), **kw)
    ref.backward(g.double().cpu())
    return ref.detach(), xr.grad


# ---------------------------------------------------------------- API over every option

OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(normalizer=37.0),
    dict(label_smoothing=0.2),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(logit_scale=0.7),
    dict(weight="w"),
    dict(weight="w", label_smoothing=0.15, reduction="none"),
    dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=1.6, weight="w",
         reduction="sum"),
    dict(ignore_index=0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_cross_entropy_matches_oracle(opts, dtype):
    V = 203
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(V, device=DEV) + 0.5
    x = _x((3, 4), V, dtype).requires_grad_(True)
    t = _t((3, 4), V, ignore_index=kw.get("ignore_index", -100))
    out = fce.cross_entropy(x, t, backend="triton", return_aux=True, **kw)
    g = torch.randn(out.loss.shape, device=DEV) + 1.5
    ref, gref = _ref_grad(x, t, g, **kw)
    assert_close_normwise(out.loss, ref, 2e-5, "loss")
    x.grad = None
    out.loss.backward(g)
    assert x.grad.dtype == dtype
    assert_close_normwise(x.grad, gref, 2 * tol(dtype), "grad")
    # the auxiliary outputs equal the torch backend's (same statistics)
    o2 = fce.cross_entropy(x.detach(), t, backend="torch", return_aux=True, **kw)
    assert_close_normwise(out.lse, o2.lse, 1e-6, "lse")
    assert_close_normwise(out.z_loss, o2.z_loss, 1e-5, "z_loss")
    assert torch.equal(out.accuracy, o2.accuracy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_into_logits(dtype):
    V = 150
    x0 = _x((6,), V, dtype)
    t = _t((6,), V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    a = x0.clone().requires_grad_(True)
    fce.cross_entropy(a, t, backend="triton", **kw).backward()
    buf = x0.clone()
    b = buf.clone().requires_grad_(True)
    loss = fce.cross_entropy(b, t, backend="triton", inplace_backward=True, **kw)
    loss.backward()
    assert torch.equal(a.grad, b.grad)
    # the gradient lives in the logits' own storage
    assert b.grad.data_ptr() == b.data_ptr()


def test_upstream_one_skips_scaling_and_other_values_scale(monkeypatch):
    V = 97
    x = _x((5,), V, torch.float32).requires_grad_(True)
    t = _t((5,), V, ignore_frac=0.0)
    calls = []
    orig = grad_ops._launch_scale
    monkeypatch.setattr(grad_ops, "_launch_scale", lambda *a: (calls.append(a[2]), orig(*a)))
    fce.cross_entropy(x, t, backend="triton").backward()
    g1 = x.grad.clone()
    x.grad = None
    (fce.cross_entropy(x, t, backend="triton") * 2.5).backward()
    assert_close_normwise(x.grad, 2.5 * g1, 1e-6, "scaled")
    assert calls == [False, False]  # one scale launch per backward, decided on the device


def test_reduction_none_per_row_upstream():
    V = 64
    x = _x((2, 5), V, torch.bfloat16).requires_grad_(True)
    t = _t((2, 5), V)
    g = torch.randn(2, 5, device=DEV)
    g[0, :3] = 1.0  # rows with factor 1 are skipped by the scaling kernel
    out = fce.cross_entropy(x, t, backend="triton", reduction="none", z_loss=1e-3)
    out.backward(g)
    _, gref = _ref_grad(x, t, g, reduction="none", z_loss=1e-3)
    assert_close_normwise(x.grad, gref, 2 * tol(torch.bfloat16), "grad")


def test_no_grad_runs_statistics_only(monkeypatch):
    """Under no_grad (and for logprobs inference_only) the one-kernel path runs without a
    gradient destination (one read); with autograd it writes the gradient in the same
    kernel."""
    V = 80
    x = _x((4,), V, torch.bfloat16).requires_grad_(True)
    t = _t((4,), V)
    used = []
    for fn in ("fused", "grad", "row_stats"):
        orig = getattr(tb, fn)
        monkeypatch.setattr(tb, fn, lambda *a, _o=orig, _n=fn, **k: (used.append(_n), _o(*a, **k))[1])
    orig_fl = tb.fused_loss

    def spy(*a, **k):
        used.append("fused_loss/" + ("grad" if k["out"] is not None else "no grad"))
        return orig_fl(*a, **k)

    monkeypatch.setattr(tb, "fused_loss", spy)
    before = x.detach().clone()
    with torch.no_grad():
        loss = fce.cross_entropy(x, t, backend="triton", inplace_backward=True)
    assert used == ["fused_loss/no grad"]
    assert torch.equal(x.detach(), before)  # nothing written, even with inplace_backward
    assert_close_normwise(loss, ref_cross_entropy(x.detach().double().cpu(), t.cpu()), 2e-5,
                          "no_grad loss")
    used.clear()
    lp = fce.logprobs(x, t, backend="triton", inference_only=True)
    assert used == ["fused_loss/no grad"]
    assert_close_normwise(lp, ref_logprobs(x.detach().double().cpu(), t.cpu()), 2e-5, "logprobs")
    used.clear()
    fce.cross_entropy(x, t, backend="triton")
    assert used == ["fused_loss/grad"]


def test_noncontiguous_rows_and_columns():
    V = 90
    base = _x((3, 7), V, torch.bfloat16)
    t = _t((3, 6), V)
    views = (lambda b: b[:, :-1],                                   # shifted: [B, T-1, V]
             lambda b: b.transpose(0, 1)[1:].transpose(0, 1),      # [T, B, V] storage
             lambda b: b[:, 1:])
    for make in views:
        x = make(base)
        assert not x.is_contiguous()
        ref, gref = _ref_grad(x, t, torch.tensor(1.0))
        loss = fce.cross_entropy(x.detach().requires_grad_(True), t, backend="triton")
        assert_close_normwise(loss, ref, 2e-5, "strided loss")
        # in place on a strided view of a larger buffer: only the view's elements change
        buf = base.clone()
        v = make(buf).detach().requires_grad_(True)
        fce.cross_entropy(v, t, backend="triton", inplace_backward=True).backward()
        assert_close_normwise(v.grad, gref, 2 * tol(torch.bfloat16), "inplace strided grad")
        # (AccumulateGrad copies the .grad of a non-dense leaf into a contiguous tensor; a
        # non-leaf's gradient stays in the buffer, which is what the next assert shows)
        assert_close_normwise(make(buf), gref, 2 * tol(torch.bfloat16), "buffer holds grad")
        untouched = torch.ones(base.shape[:-1], dtype=torch.bool, device=DEV)
        make(untouched.unsqueeze(-1)).fill_(False)
        assert torch.equal(buf[untouched], base[untouched])
    # column stride != 1
    wide = _x((4,), 2 * V, torch.float32)
    x = wide[:, ::2]
    tt = _t((4,), V)
    xr = x.detach().clone().requires_grad_(True)
    loss = fce.cross_entropy(xr, tt, backend="triton", label_smoothing=0.1)
    loss.backward()
    ref, gref = _ref_grad(x, tt, torch.tensor(1.0), label_smoothing=0.1)
    assert_close_normwise(loss, ref, 1e-5, "column-strided loss")
    assert_close_normwise(xr.grad, gref, 2e-5, "column-strided grad")


def test_int32_targets_all_ignored_and_determinism():
    V = 70
    x = _x((5,), V, torch.float32).requires_grad_(True)
    t = _t((5,), V, dtype=torch.int32)
    l1 = fce.cross_entropy(x, t, backend="triton", z_loss=1e-3)
    l1.backward()
    g1 = x.grad.clone()
    x.grad = None
    l2 = fce.cross_entropy(x, t, backend="triton", z_loss=1e-3)
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(g1, x.grad)
    x.grad = None
    ign = torch.full_like(t, -100)
    out = fce.cross_entropy(x, ign, backend="triton", return_aux=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_nan_and_masked_vocab():
    V = 40
    x = _x((4,), V, torch.float32)
    x[:, :5] = float("-inf")  # masked vocabulary entries
    t = torch.randint(5, V, (4,), device=DEV)
    xr = x.clone().requires_grad_(True)
    loss = fce.cross_entropy(xr, t, backend="triton", reduction="none")
    loss.sum().backward()
    ref, gref = _ref_grad(x, t, torch.ones(4), reduction="none")
    assert torch.isfinite(loss).all()
    assert_close_normwise(loss, ref, 1e-5, "masked loss")
    assert_close_normwise(xr.grad, gref, 1e-5, "masked grad")
    x[1, 7] = float("nan")
    loss = fce.cross_entropy(x, t, backend="triton", reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


def test_logprobs_and_entropy():
    V = 123
    for dtype in (torch.float32, torch.bfloat16):
        x = _x((2, 3), V, dtype).requires_grad_(True)
        t = _t((2, 3), V)
        lp = fce.logprobs(x, t, logit_scale=1.3, backend="triton")
        ref = ref_logprobs(x.detach().double().cpu(), t.cpu(), logit_scale=1.3)
        assert_close_normwise(lp, ref, 2e-5, "logprobs")
        g = torch.randn(2, 3, device=DEV)
        lp.backward(g)
        xr = x.detach().double().cpu().requires_grad_(True)
        ref_logprobs(xr, t.cpu(), logit_scale=1.3).backward(g.double().cpu())
        assert_close_normwise(x.grad, xr.grad, 2 * tol(dtype), "logprobs grad")
        x.grad = None
        h = fce.entropy(x, logit_scale=0.8, backend="triton")
        xr = x.detach().double().cpu().requires_grad_(True)
        href = ref_entropy(xr, logit_scale=0.8)
        assert_close_normwise(h, href, 2e-5, "entropy")
        h.backward(g)
        href.backward(g.double().cpu())
        assert_close_normwise(x.grad, xr.grad, 2 * tol(dtype), "entropy grad")
    with torch.no_grad():
        x = _x((3,), V, torch.float32)
        x[:, :4] = float("-inf")  # masked columns: p = 0, no contribution (not NaN)
        assert_close_normwise(fce.entropy(x, backend="triton"),
                              ref_entropy(x[:, 4:].double().cpu()), 1e-5, "entropy -inf")


# ---------------------------------------------------------------- kernels one by one


def _poison(shape, dtype):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


@pytest.mark.parametrize("need", ["plain", "sz", "sez", "weights"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_stats_kernel_segments_and_fold(need, prefetch):
    V = 301
    x = _x((2, 5), V, torch.bfloat16)
    t = _t((2, 5), V)
    opts = spec.LossOptions(logit_scale=1.2) if need != "plain" else spec.LossOptions()
    w = torch.rand(V, device=DEV) if need == "weights" else None
    kw = dict(need_sz=need in ("sz", "weights"), need_sez=need == "sez", weight_local=w)
    ref = torch_backend.row_stats(x, t.reshape(-1), opts, **kw)
    # 32-column chunks: several chunks per segment and several segments per row
    configs.set_override(stats=configs.StatsConfig(block=32, num_warps=1, prefetch=prefetch))
    got = tb.row_stats(x, t.reshape(-1), opts, **kw)
    configs.set_override(stats=None)
    one = tb.row_stats(x, t.reshape(-1), opts, **kw)  # a row per program
    assert (tb.row_stats(x, t.reshape(-1), opts, need_am=False, **kw).am == -1).all()
    for st in (got, one):
        for f in ("m", "s", "zt", "sz", "sez"):
            if getattr(ref, f) is None:
                assert getattr(st, f) is None
                continue
            assert_close_normwise(getattr(st, f), getattr(ref, f), 2e-6, f)
        assert torch.equal(st.am, ref.am)


def test_stats_and_grad_kernels_on_a_vocab_shard():
    """row_stats / grad with vocab_start (a tensor-parallel shard): targets outside the shard
    contribute neither z_t nor the -c_t term."""
    V, start, vloc = 500, 180, 150
    full = _x((7,), V, torch.float32)
    x = full[:, start:start + vloc]
    t = _t((7,), V)
    opts = spec.LossOptions(label_smoothing=0.2, softcap=5.0)
    w = torch.rand(V, device=DEV)
    wl = w[start:start + vloc]
    x3 = as_rows3d(x)
    ref = torch_backend.row_stats(x3, t, opts, vocab_start=start, weight_local=wl, need_sz=True)
    got = tb.row_stats(x3, t, opts, vocab_start=start, weight_local=wl, need_sz=True)
    for f in ("m", "s", "zt", "sz"):
        assert_close_normwise(getattr(got, f), getattr(ref, f), 2e-6, f)
    # softcapped logits can tie to within a rounding (tanh saturates): any column that holds
    # the maximum of the fp64 scores is a right argmax
    z = 5.0 * torch.tanh(x.double().cpu() / 5.0)
    picked = z.gather(1, (got.am.cpu() - start).view(-1, 1)).squeeze(1)
    best = z.max(dim=1).values
    assert ((best - picked) <= 1e-6 * best.abs().clamp_min(1.0)).all(), (got.am, ref.am)
    mrow = torch.randn(7, device=DEV) + 4
    srow = torch.rand(7, device=DEV) * 50 + 1
    g = torch.randn(7, device=DEV)
    g[2] = 0.0
    c_p, c_t = torch.rand(7, device=DEV) + 0.5, torch.rand(7, device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x3.to(dtype)
        o_ref = torch.empty_like(xd)
        torch_backend.grad(xd, t, mrow, srow, g, c_p, c_t, opts, vocab_size=V, out=o_ref,
                           vocab_start=start, weight_local=wl)
        out = _poison(xd.shape, dtype)
        tb.grad(xd, t, mrow, srow, g, c_p, c_t, opts, vocab_size=V, out=out, vocab_start=start,
                weight_local=wl)
        assert not torch.isnan(out).any()
        assert_close_normwise(out, o_ref, 2 * tol(dtype), "shard grad")
        assert torch.count_nonzero(out[0, 2]) == 0  # g = 0 rows are zero, not read


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "all"])
def test_fused_kernel_matches_two_pass(dtype, case):
    V = 257
    x = as_rows3d(_x((2, 4), V, dtype))
    t = _t((2, 4), V).reshape(-1)
    if case == "plain":
        opts, w = spec.LossOptions(), None
    else:
        opts = spec.LossOptions(label_smoothing=0.2, z_loss=1e-2, softcap=6.0, logit_scale=1.4)
        w = torch.rand(V, device=DEV) + 0.1
    terms = spec.row_terms(t, opts, V, w)
    g0 = torch.randn(8, device=DEV) * terms.valid
    out = _poison(x.shape, dtype)
    st = tb.fused(x, t, opts, g0=g0, terms=terms, vocab_size=V, out=out, weight_local=w)
    ref = torch_backend.row_stats(x, t, opts, weight_local=w, need_sz=opts.label_smoothing > 0)
    for f in ("m", "s", "zt", "sz"):
        assert_close_normwise(getattr(st, f), getattr(ref, f), 2e-6, f)
    assert torch.equal(st.am, ref.am)
    lse = spec.lse_of(ref)
    c_p, c_t = spec.grad_coefficients(lse, terms, opts, V)
    o_ref = torch.empty_like(x)
    torch_backend.grad(x, t, ref.m, ref.s, g0, c_p, c_t, opts, vocab_size=V, out=o_ref,
                       weight_local=w)
    assert not torch.isnan(out).any()
    assert_close_normwise(out, o_ref, 2 * tol(dtype), "fused grad")
    # in place: out is the logits buffer itself; without the argmax (am = -1) the rest is
    # unchanged
    xi = x.clone()
    st2 = tb.fused(xi, t, opts, g0=g0, terms=terms, vocab_size=V, out=xi, weight_local=w,
                   need_am=False)
    assert torch.equal(xi, out)
    assert torch.equal(st2.m, st.m) and torch.equal(st2.s, st.s) and (st2.am == -1).all()


def _records(stats, epoch):
    """Exchange-buffer records [N, 8] int64 of one shard's statistics (fusedce.triton.
    fused_tp._publish_row): words (m, s, z_t, argmax, sz, 0, 0, 0), low 32 bits the value,
    high 32 bits the epoch."""
    def bits(f):
        return f.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF

    m, s, zt, sz, am = stats[:5]
    rec = torch.zeros(m.numel(), 8, dtype=torch.int64, device=m.device)
    rec[:, 0], rec[:, 1], rec[:, 2] = bits(m), bits(s), bits(zt)
    rec[:, 3] = am.to(torch.int32).long() & 0xFFFFFFFF
    rec[:, 4] = bits(sz)
    return rec | (epoch << 32)


def _part_records(x, t, w, a, scale, cap, lo, hi, parts, epoch):
    """Records of the ``parts`` segments of shard columns [lo, hi) as fused_tp cuts
    them under PEER (every rank the same number of parts, empty ones allowed): a list of
    [N, 8] int64."""
    Vq = hi - lo
    block = min(configs.fused_config(Vq, 4).block, 1 << max(4, (Vq - 1).bit_length()))
    segw = -(-(-(-Vq // parts)) // block) * block
    out = []
    for p in range(parts):
        a0, a1 = lo + min(Vq, p * segw), lo + min(Vq, (p + 1) * segw)
        if a1 <= a0:
            n = t.numel()
            z = torch.zeros(n, device=DEV)
            st = (torch.full((n,), float("-inf"), device=DEV), z, z, z,
                  torch.zeros(n, dtype=torch.int64, device=DEV))
        else:
            wl = w[a0:a1].contiguous() if (w is not None and a > 0) else None
            st = stats.tr_row_stats(x[:, :, a0:a1].contiguous(), t, wl, a0, -100, scale, cap,
                                 a > 0, False, True)
        out.append(_records(st, epoch))
    return out


def _exchange_case(case, t, V):
    """Options of the exchange tests: (smoothing, z-loss, softcap, scale, class weights,
    their sum, mean denominator); "plain" has none, "all" every one."""
    if case == "plain":
        a, zl, cap, scale, w = 0.0, 0.0, None, 1.0, None
    else:
        a, zl, cap, scale = 0.1, 1e-3, 7.0, 1.3
        w = torch.rand(V, device=DEV) + 0.5
    w_total = w.sum() if (w is not None and a > 0) else None
    return a, zl, cap, scale, w, w_total, (t != -100).sum()


@pytest.mark.parametrize("world,parts", [(2, 1), (3, 1), (2, 2), (3, 3)])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_fused_loss_peer_exchange(world, parts, case):
    """PEER mode of the fused kernel (vocabulary parallel, the shard statistics exchanged
    inside the kernel through symmetric memory): one rank's kernel at a time, with the other
    ranks' records already in its buffer (the interpreter runs one kernel at a time; the real
    exchange between GPUs is in the NCCL suite). Its loss rows, lse, z-loss parts, argmax and
    gradient slice equal the unsharded kernel's; the record it publishes to each other rank
    is that shard's statistics, tagged with the epoch, in the epoch's parity half. With
    ``parts`` > 1 every shard row is cut into that many segments taken by cooperating
    programs (PEER + SPLIT; some segments empty where a shard is narrow), whose records go
    to every rank's buffer, slot rank x parts + part, its own rank's included."""
    V, n = 41, 8
    bounds = [0, 9, 30, V] if world == 3 else [0, 17, V]
    if parts > 1:
        # 16-column chunks: the shards (9 to 24 columns) take 1 or 2 chunks, 3 parts
        # leave some empty
        configs.set_override(fused=configs.RowsConfig(block=16, num_warps=1, per_sm=1,
                                            reverse=False, split=parts,
                                            peer_split=True))
        assert configs.peer_parts(V, world, 4) == parts
    try:
        _peer_exchange_case(world, parts, case, V, n, bounds)
    finally:
        configs.set_override(fused=None)


def _peer_exchange_case(world, parts, case, V, n, bounds):
    x = _x((2, 4), V, torch.float32)
    t = _t((2, 4), V).reshape(-1)
    t[3] = bounds[1]  # a target on a shard's first column
    a, zl, cap, scale, w, w_total, den = _exchange_case(case, t, V)
    ref_out = _poison(x.shape, torch.float32)
    base = configs._OVERRIDE.pop("fused", None)  # the reference: unsplit, unsharded
    ref = fused.tr_fused_loss(x, t, w, w_total, den, ref_out, -100, V, a, zl, scale, cap, True, 1)
    if base is not None:
        configs.set_override(fused=base)
    for epoch in (2, 7):  # both parity halves; a tag past the first two
        par = epoch & 1
        for r in range(world):
            lo, hi = bounds[r], bounds[r + 1]
            xch = torch.zeros(2, world * parts, n + 3, 8, dtype=torch.int64, device=DEV)
            others = [torch.zeros_like(xch) for _ in range(world)]
            for q in range(world):
                if q != r or parts > 1:
                    recs = _part_records(x, t, w, a, scale, cap, bounds[q], bounds[q + 1],
                                         parts, epoch)
                    for p_, rec in enumerate(recs):
                        xch[par, q * parts + p_, :n] = rec
            peers = torch.tensor([xch.data_ptr() if q == r else others[q].data_ptr()
                                  for q in range(world)], dtype=torch.int64, device=DEV)
            xs = x[:, :, lo:hi].clone()
            out = _poison(xs.shape, torch.float32)
            ex = PeerExchange(xch, peers, r, world, None)
            got = fused_tp.tr_fused_loss_peer(xs, t, ex, epoch, w, w_total, den, out,
                                        lo, -100, V, a, zl, scale, cap, True, 1, True)
            for f, g_, e in zip(("loss", "lse", "zpart"), got[:3], ref[:3]):
                if e.numel():
                    assert_close_normwise(g_, e, 2e-6, f)
            assert torch.equal(got[3], ref[3])
            assert_close_normwise(out, ref_out[:, :, lo:hi], 2e-6, "grad slice")
            wl = w[lo:hi].contiguous() if (w is not None and a > 0) else None
            mine = _records(stats.tr_row_stats(xs, t, wl, lo, -100, scale, cap, a > 0, False, True),
                            epoch)
            if parts > 1:
                mine_p = _part_records(x, t, w, a, scale, cap, lo, hi, parts, epoch)
            for q in range(world):
                if q != r:
                    for p_ in range(parts):
                        pub = others[q][par, r * parts + p_, :n]
                        exp = mine if parts == 1 else mine_p[p_]
                        assert torch.equal(pub >> 32, torch.full_like(pub >> 32, epoch))
                        # m exactly, and the argmax where the part holds a column; s, sz
                        # to rounding (pass 1 chunks differ from the statistics kernel's)
                        assert torch.equal(pub[:, 0], exp[:, 0])
                        held = (pub[:, 0] & 0xFFFFFFFF) != 0xFF800000  # m > -inf
                        assert torch.equal(pub[held, 3], exp[held, 3])
                    assert (others[q][1 - par] == 0).all()
            # no gradient: the same rows, the logits untouched (no pass 2, so shard rows are
            # never split: one record per rank, slot = rank, on every rank alike)
            xs2 = xs.clone()
            if parts > 1:
                xch.zero_()
                for q in range(world):
                    if q != r:
                        xch[par, q, :n] = _part_records(x, t, w, a, scale, cap, bounds[q],
                                                        bounds[q + 1], 1, epoch)[0]
            got2 = fused_tp.tr_fused_loss_peer(xs2, t, ex, epoch, w, w_total, den,
                                         xs2, lo, -100, V, a, zl, scale, cap, False, 1, False)
            assert torch.equal(xs2, x[:, :, lo:hi]) and got2[3].numel() == 0
            assert_close_normwise(got2[0], ref[0], 2e-6, "loss, no grad")


@pytest.mark.parametrize("cfg", ["fallback", "reverse", "forward", "per_row_grid",
                                 "l2_stores"])
def test_fused_rows_configs_and_fallback(cfg, monkeypatch):
    """The fused kernel's table variants (pass 2 forwards/backwards, one program per row, the
    .cg stores of in place over 384 KB) and the stats + grad fallback (FUSEDCE_TRITON_FUSED=0)
    all give the oracle's loss and gradient with every option, into a new buffer and (.cg
    stores) in place."""
    V = 300
    inplace = cfg.endswith("_stores")
    if cfg == "reverse":
        configs.set_override(fused=configs.RowsConfig(block=64, num_warps=1, per_sm=1,
                                                      reverse=True))
    elif inplace:
        configs.set_override(fused=configs.RowsConfig(block=64, num_warps=1, per_sm=1,
                                                      reverse=True, cg_stores=True))
    elif cfg == "forward":
        configs.set_override(fused=configs.RowsConfig(block=128, num_warps=1, per_sm=1,
                                                      reverse=False))
    elif cfg == "per_row_grid":
        configs.set_override(fused=configs.RowsConfig(block=32, num_warps=1, per_sm=1,
                                                      persistent=False))
    elif cfg == "fallback":
        monkeypatch.setattr(tb, "_FUSED", False)
        assert not tb.one_kernel()
    x = _x((3, 2), V, torch.float32).requires_grad_(True)
    t = _t((3, 2), V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, weight=torch.rand(V, device=DEV))
    leaf = x.clone() if inplace else x
    loss = fce.cross_entropy(leaf, t, backend="triton", inplace_backward=inplace, **kw)
    loss.backward()
    ref, gref = _ref_grad(x, t, torch.tensor(1.0), **kw)
    assert_close_normwise(loss, ref, 1e-5, "loss")
    assert_close_normwise(leaf.detach() if inplace else x.grad, gref, 2e-5, "grad")


@pytest.mark.parametrize("V", [1, 2, 300])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_rows_target_column(V, inplace):
    """The target column is written by one scalar store after pass 2 (after a barrier), from
    z_t read before pass 2: in place or not, with every option (softcap's chain, smoothing
    with class weights, z-loss), the oracle's gradient; V = 1 gives zeros (exact in the
    interpreter)."""
    x = _x((3, 2), V, torch.bfloat16)
    t = _t((3, 2), V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, weight=torch.rand(V, device=DEV) + 0.2,
              softcap=5.0)
    configs.set_override(fused=configs.RowsConfig(block=64, num_warps=1, per_sm=1,
                                                  reverse=True))
    xi = x.clone().requires_grad_(True)
    leaf = xi if not inplace else xi.clone()
    loss = fce.cross_entropy(leaf, t, backend="triton", inplace_backward=inplace, **kw)
    loss.backward()
    ref, gref = _ref_grad(x, t, torch.tensor(1.0), **kw)
    assert_close_normwise(loss, ref, 1e-5, "loss")
    assert_close_normwise((xi.grad if not inplace else leaf).detach(), gref,
                          2 * tol(torch.bfloat16), "grad")
    if V == 1:
        # p_t = 1: exactly in the interpreter; on a GPU ex2.approx and the FMA contraction of
        # z log2(e) - lse log2(e) leave p_t within a few ulp of 1 (seen: |dx| <= 2.3e-8)
        kw0 = dict(label_smoothing=0.3)
        xi = x.clone().requires_grad_(True)
        fce.cross_entropy(xi, t, backend="triton", **kw0).backward()
        bound = 0.0 if not xi.is_cuda else 1e-6
        assert xi.grad.float().abs().max() <= bound


def test_scale_kernels_touch_nothing_at_one():
    V = 77
    base = _x((3, 4), V, torch.bfloat16)
    buf = base.clone()
    tb.scale_(buf, torch.tensor(1.0, device=DEV))
    assert torch.equal(buf.view(torch.int16), base.view(torch.int16))
    tb.scale_(buf, torch.tensor(-2.5, device=DEV))
    # within one bf16 rounding (the interpreter's fp32 -> bf16 cast truncates)
    expect = base.float() * -2.5
    assert ((buf.float() - expect).abs() <= expect.abs() * 2.0**-7).all()
    # per-row factors on a strided view; rows with factor 1 keep their bits
    big = _x((3, 5), V, torch.float32)
    view = as_rows3d(big[:, 1:])
    before = big.clone()
    f = torch.randn(12, device=DEV)
    f[[0, 5, 11]] = 1.0
    tb.scale_rows_(view, f)
    expect = before[:, 1:] * f.view(3, 4, 1)
    assert torch.equal(big[:, 1:], expect)
    assert torch.equal(big[:, 0], before[:, 0])


targets_mod = pytest.importorskip("fusedce.triton.targets")


def _scan_ref(t, ignore_index):
    ign = t == ignore_index
    v = torch.where(ign, 0, t).long()
    return [int((~ign).sum()), min(0, int(v.min())), max(0, int(v.max()))]


@pytest.mark.parametrize("steps,extra", [(0, 1), (0, 5), (1, -1), (1, 0), (1, 1), (2, 500)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_target_scan_matches_torch(steps, extra, dtype, ignore_index):
    # n = steps x the kernel's ids per step + extra: across the step edges
    n = steps * targets_mod.SCAN_BLOCK + extra
    V = 50
    t = _t((n,), V, ignore_index=ignore_index, dtype=dtype)
    if n > 4:
        # out-of-range ids on either side, away from the ends of the blocks
        t[n // 3] = -3
        t[n // 2] = V + 4
    got = tb.target_scan(t, ignore_index)
    assert got.dtype == torch.int64 and got.shape == (3,)
    assert got.tolist() == _scan_ref(t, ignore_index)
    # positive ids only: lo is 0 (0 lies in every range), hi the largest id
    pos = torch.full((n,), 9, device=DEV, dtype=dtype)
    assert tb.target_scan(pos, -100).tolist() == [n, 0, 9]
    # every row ignored: nothing counted, the extremes are class 0's
    ign = torch.full((n,), ignore_index, device=DEV, dtype=dtype)
    assert tb.target_scan(ign, ignore_index).tolist() == [0, 0, 0]
    # a strided view is scanned as its flat copy
    tt = _t((n, 2), V, ignore_index=ignore_index, dtype=dtype)[:, 1]
    assert tb.target_scan(tt, ignore_index).tolist() == _scan_ref(tt, ignore_index)


def test_target_scan_declines_empty_and_long_inputs(monkeypatch):
    assert tb.target_scan(torch.empty(0, dtype=torch.int64, device=DEV), -100) is None
    monkeypatch.setattr(targets_mod, "SCAN_MAX", 8)
    assert tb.target_scan(torch.zeros(9, dtype=torch.int64, device=DEV), -100) is None
    assert tb.target_scan(torch.zeros(8, dtype=torch.int64, device=DEV), -100).tolist() == \
        [8, 0, 0]


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("scan_max", [None, 4])
def test_mean_call_scans_targets_once(validate, scan_max, monkeypatch):
    """The default mean call takes one target scan, shared by the range check and the mean's
    denominator (validation off: the denominator alone); past SCAN_MAX torch ops do both."""
    if scan_max is not None:
        monkeypatch.setattr(targets_mod, "SCAN_MAX", scan_max)
    calls = []
    real = tb.target_scan

    def counting(t, ii):
        out = real(t, ii)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(tb, "target_scan", counting)
    V = 37
    x = _x((3, 5), V, torch.float32).requires_grad_(True)
    t = _t((3, 5), V)
    ref, ref_grad = _ref_grad(x, t, torch.tensor(1.0))
    with fce.validation(validate):
        loss = fce.cross_entropy(x, t, backend="triton")
    loss.backward()
    # (a declined scan is asked again for the denominator: a size test, no launch)
    assert calls == ([True] if scan_max is None else [False, False] if validate else [False])
    assert_close_normwise(loss, ref, tol(torch.float32), "loss")
    assert_close_normwise(x.grad, ref_grad, tol(torch.float32), "grad")
    # a bad target still raises with the scan, before anything is returned
    bad = t.clone()
    bad[1, 2] = V
    if validate:
        with pytest.raises(ValueError, match="flat position 7"):
            fce.cross_entropy(x, bad, backend="triton")


def test_64bit_column_offsets_path(monkeypatch):
    """The int64 column-offset variant (taken when (V - 1) * stride_v >= 2**31)."""
    monkeypatch.setattr(launch, "col64", lambda V, sv: True)
    V = 60
    wide = _x((4,), 3 * V, torch.float32)
    x = wide[:, ::3].clone().requires_grad_(True)
    t = _t((4,), V)
    loss = fce.cross_entropy(x, t, backend="triton", label_smoothing=0.1)
    loss.backward()
    ref, gref = _ref_grad(x, t, torch.tensor(1.0), label_smoothing=0.1)
    assert_close_normwise(loss, ref, 1e-5, "col64 loss")
    assert_close_normwise(x.grad, gref, 2e-5, "col64 grad")
    with torch.no_grad():
        h = fce.entropy(x, backend="triton")
    assert_close_normwise(h, ref_entropy(x.detach().double().cpu()), 1e-5, "col64 entropy")


def test_torch_compile_fullgraph_forward_backward():
    V = 50
    x0 = _x((2, 3), V, torch.float32)
    t = _t((2, 3), V)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)

    def f(x, t):
        return fce.cross_entropy(x, t, backend="triton", **kw)

    backend = "inductor" if DEV == "cuda" else "aot_eager"
    assert_compiled_matches_eager(f, x0, t, 1.7, backend=backend)


def test_second_backward_through_eager_loss_raises():
    """The Triton path computes the gradient in the forward; a second backward must not
    silently rescale the first result."""
    x = torch.randn(4, 9, device=DEV, requires_grad=True)
    t = torch.randint(0, 9, (4,), device=DEV)
    loss = fce.cross_entropy(x, t, backend="triton")
    two = torch.tensor(2.0, device=DEV)
    loss.backward(two, retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="once"):
        loss.backward(two)
    ref = x.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref, t).mul(2.0).backward()
    assert torch.allclose(first.double(), ref.grad, atol=1e-6)


def test_persistent_grid_is_balanced_in_place(monkeypatch):
    """In place, rows up to 96 KB take the fewest programs that need no more rounds over the
    rows than the SM slots would: N = 16384 rows on 4 x 132 slots (V = 32000) ->
    512 programs of 32 rows, not 528 with 512 of them idle in the 32nd round. Into a new
    buffer (where it measured slower), for resident grids (PEER) and for cooperating parts,
    every slot is kept."""
    for n, slots in ((16384, 528), (100, 528), (528, 528), (529, 528), (1, 7), (10**6, 264),
                     (16384, 132), (16383, 66), (2, 1), (8192, 528)):
        p = configs._balanced(n, slots)
        rounds = -(-n // slots)
        assert p <= min(n, slots) and -(-n // p) == rounds, (n, slots, p)
        assert p == 1 or -(-n // (p - 1)) > rounds, (n, slots, p)  # the fewest
    assert configs._balanced(16384, 528) == 512 and configs._balanced(0, 528) == 528
    monkeypatch.setattr(configs, "INTERPRET", False)  # the GPU table
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    x3 = torch.empty(1, 16384, 32000, dtype=torch.bfloat16, device="meta")
    cfg, P, _ = configs.rows_grid(x3, x3, None, None, True, traced=False)
    assert (cfg.per_sm, cfg.split, cfg.balance, P) == (4, 1, True, 512)
    # (meta tensors all have data pointer 0: real, stride-0 views tell the buffers apart)
    xr = torch.empty(1, dtype=torch.bfloat16).expand(1, 16384, 32000)
    new = torch.empty(1, dtype=torch.bfloat16).expand(1, 16384, 32000)
    assert configs.rows_grid(xr, xr, None, None, True, traced=False)[1] == 512
    assert configs.rows_grid(xr, new, None, None, True, traced=False)[1] == 528
    assert configs.rows_grid(x3, x3, None, None, True, resident=True, traced=False)[1] == 528
    # statistics only: one program per row, as before
    assert configs.rows_grid(x3, x3, None, None, False, traced=False)[1] == 16384
    # cooperating parts (128256 in bf16: 4 parts of 64 KB): every slot
    x3 = torch.empty(1, 200, 128256, dtype=torch.bfloat16, device="meta")
    cfg, P, _ = configs.rows_grid(x3, x3, None, None, True, traced=False)
    assert cfg.split == 4 and not cfg.balance and P == 4 * 132


def test_split_table_and_launcher_cap_the_parts(monkeypatch):
    """The table asks for at most configs.MAX_SPLIT = 8 cooperating programs per row at any V and
    dtype (longer rows take longer segments): rows of 192-256 KB take 4 parts of 8 warps, 4
    per SM; longer ones one part per 128 KB; the launcher caps explicit requests too.
    Vocabulary-parallel and statistics-only calls get the unsplit long-row entry instead."""
    monkeypatch.setattr(configs, "INTERPRET", False)  # the GPU table
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    assert configs.MAX_SPLIT == 8
    for es in (2, 4):
        for V in (32000, 100000, 128256, 151936, 200000, 262144, 524288, 1 << 20, 1 << 22):
            cfg = configs.fused_config(V, es)
            assert 1 <= cfg.split <= configs.MAX_SPLIT, (V, es, cfg)
            if 192 * 1024 < V * es <= 256 * 1024:
                assert (cfg.split, cfg.num_warps, cfg.per_sm) == (4, 8, 4)
            elif V * es > 384 * 1024:
                assert cfg.split == min(8, -(-V * es // (128 * 1024))), (V, es, cfg)
            else:
                assert cfg.split == 1
            # short rows walk pass 2 backwards; in place, rows over 384 KB walk
            # backwards and store around L1 (.cg), into a new buffer forwards
            own = configs.fused_config(V, es, in_place=True)
            if V * es <= 96 * 1024:
                # (in place, a balanced grid)
                assert cfg.reverse and own == dataclasses.replace(cfg, balance=True)
                assert not cfg.balance
            elif V * es > 384 * 1024:
                assert (cfg.reverse, cfg.cg_stores, own.reverse, own.cg_stores) == (
                    False, False, True, True)
                assert dataclasses.replace(own, reverse=False, cg_stores=False) == cfg
            else:
                assert own == cfg
            if cfg.split > 1:
                x3 = torch.empty(1, 4, V, dtype=torch.float32 if es == 4 else torch.bfloat16,
                                 device="meta")
                for kw in (dict(resident=True), dict(splittable=False)):
                    unsplit, _, _ = configs.rows_grid(x3, x3, None, None, True, **kw)
                    assert unsplit == configs._long_rows(es), (V, es, kw)
    # the launch takes the in-place entry only when the gradient is written over the logits
    x3 = torch.empty(1, 2, 262144, dtype=torch.bfloat16)
    assert configs.rows_grid(x3, x3, None, None, True)[0] == configs.fused_config(262144, 2, True)
    assert configs.rows_grid(x3, torch.empty_like(x3), None, None, True)[0] == configs.fused_config(
        262144, 2)
    # vocabulary parallel with the in-kernel exchange: shard rows split only where the common
    # width takes the split 192-256 KB entry, in 2 parts of 16 warps
    assert configs.peer_parts(262144, 2, 2) == 2 and configs.peer_parts(524288, 4, 2) == 2
    pc = configs._peer_config(262144, 2, 2)
    assert (pc.split, pc.num_warps, pc.per_sm, pc.reverse) == (2, 16, 2, False)
    for V, world in ((128256, 2), (262144, 3), (262144, 1), (1 << 20, 2)):
        assert configs.peer_parts(V, world, 2) == 1 and configs._peer_config(V, world, 2) is None
    # the launcher caps explicit requests: 16 parts asked, 8 taken, min(rows, 64 // 8)
    # groups of 8
    split, segw, programs, words = fused.split_grid(1024, 4, 64, 64, 16)
    assert (split, segw, programs) == (8, 128, 32) and words == 1 + 2 * 32 * 8


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("case", ["plain", "all"])
@pytest.mark.parametrize("api", ["loss", "stats"])
def test_fused_rows_split_rows(split, case, api, monkeypatch):
    """SPLIT mode: each row cut into ``split`` segments taken by cooperating programs that
    exchange their segments' statistics (fused.py, loc buffer). The interpreter runs one
    program at a time, so a program cannot wait for its siblings' records: they are written
    into the exchange buffer beforehand (tagged row + 1, slot [k % 2, group, part], the
    ticket word 0), as the siblings would; each program still publishes its own. With every
    option, the loss rows, lse, z-loss parts, argmax and the whole gradient (each program
    writes its segment) equal the unsplit kernel's; the buffer then holds every part's
    record."""
    V, B, T = 200, 2, 3
    n = B * T
    groups = 3 if DEV == "cpu" else n  # the interpreter's grid (configs.rows_grid); <= 2 rows each
    block = 32
    per = -(-V // split)  # ceil(V / split), then up to whole blocks (as fused.split_grid)
    segw = -(-per // block) * block
    bounds = list(range(0, V, segw)) + [V]
    parts = len(bounds) - 1
    x = _x((B, T), V, torch.float32)
    t = _t((B, T), V).reshape(-1)
    t[1] = bounds[1]  # a target on a segment's first column
    t[2] = bounds[1] - 1  # and one on a segment's last
    a, zl, cap, scale, w, w_total, den = _exchange_case(case, t, V)
    ref_out = _poison(x.shape, torch.float32)
    base = configs.RowsConfig(block=block, num_warps=1, per_sm=1, reverse=False)
    configs.set_override(fused=base)
    ref = fused.tr_fused_loss(x, t, w, w_total, den, ref_out, -100, V, a, zl, scale, cap, True, 1)
    g0 = torch.rand(n, device=DEV) + 0.5
    w_t = torch.ones(n, device=DEV)
    wl_all = w.contiguous() if (w is not None and a > 0) else None
    ref_s_out = _poison(x.shape, torch.float32)
    ref_s = fused.tr_fused(x, t, g0, w_t, wl_all, w_total, ref_s_out, -100, V, a, zl, scale, cap,
                        True)
    # the records the siblings publish: each segment's statistics, argmax as a global id
    recs = []
    for q in range(parts):
        lo, hi = bounds[q], bounds[q + 1]
        wl = w[lo:hi].contiguous() if (w is not None and a > 0) else None
        st = stats.tr_row_stats(x[:, :, lo:hi].contiguous(), t, wl, lo, -100, scale, cap, a > 0,
                             False, True)
        recs.append(_records(st, 0))
    words = 1 + 2 * groups * parts * 8
    buf = torch.zeros(words, dtype=torch.int64, device=DEV)
    slots = buf[1:].view(2, groups, parts, 8)
    for row in range(n):
        k, g = divmod(row, groups)
        for q in range(parts):
            slots[k % 2, g, q] = recs[q][row] | ((row + 1) << 32)
    monkeypatch.setattr(fused, "split_buffer",
                        lambda w_, d: buf if w_ == words else pytest.fail(str(w_)))
    configs.set_override(fused=dataclasses.replace(base, split=split))
    try:
        out = _poison(x.shape, torch.float32)
        if api == "loss":
            got = fused.tr_fused_loss(x, t, w, w_total, den, out, -100, V, a, zl, scale, cap,
                                   True, 1)
            for f, g_, e in zip(("loss", "lse", "zpart"), got[:3], ref[:3]):
                if e.numel():
                    assert_close_normwise(g_, e, 2e-6, f)
            assert torch.equal(got[3], ref[3])
            assert_close_normwise(out, ref_out, 2e-6, "grad")
        else:
            got = fused.tr_fused(x, t, g0, w_t, wl_all, w_total, out, -100, V, a, zl, scale, cap,
                              True)
            for f, g_, e in zip(("m", "s", "zt", "sz"), got[:4], ref_s[:4]):
                assert_close_normwise(g_, e, 2e-6, f)
            assert torch.equal(got[4], ref_s[4])
            assert_close_normwise(out, ref_s_out, 2e-6, "grad")
        # every program took a ticket; every slot holds its part's record of its last row
        assert int(buf[0]) == groups * parts
        for row in range(max(0, n - 2 * groups), n):
            k, g = divmod(row, groups)
            assert ((slots[k % 2, g, :, :5] >> 32) == row + 1).all()
            assert torch.equal(slots[k % 2, g, :, 3] & 0xFFFFFFFF,
                               torch.stack([r_[row, 3] for r_ in recs]) & 0xFFFFFFFF)
    finally:
        configs.set_override(fused=None)


def test_rows_grid_split_only_where_programs_can_cooperate():
    """The table's SPLIT entry applies only to a plain call with a gradient: vocabulary
    parallel calls (gathered statistics, or PEER, whose programs already wait on other
    ranks') and statistics-only calls get the unsplit long-row entry (pass 2 backwards)."""
    x3 = torch.empty(1, 4, 600, device=DEV)
    cap = 3 if configs.INTERPRET else launch.sm_count(x3.device)  # programs: 1 per SM
    configs.set_override(fused=configs.RowsConfig(block=64, num_warps=1, per_sm=1,
                                        reverse=False, split=3))
    try:
        cfg, P, _ = configs.rows_grid(x3, x3, None, None, True)
        assert cfg.split == 3 and P == (9 if configs.INTERPRET else cap)
        for kw in (dict(resident=True), dict(splittable=False)):
            cfg, P, _ = configs.rows_grid(x3, x3, None, None, True, **kw)
            assert cfg.split == 1 and cfg.reverse and P == min(4, cap)
        cfg, _, _ = configs.rows_grid(x3, x3, None, None, False)
        assert cfg.split == 1
    finally:
        configs.set_override(fused=None)


@pytest.mark.parametrize("dynamic", [None, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_recompile_over_new_shapes(inplace, dynamic):
    """One compiled function called with new N and V: with the default (dynamic=None, which
    recompiles with symbolic sizes after a shape change) and with dynamic=False (one graph per
    shape), loss and gradient match the oracle every time. With symbolic sizes Inductor
    cannot rebuild a functionalised mutation of a (1, s, V) view (a PyTorch limitation), so
    the backend hands the ops [T, V] tensors when B = 1 (backend._k); before that, this failed
    at the second shape."""
    kw = dict(label_smoothing=0.1, z_loss=1e-3)

    def f(x, t):
        return fce.cross_entropy(x, t, backend="triton", inplace_backward=inplace, **kw)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
    with fce.validation(False):
        for shape, V in (((16,), 40), ((24,), 40), ((2, 12), 56), ((20,), 72), ((36,), 72),
                         ((3, 8), 72), ((5, 8), 72)):
            x0 = _x(shape, V, torch.float32)
            t = _t(shape, V)
            leaf = x0.clone().requires_grad_(True)
            x = leaf.clone() if inplace else leaf
            loss = cf(x, t)
            loss.backward()
            ref, gref = _ref_grad(x0, t, torch.tensor(1.0), **kw)
            assert_close_normwise(loss, ref, 1e-5, f"loss {shape} {V}")
            assert_close_normwise(leaf.grad, gref, 2e-5, f"grad {shape} {V}")


@pytest.mark.parametrize("case", ["loss_rows", "fused_loss", "fused_loss_zloss", "tr_fused",
                                  "row_stats", "row_stats_segments"])
def test_traced_launches_pass_no_tensor_twice(case, monkeypatch):
    """No launch passes one tensor twice, traced (fake tensors, with the ops as triton_ops) or
    not: a pointer a kernel does not use is None. Functionalisation clones each argument it
    takes to be mutated on its own and copies every clone back, so an output also passed in
    another argument's place could come back with that clone's content. The fused kernels'
    ops (tuple arguments) stay opaque: traced, they launch nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    class Rec:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(a)

    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(launch, "OPAQUE", False)  # triton_op ops: tracing reaches the launches
    monkeypatch.setattr(launch, "launcher", lambda kernel: Rec(kernel))
    monkeypatch.setattr(launch, "sm_count", lambda device: 4)
    n, V = 12, 300 if case != "row_stats_segments" else 20000

    def run():
        x3 = torch.randn(1, n, V)
        t = torch.randint(0, V, (n,))
        den = torch.ones((), dtype=torch.int64)
        if case == "loss_rows":
            fused._fused_loss(x3[0], t, None, None, den, None, -100, V, 0.1, 0.0, 1.0, None,
                              False, 1)
        elif case.startswith("fused_loss"):
            z = 1e-3 if case.endswith("zloss") else 0.0
            fused._fused_loss(x3[0], t, None, None, den, torch.empty(n, V), -100, V, 0.1, z,
                              1.0, None, False, 1)
        elif case == "tr_fused":
            launch.RAW["tr_fused"](x3, t, torch.ones(n), torch.ones(n), None, None,
                                   torch.empty(1, n, V), -100, V, 0.0, 0.0, 1.0, None, False)
        else:
            launch.RAW["tr_row_stats"](x3, t, None, 0, -100, 1.0, None, False, False, False)

    for traced in (True, False):
        calls.clear()
        if traced:
            with FakeTensorMode():
                run()
        else:
            run()
        if traced and case in ("loss_rows", "fused_loss", "fused_loss_zloss", "tr_fused"):
            assert not calls
            continue
        assert calls
        for args in calls:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            # (in place, x and out are one storage by the caller's choice; not here)
            assert len({id(a) for a in ts}) == len(ts), (case, traced)
