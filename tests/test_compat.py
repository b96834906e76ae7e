"""Seed-compatible entry points (fusedce.compat) against the fp64 oracle and their documents.

Every seed API is checked for what its page and documentation promises (docs/migration.md): names,
signatures and defaults, shapes and dtypes of every output, target shifting, reductions,
masks that never write into the caller's labels, z-loss outputs, empty results, and that
values and gradients equal the fp64 reference

    loss_row = F.cross_entropy(x, t, weight, label_smoothing)  (+ zl * lse^2 where asked)

of tests/oracle.py. Backends: the one fusedce picks on this machine ("auto"), a stand-in
eager/fused backend (the code path the Triton backend takes, built from the torch
backend) and the Triton backend itself through the interpreter when it is present. The
tensor-parallel forms run on 2 gloo ranks in one spawn (tests/dist_utils.run_ranks).
"""

from __future__ import annotations

import inspect
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F

from fusedce import functional as fce_functional
from fusedce.compat import nemo_automodel as na
from fusedce.compat import nemo_rl as rl
from fusedce.compat import torch_npu as npu
from fusedce.compat import transformer_engine as te
import eager_backend
from oracle import assert_close_normwise, ref_cross_entropy, ref_logprobs, tol

# ---------------------------------------------------------------- backends


EAGER = eager_backend.make("eager")


def _triton_backend():
    try:
        from fusedce.triton import backend as tb
    except Exception:  # noqa: BLE001 - the Triton backend may not be built yet
        return None
    return tb


@pytest.fixture(params=["auto", "eager", "triton"])
def backend(request, monkeypatch):
    """Force the backend every compat call ends up on (they take no backend argument)."""
    if request.param == "eager":
        monkeypatch.setattr(fce_functional, "pick_backend", lambda b, x: EAGER)
    elif request.param == "triton":
        tb = _triton_backend()
        if tb is None:
            pytest.skip("fusedce.triton.backend is not importable")
        monkeypatch.setattr(fce_functional, "pick_backend", lambda b, x: tb)
    return request.param


# ---------------------------------------------------------------- helpers


def _logits(shape, V, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, V) * scale).to(dtype)


def _targets(shape, V, ignore_frac=0.25, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, V, shape, dtype=dtype)
    drop = torch.rand(shape) < ignore_frac
    return torch.where(drop, torch.full_like(t, ignore_index), t)


def _rtol(dtype):
    return 2 * max(tol(dtype), 1e-5)


def _ref_grad(x, fn, g):
    """d fn(x) / dx applied to g, in fp64."""
    xr = x.detach().double().requires_grad_(True)
    out = fn(xr)
    out.backward(g.double())
    return out.detach(), xr.grad


# ================================================================ transformer_engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bsv", "sbv"])
@pytest.mark.parametrize("reduce_loss", [False, True])
def test_te_parallel_cross_entropy(backend, dtype, layout, reduce_loss):
    B, S, V = 3, 5, 37
    a = 0.1
    base = _logits((B, S), V, dtype)
    x = base if layout == "bsv" else base.transpose(0, 1)  # (SQ, B, V), non-contiguous
    t = _targets(x.shape[:-1], V, dtype=torch.int32)
    x.requires_grad_(True)
    before = x.detach().clone()
    loss = te.parallel_cross_entropy(x, t, a, reduce_loss, None, -100)
    assert loss.dtype == torch.float32
    assert loss.shape == (() if reduce_loss else t.shape)
    red = "mean" if reduce_loss else "none"
    g = torch.randn(loss.shape)
    ref, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(xr, t, reduction=red,
                                                           label_smoothing=a), g)
    assert_close_normwise(loss.detach(), ref, _rtol(dtype), "loss")
    loss.backward(g)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_close_normwise(x.grad, ref_g, _rtol(dtype), "grad")
    assert torch.equal(x.detach(), before), "the caller's logits were modified"


@pytest.mark.parametrize("reduce_loss", [False, True])
def test_te_autograd_function(backend, reduce_loss):
    B, S, V = 2, 7, 29
    x = _logits((B, S), V, torch.bfloat16).requires_grad_(True)
    t = _targets((B, S), V, ignore_index=5)
    before = x.detach().clone()
    # the full TE positional form, is_cg_capturable included
    loss = te.CrossEntropyFunction.apply(x, t, 0.0, reduce_loss, None, 5, True)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduce_loss else (B, S))
    g = torch.rand(loss.shape) + 0.5
    ref, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(
        xr, t, ignore_index=5, reduction="mean" if reduce_loss else "none"), g)
    assert_close_normwise(loss.detach(), ref, _rtol(torch.bfloat16), "loss")
    loss.backward(g)
    assert_close_normwise(x.grad, ref_g, _rtol(torch.bfloat16), "grad")
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.detach(), before)
    # defaults: label_smoothing=0, reduce_loss=False, ignore_idx=-100
    params = inspect.signature(te.CrossEntropyFunction.forward).parameters
    assert [p for p in params][:7] == ["ctx", "_input", "target", "label_smoothing",
                                       "reduce_loss", "dist_process_group", "ignore_idx"]
    assert params["label_smoothing"].default == 0.0 and params["reduce_loss"].default is False
    assert params["ignore_idx"].default == -100 and params["dist_process_group"].default is None
    assert na.CrossEntropyFunction is te.CrossEntropyFunction
    assert na.parallel_cross_entropy is te.parallel_cross_entropy


def test_te_function_without_grad_and_keywords():
    x = _logits((2, 3), 11)
    t = _targets((2, 3), 11)
    loss = te.CrossEntropyFunction.apply(x, t)
    assert not loss.requires_grad
    ref = ref_cross_entropy(x, t, reduction="none")
    assert_close_normwise(loss, ref, 1e-5, "no-grad loss")
    # TE 2.x keyword spelling, and the deprecated _input=
    assert_close_normwise(te.parallel_cross_entropy(inp=x, target=t), ref, 1e-5, "inp=")
    assert_close_normwise(te.parallel_cross_entropy(_input=x, target=t), ref, 1e-5, "_input=")
    with pytest.raises(TypeError):
        te.parallel_cross_entropy(x, t, _input=x)
    with pytest.raises(TypeError):
        te.parallel_cross_entropy(target=t)


def test_te_edge_cases():
    V = 13
    # all ignored with reduce_loss: 0 and zero gradient, never NaN (TE divides by 0)
    x = _logits((2, 4), V).requires_grad_(True)
    t = torch.full((2, 4), -100)
    loss = te.parallel_cross_entropy(x, t, 0.0, True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    # a flat target (TE only checks the count): the loss is shaped like the target (seeds
    # README: "shaped like target when reduce_loss=False"; TE itself returns (B, SQ))
    x = _logits((2, 4), V)
    t = _targets((8,), V)
    out = te.parallel_cross_entropy(x, t)
    assert out.shape == (8,)
    assert_close_normwise(out, ref_cross_entropy(x, t.view(2, 4), reduction="none").view(8),
                          1e-5, "")
    assert te.CrossEntropyFunction.apply(x, t, 0.0, False).shape == (8,)
    assert te.parallel_cross_entropy(x, t.view(2, 4)).shape == (2, 4)
    # empty batch
    e = te.parallel_cross_entropy(_logits((0, 4), V), torch.zeros(0, 4, dtype=torch.long))
    assert e.shape == (0, 4)
    # bad input raises before any kernel
    with pytest.raises(ValueError, match="target"):
        te.parallel_cross_entropy(x, torch.full((2, 4), V))
    with pytest.raises(ValueError, match="target"):
        te.parallel_cross_entropy(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing"):
        te.parallel_cross_entropy(x, t, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce_loss", [False, True])
def test_te_low_level_forward_backward(backend, dtype, reduce_loss):
    B, S, V = 3, 4, 23
    a = 0.2
    storage = _logits((S, B), V, dtype)
    buf = storage.transpose(0, 1)  # a strided (B, SQ, V) buffer, written in place
    t = _targets((B, S), V)
    x0 = buf.clone()
    loss, out = te.cross_entropy_forward(buf, t, a, reduce_loss, None, -100)
    assert out is buf
    assert loss.dtype == torch.float32 and loss.shape == (() if reduce_loss else (B, S))
    red = "mean" if reduce_loss else "none"
    ones = torch.ones(loss.shape)
    ref, ref_g = _ref_grad(x0, lambda xr: ref_cross_entropy(xr, t, reduction=red,
                                                            label_smoothing=a), ones)
    assert_close_normwise(loss, ref, _rtol(dtype), "loss")
    assert buf.dtype == dtype
    assert_close_normwise(buf, ref_g, _rtol(dtype), "gradient left in the input buffer")
    assert torch.count_nonzero(buf[t == -100]) == 0
    # backward: scalar grad_output, and one per row
    g = torch.tensor(2.5) if reduce_loss else torch.rand(B, S) + 0.5
    res = te.cross_entropy_backward(buf, g)
    assert res is buf
    scale = g if reduce_loss else g.unsqueeze(-1)
    assert_close_normwise(buf, ref_g * scale.double(), _rtol(dtype), "scaled gradient")
    # grad_output == 1 leaves the gradient as it is
    before = buf.clone()
    te.cross_entropy_backward(buf, torch.tensor(1.0), is_cg_capturable=True)
    assert torch.equal(buf, before)
    with pytest.raises(ValueError, match="grad_output"):
        te.cross_entropy_backward(buf, torch.ones(5))


# ================================================================ nemo_automodel


def test_automodel_flags_and_signatures():
    assert na.HAVE_TE_PARALLEL_CE is True
    assert isinstance(na.MISSING_TE_PARALLEL_CE_MSG, str) and na.MISSING_TE_PARALLEL_CE_MSG
    p = inspect.signature(na.TEParallelCrossEntropy.__init__).parameters
    assert p["ignore_index"].default == -100 and p["reduction"].default == "sum"
    assert p["tp_group"].default is None
    p = inspect.signature(na.ChunkedCrossEntropy.__init__).parameters
    assert (p["chunk_len"].default, p["compile"].default, p["ignore_index"].default) == \
        (32, True, -100)
    p = inspect.signature(na.compute_cross_entropy).parameters
    assert p["ignore_index"].default == -100
    with pytest.raises(ValueError, match="reduction"):
        na.TEParallelCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="chunk_len"):
        na.ChunkedCrossEntropy(chunk_len=0)
    assert isinstance(na.ChunkedCrossEntropy(), torch.nn.Module)
    for cls in (na.ChunkedCrossEntropy, na.TEParallelCrossEntropy):
        p = list(inspect.signature(cls.__call__).parameters.values())
        assert [q.name for q in p[:4]] == ["self", "logits", "labels", "mask"], cls
        assert p[3].default is None
    # "none" losses come back shaped like the labels, flat labels included
    x = _logits((2, 3), 11)
    flat = _targets((6,), 11)
    for loss_fn in (na.TEParallelCrossEntropy(reduction="none"),
                    na.ChunkedCrossEntropy(compile=False, reduction="none")):
        assert loss_fn(x, flat).shape == (6,)
        assert loss_fn(x, flat.view(2, 3)).shape == (2, 3)
    lw = torch.rand(6)
    out = na.TEParallelCrossEntropy()(x, flat, loss_weights=lw)
    ref = (ref_cross_entropy(x, flat.view(2, 3), reduction="none").reshape(6) * lw).sum()
    assert_close_normwise(out, ref, 1e-5, "loss_weights with flat labels")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_te_parallel_ce_module(backend, reduction, dtype):
    B, T, V = 2, 6, 31
    x = _logits((B, T), V, dtype).requires_grad_(True)
    labels = _targets((B, T), V)
    mask = (torch.rand(B, T) > 0.3).long()
    labels0 = labels.clone()
    loss = na.TEParallelCrossEntropy(reduction=reduction)(x, labels, mask)
    assert torch.equal(labels, labels0), "labels were modified by the mask"
    masked = torch.where(mask == 0, torch.full_like(labels, -100), labels)
    g = torch.randn(loss.shape)
    ref, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(xr, masked, reduction=reduction), g)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close_normwise(loss.detach(), ref, _rtol(dtype), "loss")
    loss.backward(g)
    assert x.grad.dtype == dtype
    assert_close_normwise(x.grad, ref_g, _rtol(dtype), "grad")


@pytest.mark.parametrize("count", [7, 7.0, "tensor", 0, "zero-tensor"])
def test_num_label_tokens(count):
    B, T, V = 2, 5, 17
    x = _logits((B, T), V).requires_grad_(True)
    labels = _targets((B, T), V)
    n = {"tensor": torch.tensor(7), "zero-tensor": torch.tensor(0)}.get(count, count)
    denom = 7.0 if count in (7, 7.0, "tensor") else 0.0
    for loss_fn in (na.TEParallelCrossEntropy(), na.ChunkedCrossEntropy()):
        x.grad = None
        loss = loss_fn(x, labels, num_label_tokens=n)
        assert loss.requires_grad and loss.shape == ()
        ref, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(xr, labels, reduction="sum"),
                               torch.tensor(1.0))
        if denom:
            assert_close_normwise(loss.detach(), ref / denom, 1e-5, "sum / n")
        else:
            assert loss.item() == 0.0  # a zero loss that still has its graph
        loss.backward()
        assert_close_normwise(x.grad, ref_g / denom if denom else ref_g * 0, 1e-5, "grad")
        assert not torch.isnan(x.grad).any()


def test_te_parallel_ce_loss_weights():
    B, T, V = 2, 5, 17
    x = _logits((B, T), V).requires_grad_(True)
    labels = _targets((B, T), V)
    w = torch.rand(B, T)
    loss = na.TEParallelCrossEntropy()(x, labels, loss_weights=w, num_label_tokens=3)
    ref, ref_g = _ref_grad(
        x, lambda xr: (ref_cross_entropy(xr, labels, reduction="none") * w.double()).sum() / 3,
        torch.tensor(1.0))
    assert_close_normwise(loss.detach(), ref, 1e-5, "weighted loss")
    loss.backward()
    assert_close_normwise(x.grad, ref_g, 1e-5, "weighted grad")
    with pytest.raises(ValueError, match="loss_weights"):
        na.TEParallelCrossEntropy(reduction="mean")(x, labels, loss_weights=w)
    with pytest.raises(ValueError, match="loss_weights"):
        na.TEParallelCrossEntropy()(x, labels, loss_weights=w[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy(backend, dtype):
    B, T, V = 3, 40, 29  # B * T spans several chunk_len=32 chunks
    x = _logits((B, T), V, dtype).requires_grad_(True)
    labels = _targets((B, T), V)
    mask = torch.rand(B, T) > 0.2
    labels0 = labels.clone()
    loss = na.ChunkedCrossEntropy()(x, labels, mask=mask)
    assert torch.equal(labels, labels0)
    masked = torch.where(mask, labels, torch.full_like(labels, -100))
    ref, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(xr, masked, reduction="sum"),
                           torch.tensor(1.0))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_normwise(loss.detach(), ref, _rtol(dtype), "sum")
    loss.backward()
    assert x.grad.dtype == dtype
    assert_close_normwise(x.grad, ref_g, _rtol(dtype), "grad")
    # compute_cross_entropy is the fp32 "sum" of F.cross_entropy on [N, V]
    flat = na.compute_cross_entropy(x.detach().view(-1, V), masked.view(-1))
    assert_close_normwise(flat, ref, _rtol(dtype), "compute_cross_entropy")


def test_chunked_cross_entropy_options():
    B, T, V = 2, 9, 19
    x = _logits((B, T), V)
    labels = _targets((B, T), V, ignore_index=0)
    for reduction in ("mean", "none"):
        out = na.ChunkedCrossEntropy(compile=False, ignore_index=0, reduction=reduction)(
            x, labels)
        assert_close_normwise(out, ref_cross_entropy(x, labels, ignore_index=0,
                                                     reduction=reduction), 1e-5, reduction)
    with pytest.raises(ValueError, match="num_label_tokens"):
        na.ChunkedCrossEntropy(compile=False, reduction="mean")(x, labels, num_label_tokens=3)
    # inplace_grad writes the gradient into the logits' storage
    xi = x.clone().requires_grad_(True)
    loss = na.ChunkedCrossEntropy(ignore_index=0, inplace_grad=True)(xi, labels)
    _, ref_g = _ref_grad(x, lambda xr: ref_cross_entropy(xr, labels, ignore_index=0,
                                                         reduction="sum"), torch.tensor(1.0))
    loss.backward()
    assert_close_normwise(xi.grad, ref_g, 1e-5, "inplace grad")
    # flat labels and a mask on another shape of the same size
    out = na.ChunkedCrossEntropy()(x, labels.view(-1), mask=torch.ones(B * T))
    assert_close_normwise(out, ref_cross_entropy(x, labels, reduction="sum"), 1e-5,
                          "flat labels")


def test_compiled_compute_cross_entropy(monkeypatch):
    """Created lazily; compiles on this machine, and falls back cleanly when it cannot."""
    monkeypatch.setattr(na, "_compiled_compute_cross_entropy", None)
    x = _logits((2, 6), 13)
    labels = _targets((2, 6), 13)
    ref = ref_cross_entropy(x, labels, reduction="mean")
    ce = na.ChunkedCrossEntropy(reduction="sum")
    ce(x, labels)
    # created by the first call with compile=True (seeds README: "created lazily"), but the
    # "sum" path runs the core and never compiles it
    fn = na._compiled_compute_cross_entropy
    assert fn is not None and fn.compiled is None and not fn.failed
    monkeypatch.setattr(na, "_compiled_compute_cross_entropy", None)
    na.ChunkedCrossEntropy(compile=False)(x, labels)
    assert na._compiled_compute_cross_entropy is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = na.ChunkedCrossEntropy(reduction="mean")(x, labels)
    assert not [w for w in seen if "using the eager function" in str(w.message)]
    fn = na._compiled_compute_cross_entropy
    assert fn is not None and not fn.failed and fn.compiled is not None
    assert_close_normwise(out, ref, 1e-5, "compiled")

    def broken_compile(*a, **k):
        def boom(*a, **k):
            raise RuntimeError("no compiler here")
        return boom

    monkeypatch.setattr(na, "_compiled_compute_cross_entropy", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="eager"):
        out = na.ChunkedCrossEntropy(reduction="mean")(x, labels)
    assert_close_normwise(out, ref, 1e-5, "fallback")
    assert na._compiled_compute_cross_entropy.failed
    out = na._compiled_compute_cross_entropy(x, labels, -100, "none")  # no second warning
    assert_close_normwise(out, ref_cross_entropy(x, labels, reduction="none"), 1e-5, "none")
    # a user error is still a user error
    with pytest.raises(ValueError, match="target"):
        na._compiled_compute_cross_entropy(x, torch.full((2, 6), 99))


# ================================================================ nemo_rl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distributed_logprob_single(backend, dtype):
    B, S, V = 2, 6, 23
    x = _logits((B, S), V, dtype).requires_grad_(True)
    t = torch.randint(0, V, (B, S))
    before = x.detach().clone()
    lp = rl.DistributedLogprob.apply(x, t, 0, V, None, False)
    assert lp.dtype == torch.float32 and lp.shape == (B, S)
    g = torch.randn(B, S)
    ref, ref_g = _ref_grad(x, lambda xr: ref_logprobs(xr, t), g)
    assert_close_normwise(lp.detach(), ref, _rtol(dtype), "logprobs")
    lp.backward(g)
    assert x.grad.dtype == dtype
    assert_close_normwise(x.grad, ref_g, _rtol(dtype), "grad")
    assert torch.equal(x.detach(), before)
    # inference_only keeps nothing: backward says so clearly
    lp = rl.DistributedLogprob.apply(x, t, 0, V, None, True)
    assert_close_normwise(lp.detach(), ref, _rtol(dtype), "inference_only")
    with pytest.raises(RuntimeError, match="inference_only"):
        lp.sum().backward()


def test_autograd_functions_differentiate_a_retained_graph_again():
    """As the seeds' own Functions: with retain_graph=True a second backward through
    DistributedLogprob (and TE's CrossEntropyFunction on the torch backend, whose gradient
    is not precomputed) adds the same gradient again; without it the graph is released
    (the standard error on a third pass); an in-place change to the output before the
    backward does not trip autograd's saved-tensor check."""
    B, S, V = 2, 5, 17
    t = torch.randint(0, V, (B, S))
    x = _logits((B, S), V).requires_grad_(True)
    y = rl.DistributedLogprob.apply(x, t, 0, V, None, False)
    g = torch.randn(B, S)
    y.backward(g, retain_graph=True)
    first = x.grad.clone()
    y.backward(g)
    assert torch.allclose(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(g)
    x.grad = None
    y = rl.DistributedLogprob.apply(x, t, 0, V, None, False)
    y.mul_(2.0)  # the caller's output is its own storage
    y.backward(g)
    assert torch.allclose(x.grad, 2 * first)
    xe = _logits((B, S), V).requires_grad_(True)
    loss = te.CrossEntropyFunction.apply(xe, t, 0.1, True, None, -100, False)
    loss.backward(retain_graph=True)
    first = xe.grad.clone()
    loss.backward()
    assert torch.allclose(xe.grad, 2 * first)


def test_from_parallel_logits_to_logprobs_shifts():
    B, S, V = 3, 7, 19
    x = _logits((B, S), V).requires_grad_(True)
    t = torch.randint(0, V, (B, S))
    out = rl.from_parallel_logits_to_logprobs(x, t, 0, V, None)
    assert out.shape == (B, S - 1) and out.dtype == torch.float32
    full = torch.log_softmax(x.detach().double(), -1)
    for b in range(B):
        for s in range(S - 1):
            assert abs(out[b, s].item() - full[b, s, t[b, s + 1]].item()) < 1e-5
    g = torch.randn(B, S - 1)
    out.backward(g)
    _, ref_g = _ref_grad(x[:, :-1], lambda xr: ref_logprobs(xr, t[:, 1:]), g)
    assert_close_normwise(x.grad[:, :-1], ref_g, 2e-5, "grad")
    assert torch.count_nonzero(x.grad[:, -1]) == 0, "the last position has no next token"
    inf = rl.from_parallel_logits_to_logprobs(x, t, 0, V, None, inference_only=True)
    assert inf.grad_fn is None and torch.allclose(inf, out.detach())
    # NeMo RL's current signature (tp_group fifth, positionally), the seed's group= kept
    names = list(inspect.signature(rl.from_parallel_logits_to_logprobs).parameters)
    assert names[:6] == ["vocab_parallel_logits", "target", "vocab_start_index",
                         "vocab_end_index", "tp_group", "inference_only"]
    assert {"cp_group", "chunk_size", "sampling_params", "group"} <= set(names)


def test_nemo_rl_log_softmax_and_errors():
    x = _logits((2, 3), 11, torch.bfloat16)
    ls = rl._compute_distributed_log_softmax(x, None)
    assert ls.dtype == torch.float32 and ls.shape == x.shape and not ls.requires_grad
    assert_close_normwise(ls, torch.log_softmax(x.double(), -1), 1e-5, "log_softmax")
    t = torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="vocab_end_index"):
        rl.DistributedLogprob.apply(x, t, 0, 10, None)
    with pytest.raises(ValueError, match="vocab_start_index"):
        rl.from_parallel_logits_to_logprobs(x, t, 3, 14, None)
    with pytest.raises(ValueError, match="target"):
        rl.DistributedLogprob.apply(x, torch.full((2, 3), 11), 0, 11, None)
    # -100 matches no shard: log-probability 0, as in NeMo RL
    lp = rl.DistributedLogprob.apply(x.float(), torch.full((2, 3), -100), 0, 11, None)
    assert torch.count_nonzero(lp) == 0


# ================================================================ torch_npu


def _npu_ref(x, t, weight, reduction, ignore_index, a, zl):
    """(loss, zloss) in fp64, zloss reduced with the loss's denominator."""
    loss = ref_cross_entropy(x, t, weight=weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=a)
    lse = torch.logsumexp(x.double(), -1)
    valid = t != ignore_index
    rows = torch.where(valid, zl * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss, rows
    if reduction == "sum":
        return loss, rows.sum()
    w_t = valid.double() if weight is None else \
        weight.double()[torch.where(valid, t, 0)] * valid
    den = w_t.sum()
    return loss, (rows.sum() / den if den > 0 else rows.sum() * 0)


NPU_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(weight=True, reduction="mean", label_smoothing=0.1, zl=1e-2),
    dict(label_smoothing=0.2, zl=5e-3, reduction="none"),
    dict(ignore_index=-1, zl=1e-3),
    dict(ignore_index=4, weight=True, reduction="sum", zl=1e-3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", NPU_CASES, ids=lambda c: ",".join(c) or "default")
def test_npu_cross_entropy_loss(case, dtype):
    N, C = 12, 37
    reduction = case.get("reduction", "mean")
    ig = case.get("ignore_index", -100)
    a = case.get("label_smoothing", 0.0)
    zl = case.get("zl", 0.0)
    weight = torch.rand(C) + 0.1 if case.get("weight") else None
    x = _logits((N,), C, dtype).requires_grad_(True)
    t = _targets((N,), C, ignore_index=ig)
    loss, log_prob, zloss, lse = npu.npu_cross_entropy_loss(
        x, t, weight, reduction, ig, a, zl, return_zloss=True)
    ref_loss, ref_z = _npu_ref(x.detach(), t, weight, reduction, ig, a, zl)
    shape = (N,) if reduction == "none" else (1,)
    for name, out in (("loss", loss), ("zloss", zloss), ("log_prob", log_prob), ("lse", lse)):
        assert out.dtype == dtype, name
    assert loss.shape == shape and zloss.shape == shape
    assert_close_normwise(loss.detach().reshape(ref_loss.shape), ref_loss, _rtol(dtype), "loss")
    assert_close_normwise(zloss.detach().reshape(ref_z.shape), ref_z, _rtol(dtype), "zloss")
    assert log_prob.shape == (N, C) and not log_prob.requires_grad
    assert_close_normwise(log_prob, torch.log_softmax(x.detach().double(), -1), _rtol(dtype),
                          "log_prob")
    if zl:
        assert lse.shape == (N,) and not lse.requires_grad
        assert_close_normwise(lse, torch.logsumexp(x.detach().double(), -1), _rtol(dtype), "lse")
    else:
        assert lse.numel() == 0
    # loss and zloss have their own gradients (the z-loss is not inside loss)
    g1, g2 = torch.randn(shape), torch.randn(shape)
    (gl,) = torch.autograd.grad(loss, x, g1.to(dtype), retain_graph=True)
    _, ref_gl = _ref_grad(x, lambda xr: _npu_ref(xr, t, weight, reduction, ig, a, zl)[0]
                          .reshape(shape), g1)
    assert_close_normwise(gl, ref_gl, _rtol(dtype), "d loss")
    if zl:
        (gz,) = torch.autograd.grad(zloss, x, g2.to(dtype))
        _, ref_gz = _ref_grad(x, lambda xr: _npu_ref(xr, t, weight, reduction, ig, a, zl)[1]
                              .reshape(shape), g2)
        assert gz.dtype == dtype
        assert_close_normwise(gz, ref_gz, _rtol(dtype), "d zloss")
    # the no-grad path computes the same z-loss
    with torch.no_grad():
        z2 = npu.npu_cross_entropy_loss(x, t, weight, reduction, ig, a, zl, True)[2]
    assert_close_normwise(z2.reshape(ref_z.shape), ref_z, _rtol(dtype), "no-grad zloss")


def test_npu_defaults_and_empties():
    N, C = 6, 9
    x = _logits((N,), C)
    t = torch.randint(0, C, (N,))
    params = inspect.signature(npu.npu_cross_entropy_loss).parameters
    assert [(k, p.default) for k, p in params.items()][2:] == [
        ("weight", None), ("reduction", "mean"), ("ignore_index", -100),
        ("label_smoothing", 0.0), ("lse_square_scale_for_zloss", 0.0), ("return_zloss", False)]
    loss, log_prob, zloss, lse = npu.npu_cross_entropy_loss(x, t)
    assert loss.shape == (1,) and zloss.numel() == 0 and lse.numel() == 0
    assert_close_normwise(loss.reshape(()), F.cross_entropy(x.double(), t), 1e-5, "default")
    # z-loss scale set, zloss not asked: loss unchanged, lse returned
    loss2, _, zl2, lse2 = npu.npu_cross_entropy_loss(x, t, lse_square_scale_for_zloss=0.5)
    assert torch.equal(loss2, loss) and zl2.numel() == 0 and lse2.shape == (N,)
    # zloss asked with a zero scale: zeros shaped like loss
    _, _, zl3, lse3 = npu.npu_cross_entropy_loss(x, t, reduction="none", return_zloss=True)
    assert zl3.shape == (N,) and torch.count_nonzero(zl3) == 0 and lse3.numel() == 0
    # N = 0 works (the NPU needs N > 0)
    out = npu.npu_cross_entropy_loss(torch.zeros(0, C), torch.zeros(0, dtype=torch.long),
                                     reduction="none", lse_square_scale_for_zloss=0.1,
                                     return_zloss=True)
    assert [o.shape for o in out] == [(0,), (0, C), (0,), (0,)]
    out = npu.npu_cross_entropy_loss(torch.zeros(0, C), torch.zeros(0, dtype=torch.long))
    assert out[0].shape == (1,) and out[0].item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        npu.npu_cross_entropy_loss(x, t, reduction="batchmean")
    with pytest.raises(ValueError, match="lse_square_scale_for_zloss"):
        npu.npu_cross_entropy_loss(x, t, lse_square_scale_for_zloss=-0.1)
    with pytest.raises(ValueError, match="target"):
        npu.npu_cross_entropy_loss(x, torch.full((N,), C))


# ================================================================ tensor parallel (2 gloo ranks)

WORLD = 2


def _tp_inputs(seed, V, B=2, T=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)
    t = torch.randint(0, V, (B, T), generator=gen)
    drop = torch.rand(B, T, generator=gen) < 0.25
    return full, torch.where(drop, torch.full_like(t, -100), t)


def _tp_te(rank, group, seed):
    V = 12 * WORLD
    n = V // WORLD
    for dtype in (torch.float32, torch.bfloat16):
        for reduce_loss in (False, True):
            full, t = _tp_inputs(seed + int(reduce_loss), V, dtype=dtype)
            shard = full[..., rank * n:(rank + 1) * n].clone().requires_grad_(True)
            loss = te.CrossEntropyFunction.apply(shard, t, 0.1, reduce_loss, group, -100)
            g = torch.ones(loss.shape) * 0.5 + 0.25 * torch.arange(loss.numel()).view(loss.shape)
            ref, ref_g = _ref_grad(full, lambda xr: ref_cross_entropy(
                xr, t, reduction="mean" if reduce_loss else "none", label_smoothing=0.1), g)
            assert_close_normwise(loss.detach(), ref, _rtol(dtype), "te tp loss")
            loss.backward(g)
            assert_close_normwise(shard.grad, ref_g[..., rank * n:(rank + 1) * n],
                                  _rtol(dtype), "te tp grad")
            # the functional form and the low-level pair agree
            f = te.parallel_cross_entropy(shard.detach(), t, 0.1, reduce_loss, group)
            assert_close_normwise(f, ref, _rtol(dtype), "parallel_cross_entropy tp")
            buf = full[..., rank * n:(rank + 1) * n].clone()
            l2, out = te.cross_entropy_forward(buf, t, 0.1, reduce_loss, group, -100)
            te.cross_entropy_backward(out, g)
            assert_close_normwise(l2, ref, _rtol(dtype), "cross_entropy_forward tp")
            assert_close_normwise(out, ref_g[..., rank * n:(rank + 1) * n], _rtol(dtype),
                                  "cross_entropy_forward tp grad")
    # uneven shards through the keyword-only vocab_start: [0, 5) and [5, 17)
    V = 17
    s, e = [(0, 5), (5, 17)][rank]
    full, t = _tp_inputs(seed + 3, V)
    shard = full[..., s:e].clone().requires_grad_(True)
    loss = te.CrossEntropyFunction.apply(shard, t, 0.2, True, group, -100, False, s)
    ref, ref_g = _ref_grad(full, lambda xr: ref_cross_entropy(xr, t, label_smoothing=0.2),
                           torch.tensor(1.0))
    assert_close_normwise(loss.detach(), ref, 1e-5, "te uneven loss")
    loss.backward()
    assert_close_normwise(shard.grad, ref_g[..., s:e], 1e-5, "te uneven grad")
    f = te.parallel_cross_entropy(shard.detach(), t, 0.2, True, group, vocab_start=s)
    assert_close_normwise(f, ref, 1e-5, "parallel_cross_entropy uneven")
    # the autograd Function under torch.compile(fullgraph=True), sharded, against eager
    t2 = t.clone()
    t2[0, 0] = -100
    for reduce_loss in (False, True):
        torch._dynamo.reset()
        xs = full[..., s:e].clone().requires_grad_(True)
        out = torch.compile(lambda x: te.CrossEntropyFunction.apply(
            x, t2, 0.2, reduce_loss, group, -100, False, s), fullgraph=True,
            backend="aot_eager")(xs)
        xe = full[..., s:e].clone().requires_grad_(True)
        want = te.CrossEntropyFunction.apply(xe, t2, 0.2, reduce_loss, group, -100, False, s)
        g = torch.tensor(1.5) if reduce_loss else torch.linspace(-1, 1, t2.numel()).view(
            t2.shape)
        out.backward(g)
        want.backward(g)
        assert_close_normwise(out.detach(), want.detach(), 1e-6, "te compiled tp loss")
        assert_close_normwise(xs.grad, xe.grad, 1e-6, "te compiled tp grad")


def _tp_automodel(rank, group, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    V = 10 * WORLD
    n = V // WORLD
    full, labels = _tp_inputs(seed, V)
    mask = (torch.arange(10).view(2, 5) % 3 != 0).long()
    masked = torch.where(mask == 0, torch.full_like(labels, -100), labels)
    labels0 = labels.clone()
    shard = full[..., rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = na.TEParallelCrossEntropy(tp_group=group)(shard, labels, mask, num_label_tokens=4)
    assert torch.equal(labels, labels0)
    ref, ref_g = _ref_grad(full, lambda xr: ref_cross_entropy(xr, masked, reduction="sum") / 4,
                           torch.tensor(1.0))
    assert_close_normwise(loss.detach(), ref, 1e-5, "TEParallelCrossEntropy tp")
    loss.backward()
    assert_close_normwise(shard.grad, ref_g[..., rank * n:(rank + 1) * n], 1e-5, "tp grad")
    # DTensor logits sharded on the vocabulary (also unevenly): the mesh's group is used
    mesh = init_device_mesh("cpu", (WORLD,))
    for V in (10 * WORLD, 10 * WORLD + 1):
        full, labels = _tp_inputs(seed + V, V)
        dt = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_(True)
        out = na.TEParallelCrossEntropy(reduction="mean")(dt, labels)
        ref, ref_g = _ref_grad(full, lambda xr: ref_cross_entropy(xr, labels),
                               torch.tensor(1.0))
        assert_close_normwise(out.detach(), ref, 1e-5, f"dtensor mean V={V}")
        out.backward()
        assert_close_normwise(dt.grad.full_tensor(), ref_g, 1e-5, f"dtensor grad V={V}")
    # uneven plain shards through the keyword-only vocab_start
    s, e = [(0, 4), (4, 11)][rank]
    full, labels = _tp_inputs(seed + 5, 11)
    out = na.TEParallelCrossEntropy(tp_group=group, vocab_start=s)(full[..., s:e], labels)
    assert_close_normwise(out, ref_cross_entropy(full, labels, reduction="sum"), 1e-5,
                          "uneven sum")


def _tp_nemo_rl(rank, group, seed):
    V = 13  # uneven shards: [0, 6) and [6, 13)
    bounds = [(0, 6), (6, 13)]
    s, e = bounds[rank]
    full, _ = _tp_inputs(seed, V, B=2, T=6)
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, V, (2, 6), generator=gen)
    shard = full[..., s:e].clone().requires_grad_(True)
    lp = rl.DistributedLogprob.apply(shard, t, s, e, group, False)
    g = torch.linspace(-1, 1, 12).view(2, 6)
    ref, ref_g = _ref_grad(full, lambda xr: ref_logprobs(xr, t), g)
    assert_close_normwise(lp.detach(), ref, 1e-5, "DistributedLogprob tp")
    lp.backward(g)
    assert_close_normwise(shard.grad, ref_g[..., s:e], 1e-5, "DistributedLogprob tp grad")
    shifted = rl.from_parallel_logits_to_logprobs(shard.detach(), t, s, e, group)
    assert shifted.shape == (2, 5)
    assert_close_normwise(shifted, ref_logprobs(full[:, :-1], t[:, 1:]), 1e-5, "shifted tp")
    inf = rl.DistributedLogprob.apply(shard, t, s, e, group, True)
    assert_close_normwise(inf.detach(), ref, 1e-5, "inference_only tp")
    # equal shards for the log-softmax (rank r holds [r * V_local, ...))
    full2, _ = _tp_inputs(seed + 2, 8)
    ls = rl._compute_distributed_log_softmax(full2[..., rank * 4:(rank + 1) * 4], group)
    assert_close_normwise(ls, torch.log_softmax(full2.double(), -1)[..., rank * 4:(rank + 1) * 4],
                          1e-5, "log_softmax tp")
    # group=None in a running multi-rank job is the default group, as torch.distributed (and
    # the original's all-reduces) take it
    ls0 = rl._compute_distributed_log_softmax(full2[..., rank * 4:(rank + 1) * 4], None)
    assert torch.equal(ls0, ls)
    lp0 = rl.DistributedLogprob.apply(shard.detach(), t, s, e, None, True)
    assert torch.equal(lp0, inf.detach())
    # the autograd Function under torch.compile(fullgraph=True), sharded
    torch._dynamo.reset()
    xs = full[..., s:e].clone().requires_grad_(True)
    out = torch.compile(lambda x: rl.DistributedLogprob.apply(x, t, s, e, group),
                        fullgraph=True, backend="aot_eager")(xs)
    assert_close_normwise(out.detach(), ref, 1e-5, "DistributedLogprob compiled tp")
    out.backward(g)
    assert_close_normwise(xs.grad, ref_g[..., s:e], 1e-5, "DistributedLogprob compiled tp grad")
    # uneven shards for the log-softmax: the seed's signature has no offsets, and the
    # normalisation needs none (the shards are taken in rank order)
    for dt in (torch.float32, torch.bfloat16):
        lsu = rl._compute_distributed_log_softmax(full[..., s:e].to(dt), group)
        assert lsu.dtype == torch.float32 and lsu.shape == (2, 6, e - s)
        assert_close_normwise(lsu, torch.log_softmax(full.to(dt).double(), -1)[..., s:e],
                              1e-5, f"log_softmax tp uneven {dt}")


TP_CASES = {"te": _tp_te, "automodel": _tp_automodel, "nemo_rl": _tp_nemo_rl}


def tp_worker(ctx, seed):
    """Every TP case on this rank; returns {case: None or traceback}."""
    import torch.distributed as dist

    from dist_utils import progress

    results = {}
    for name, fn in TP_CASES.items():
        progress(name)
        try:
            fn(ctx.rank, dist.group.WORLD, seed)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case to the parent
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def tp_results():
    from dist_utils import run_ranks

    seed = int(torch.randint(0, 2**30, ()).item())
    return run_ranks(tp_worker, WORLD, seed, timeout=180.0)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel(tp_results, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(tp_results) if res[case]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_function_adapters_compile_fullgraph(dtype):
    """DistributedLogprob and TE's CrossEntropyFunction under torch.compile(fullgraph=True)
    with an input that requires grad: while traced they keep the core's lse and write the
    gradient from it (Dynamo cannot trace the autograd.grad of the eager form); loss and
    gradient equal eager's, ignored rows with NaN logits included."""
    x0 = (torch.randn(2, 3, 11) * 2).to(dtype)
    t = torch.randint(0, 11, (2, 3))
    t[0, 1] = -100
    x0[0, 1, 3] = float("nan")
    cases = [("DistributedLogprob",
              lambda x: rl.DistributedLogprob.apply(x, t.clamp_min(0), 0, 11, None),
              torch.randn(2, 3))]
    for a in (0.0, 0.1):
        for red in (False, True):
            cases.append((f"CrossEntropyFunction a={a} reduce={red}",
                          lambda x, a=a, red=red: te.CrossEntropyFunction.apply(x, t, a, red),
                          torch.tensor(1.7) if red else torch.randn(2, 3)))
    for name, fn, g in cases:
        if name == "DistributedLogprob":
            x0c = x0.clone()
            x0c[0, 1, 3] = 0.0  # (no ignore index there: every row counts)
        else:
            x0c = x0
        torch._dynamo.reset()
        x = x0c.clone().requires_grad_(True)
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        out.backward(g)
        xe = x0c.clone().requires_grad_(True)
        want = fn(xe)
        want.backward(g)
        assert out.dtype == want.dtype and out.shape == want.shape, name
        assert torch.equal(torch.isnan(out), torch.isnan(want)), name
        assert_close_normwise(out.detach(), want.detach(), 1e-6, name)
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name
        assert_close_normwise(x.grad, xe.grad, 1e-6, f"{name} grad")
