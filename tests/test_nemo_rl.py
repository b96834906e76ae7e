"""fusedce.compat.nemo_rl against fp64 references written from the definitions.

Every function (values and gradients) is compared with log_softmax / softmax in float64 on
the whole vocabulary and sequence: single-process here, and on 2 gloo ranks (one spawn,
tests/dist_utils.run_ranks) with uneven vocabulary shards, context parallelism (Megatron
layout and DTensor), the earlier ``group=`` and the current ``tp_group=`` spellings, with
and without ``chunk_size``, and with top-k / top-p filtering.

The filter's reference is its definition: top-k keeps the logits >= the k-th largest;
top-p sorts the probabilities over the columns top-k kept ascending and keeps those whose
cumulative sum exceeds 1 - top_p, and always the largest; filtered columns are -inf before
the log-softmax. Inputs with a filter are tie-free (distinct multiples of 1/16, exact in
bfloat16), so that a sort that splits equal logits never decides a column.
"""

from __future__ import annotations

import inspect
import math
import traceback

import pytest
import torch

import fusedce as fce
from fusedce.compat import nemo_rl as rl

WORLD = 2
INF = math.inf
SP = rl.TrainingSamplingParams

# (top_k, top_p) cases; temperature is the caller's (see test_temperature_is_not_applied)
FILTERS = [(None, 1.0), (4, 1.0), (None, 0.7), (6, 0.8), (0, 0.95), (50, 0.5), (-1, 1.0)]


# ---------------------------------------------------------------- fp64 references


def ref_keep(x, top_k=None, top_p=1.0):
    """Columns NeMo RL's top-k / top-p keep, from the definition, in fp64."""
    x = x.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None and 0 < top_k < x.shape[-1]:
        keep = x >= x.topk(top_k, dim=-1).values[..., -1:]
    if top_p is not None and top_p != 1.0:
        z = x.masked_fill(~keep, -INF)
        srt, idx = z.sort(dim=-1)
        kept = torch.softmax(srt, dim=-1).cumsum(dim=-1) > 1 - top_p
        kept[..., -1] = True
        keep = keep & torch.zeros_like(kept).scatter(-1, idx, kept)
    return keep


def ref_token_lp(x, t, keep=None):
    """log_softmax(x, filtered)[t] in fp64, differentiable; t == -100 gives 0."""
    z = x.double()
    if keep is not None:
        z = z.masked_fill(~keep, -INF)
    lp = torch.log_softmax(z, dim=-1)
    out = lp.gather(-1, t.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(t != -100, out, torch.zeros_like(out))


def ref_next_token(x, target, top_k=None, top_p=1.0):
    """[B, S-1]: log p(target[s + 1] | x[s]) with the filter."""
    xs = x[:, :-1]
    keep = ref_keep(xs.detach(), top_k, top_p)
    return ref_token_lp(xs, target[:, 1:], keep)


def ref_neg_entropy(x):
    lp = torch.log_softmax(x.double(), dim=-1)
    return (lp.exp() * lp).sum(-1)


def ref_gather(x, idx):
    lp = torch.log_softmax(x.double(), dim=-1)
    out = lp.gather(-1, idx.long().clamp(min=0))
    return torch.where(idx != -100, out, torch.zeros_like(out))


def ref_grad(x, fn, g):
    """(fn(x), d fn / dx applied to g), in fp64."""
    xr = x.detach().double().requires_grad_(True)
    out = fn(xr)
    out.backward(g.double())
    return out.detach(), xr.grad


def close(out, ref, tol, what):
    """Same shape, -inf at the same places, finite parts within tol (normwise)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN"
    inf_o, inf_r = torch.isinf(out), torch.isinf(ref)
    assert torch.equal(inf_o, inf_r), f"{what}: infinite at other places"
    assert torch.equal(out[inf_o], ref[inf_r]), f"{what}: infinities differ"
    a, b = out[~inf_o], ref[~inf_r]
    if not b.numel():
        return
    err = float((a - b).norm() / b.norm().clamp_min(1e-3 * b.numel() ** 0.5))
    assert err <= tol, f"{what}: normwise error {err:.2e} > {tol:.0e}"


def tol(dtype):
    return 2e-5 if dtype == torch.float32 else 2e-2


def tie_free(shape, V, gen, dtype=torch.float32):
    """Logits whose rows hold distinct multiples of 1/16 (exact in bfloat16)."""
    rows = math.prod(shape)
    keys = torch.rand(rows, V, generator=gen).argsort(dim=-1).double()
    x = (keys - V / 2) / 16 * 3
    return x.view(*shape, V).to(dtype)


def gaussian(shape, V, gen, dtype=torch.float32):
    return (torch.randn(*shape, V, generator=gen) * 3).to(dtype)


# ---------------------------------------------------------------- single process


def test_signatures_follow_nemo_rl():
    names = list(inspect.signature(rl.from_parallel_logits_to_logprobs).parameters)
    assert names == ["vocab_parallel_logits", "target", "vocab_start_index", "vocab_end_index",
                     "tp_group", "inference_only", "cp_group", "chunk_size", "sampling_params",
                     "group"]
    assert list(inspect.signature(rl.get_next_token_logprobs_from_logits).parameters) == [
        "input_ids", "next_token_logits", "seq_index", "vocab_parallel_rank",
        "vocab_parallel_group", "context_parallel_group", "sampling_params", "chunk_size"]
    fwd = {cls: list(inspect.signature(cls.forward).parameters)[1:]
           for cls in (rl.ChunkedDistributedLogprob, rl.ChunkedDistributedGatherLogprob,
                       rl.ChunkedDistributedEntropy)}
    assert fwd[rl.ChunkedDistributedLogprob] == [
        "vocab_parallel_logits", "target", "vocab_start_index", "vocab_end_index",
        "chunk_size", "tp_group", "inference_only"]
    assert fwd[rl.ChunkedDistributedGatherLogprob] == [
        "vocab_parallel_logits", "global_indices", "vocab_start_index", "vocab_end_index",
        "chunk_size", "tp_group", "inference_only"]
    assert fwd[rl.ChunkedDistributedEntropy] == [
        "vocab_parallel_logits", "chunk_size", "tp_group", "inference_only"]
    sp = rl.TrainingSamplingParams()
    assert (sp.top_k, sp.top_p, sp.temperature) == (None, 1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_from_parallel_logits_to_logprobs_single(dtype, chunk_size):
    gen = torch.Generator().manual_seed(11)
    B, S, V = 2, 7, 23
    for i, (k, p) in enumerate(FILTERS):
        x = tie_free((B, S), V, gen, dtype).requires_grad_(True)
        t = torch.randint(0, V, (B, S), generator=gen)
        sp = SP(top_k=k, top_p=p)
        g = torch.randn(B, S - 1, generator=gen)
        ref, ref_g = ref_grad(x, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), g)
        # the earlier spelling, the current one positionally and by keyword
        calls = [((), {"group": None, "chunk_size": chunk_size, "sampling_params": sp}),
                 ((None, False, None, chunk_size, sp), {}),
                 ((), {"tp_group": None, "chunk_size": chunk_size, "sampling_params": sp})]
        for j, (args, kwargs) in enumerate(calls):
            x.grad = None
            out = rl.from_parallel_logits_to_logprobs(x, t, 0, V, *args, **kwargs)
            assert out.dtype == torch.float32 and out.shape == (B, S - 1)
            close(out, ref, tol(torch.float32), f"values {k, p} call {j}")
            out.backward(g)
            assert x.grad.dtype == dtype
            close(x.grad, ref_g, tol(dtype), f"grad {k, p} call {j}")
        inf = rl.from_parallel_logits_to_logprobs(x, t, 0, V, None, True,
                                                  chunk_size=chunk_size, sampling_params=sp)
        assert inf.grad_fn is None
        close(inf, ref, tol(torch.float32), f"inference_only {k, p}")


def test_filtered_out_target_gets_minus_inf_and_the_rest_its_gradient():
    V = 12
    x = torch.arange(V, dtype=torch.float32).repeat(1, 3, 1).requires_grad_(True)
    t = torch.tensor([[0, 0, 11]])  # position 0 scores id 0 (filtered), 1 scores 11 (kept)
    out = rl.from_parallel_logits_to_logprobs(x, t, 0, V, None, sampling_params=SP(top_k=3))
    assert out[0, 0].item() == -INF and math.isfinite(out[0, 1].item())
    out.backward(torch.ones(1, 2))
    p = torch.softmax(torch.arange(9, 12, dtype=torch.float64), 0)
    assert torch.count_nonzero(x.grad[0, 0, :9]) == 0  # filtered columns: no gradient
    assert torch.allclose(x.grad[0, 0, 9:].double(), -p, atol=1e-6)  # the target's is 0


def test_temperature_is_not_applied():
    """NeMo RL's trainers divide the logits by the temperature before scoring; the scoring
    functions ignore it (applying it again would score another distribution)."""
    gen = torch.Generator().manual_seed(3)
    x = tie_free((2, 6), 17, gen)
    t = torch.randint(0, 17, (2, 6), generator=gen)
    for k, p in [(None, 1.0), (5, 0.9)]:
        a = rl.from_parallel_logits_to_logprobs(x, t, 0, 17, None,
                                                sampling_params=SP(k, p, temperature=2.5))
        b = rl.from_parallel_logits_to_logprobs(x, t, 0, 17, None, sampling_params=SP(k, p))
        assert torch.equal(a, b)
        # any object with the three attributes, or a mapping, stands for NeMo RL's dataclass
        c = rl.from_parallel_logits_to_logprobs(x, t, 0, 17, None,
                                                sampling_params={"top_k": k, "top_p": p})
        assert torch.equal(a, c)
        # the caller's division comes first, then the filter: the reference on x / T
        scaled = rl.from_parallel_logits_to_logprobs(x / 2.5, t, 0, 17, None,
                                                     sampling_params=SP(k, p, 2.5))
        close(scaled, ref_next_token(x / 2.5, t, k, p), 2e-5, f"scaled {k, p}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_functions_single(dtype):
    gen = torch.Generator().manual_seed(5)
    B, S, V, K = 2, 7, 19, 4
    x = gaussian((B, S), V, gen, dtype)
    t = torch.randint(0, V, (B, S), generator=gen)
    t[0, 2] = -100
    idx = torch.randint(0, V, (B, S, K), generator=gen)
    idx[1, 3, 0] = -100
    idx[0, 1, 1] = idx[0, 1, 0]  # a repeated id
    g = torch.randn(B, S, generator=gen)
    gk = torch.randn(B, S, K, generator=gen)
    for chunk in (1, 3, 7, 100):
        xs = x.clone().requires_grad_(True)
        out = rl.ChunkedDistributedLogprob.apply(xs, t, 0, V, chunk, None, False)
        ref, ref_g = ref_grad(x, lambda xr, t=t: ref_token_lp(xr, t), g)
        close(out, ref, tol(torch.float32), f"logprob chunk {chunk}")
        out.backward(g)
        assert xs.grad.dtype == dtype
        close(xs.grad, ref_g, tol(dtype), f"logprob grad chunk {chunk}")

        xs = x.clone().requires_grad_(True)
        out = rl.ChunkedDistributedGatherLogprob.apply(xs, idx, 0, V, chunk, None, False)
        ref, ref_g = ref_grad(x, lambda xr, idx=idx: ref_gather(xr, idx), gk)
        assert out.shape == (B, S, K) and out.dtype == torch.float32
        close(out, ref, tol(torch.float32), f"gather chunk {chunk}")
        out.backward(gk)
        close(xs.grad, ref_g, tol(dtype), f"gather grad chunk {chunk}")

        xs = x.clone().requires_grad_(True)
        out = rl.ChunkedDistributedEntropy.apply(xs, chunk, None, False)
        ref, ref_g = ref_grad(x, ref_neg_entropy, g)
        close(out, ref, tol(torch.float32), f"entropy chunk {chunk}")
        assert (out <= 0).all()
        out.backward(g)
        close(xs.grad, ref_g, tol(dtype), f"entropy grad chunk {chunk}")


def test_chunked_inference_only_and_errors():
    x = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randint(0, 11, (2, 5))
    idx = torch.randint(0, 11, (2, 5, 3))
    for out in (rl.ChunkedDistributedLogprob.apply(x, t, 0, 11, 2, None, True),
                rl.ChunkedDistributedGatherLogprob.apply(x, idx, 0, 11, 2, None, True),
                rl.ChunkedDistributedEntropy.apply(x, 2, None, True)):
        with pytest.raises(RuntimeError, match="inference_only"):
            out.sum().backward()
    with pytest.raises(ValueError, match="chunk_size"):
        rl.ChunkedDistributedLogprob.apply(x, t, 0, 11, 0, None)
    with pytest.raises(ValueError, match="chunk_size"):
        rl.from_parallel_logits_to_logprobs(x, t, 0, 11, None, chunk_size=-1)
    with pytest.raises(ValueError, match="vocab_end_index"):
        rl.ChunkedDistributedGatherLogprob.apply(x, idx, 0, 12, 2, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rl.ChunkedDistributedGatherLogprob.apply(x, torch.full((2, 5, 3), 11), 0, 11, 2, None)
    with fce.validation(False):  # as NeMo RL: an id no shard holds gives 0
        out = rl.ChunkedDistributedGatherLogprob.apply(x, torch.full((2, 5, 3), 11), 0, 11, 2,
                                                       None)
        assert torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="global_indices"):
        rl.ChunkedDistributedGatherLogprob.apply(x, idx[..., 0], 0, 11, 2, None)
    with pytest.raises(TypeError, match="once"):
        rl.from_parallel_logits_to_logprobs(x, t, 0, 11, None, group=object())
    with pytest.raises(TypeError, match="tp_group"):
        rl.from_parallel_logits_to_logprobs(x, t, 0, 11)
    with pytest.raises(ValueError, match="positions"):
        rl.from_parallel_logits_to_logprobs(x, torch.randint(0, 11, (2, 6)), 0, 11, None)
    with pytest.raises(TypeError, match="top_k"):
        rl.from_parallel_logits_to_logprobs(x, t, 0, 11, None, sampling_params=SP(top_k=2.5))
    with pytest.raises(ValueError, match="vocab_parallel_rank"):
        rl.get_next_token_logprobs_from_logits(t, x, vocab_parallel_group=object())


def test_get_next_token_logprobs_plain_and_padding():
    gen = torch.Generator().manual_seed(9)
    B, S, V = 2, 6, 15
    x = tie_free((B, S), V, gen, torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, V, (B, S), generator=gen)
    g = torch.randn(B, S - 1, generator=gen)
    for k, p in FILTERS[:4]:
        x.grad = None
        out = rl.get_next_token_logprobs_from_logits(t, x, sampling_params=SP(k, p),
                                                     chunk_size=2)
        ref, ref_g = ref_grad(x, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), g)
        assert out.dtype == torch.float32
        close(out, ref, 2e-5, f"plain {k, p}")
        out.backward(g)
        close(x.grad, ref_g, 2e-2, f"plain grad {k, p}")
    # logits longer than the targets (padding, as NeMo RL pads the context-parallel case)
    short = t[:, :4]
    out = rl.from_parallel_logits_to_logprobs(x.detach(), short, 0, V, None)
    close(out, ref_next_token(x.detach()[:, :4], short), 2e-5, "padded")


# ---------------------------------------------------------------- 2 gloo ranks


def _even(V, rank):
    n = V // WORLD
    return rank * n, (rank + 1) * n


UNEVEN = {13: [(0, 6), (6, 13)], 23: [(0, 15), (15, 23)]}


def _cp_local(full, rank, cp, dim=1):
    """This rank's two load-balanced pieces (r and 2C - 1 - r) of the sequence."""
    h = full.shape[dim] // (2 * cp)
    a = full.narrow(dim, rank * h, h)
    b = full.narrow(dim, (2 * cp - 1 - rank) * h, h)
    return torch.cat([a, b], dim=dim)


def case_tp_from_parallel(rank, gens, solo):
    """Uneven shards; both spellings; chunk_size set and not; every filter; bf16 too."""
    import torch.distributed as dist

    gen = gens()
    B, S = 2, 6
    for V in (13, 23):
        s, e = UNEVEN[V][rank]
        for dtype in (torch.float32, torch.bfloat16):
            for k, p in FILTERS:
                full = tie_free((B, S), V, gen, dtype)
                t = torch.randint(0, V, (B, S), generator=gen)
                g = torch.randn(B, S - 1, generator=gen)
                ref, ref_g = ref_grad(full, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), g)
                sp = SP(top_k=k, top_p=p, temperature=0.7)
                for chunk in (None, 2):
                    for spelling in ("group", "tp_group", "positional"):
                        shard = full[..., s:e].clone().requires_grad_(True)
                        if spelling == "group":
                            out = rl.from_parallel_logits_to_logprobs(
                                shard, t, s, e, group=dist.group.WORLD, chunk_size=chunk,
                                sampling_params=sp)
                        elif spelling == "tp_group":
                            out = rl.from_parallel_logits_to_logprobs(
                                shard, t, s, e, tp_group=dist.group.WORLD, chunk_size=chunk,
                                sampling_params=sp)
                        else:
                            out = rl.from_parallel_logits_to_logprobs(
                                shard, t, s, e, dist.group.WORLD, False, None, chunk, sp)
                        what = f"V={V} {dtype} {k, p} chunk={chunk} {spelling}"
                        close(out, ref, tol(torch.float32), what)
                        out.backward(g)
                        close(shard.grad, ref_g[..., s:e], tol(dtype), what + " grad")
                inf = rl.from_parallel_logits_to_logprobs(
                    full[..., s:e], t, s, e, None, True, sampling_params=sp)
                close(inf, ref, tol(torch.float32), f"V={V} {k, p} inference_only, group None")


def case_tp_chunked_functions(rank, gens, solo):
    import torch.distributed as dist

    gen = gens()
    B, S, K = 2, 5, 3
    grp = dist.group.WORLD
    for V in (13, 23):
        s, e = UNEVEN[V][rank]
        for dtype in (torch.float32, torch.bfloat16):
            full = gaussian((B, S), V, gen, dtype)
            t = torch.randint(0, V, (B, S), generator=gen)
            t[1, 1] = -100
            idx = torch.randint(0, V, (B, S, K), generator=gen)
            idx[0, 0, 2] = -100
            idx[1, 2, 1] = idx[1, 2, 0]
            g = torch.randn(B, S, generator=gen)
            gk = torch.randn(B, S, K, generator=gen)
            for chunk in (1, 2, 5):
                what = f"V={V} {dtype} chunk={chunk}"
                shard = full[..., s:e].clone().requires_grad_(True)
                out = rl.ChunkedDistributedLogprob.apply(shard, t, s, e, chunk, grp, False)
                ref, ref_g = ref_grad(full, lambda xr, t=t: ref_token_lp(xr, t), g)
                close(out, ref, tol(torch.float32), "logprob " + what)
                out.backward(g)
                close(shard.grad, ref_g[..., s:e], tol(dtype), "logprob grad " + what)

                shard = full[..., s:e].clone().requires_grad_(True)
                out = rl.ChunkedDistributedGatherLogprob.apply(shard, idx, s, e, chunk, grp)
                ref, ref_g = ref_grad(full, lambda xr, idx=idx: ref_gather(xr, idx), gk)
                close(out, ref, tol(torch.float32), "gather " + what)
                out.backward(gk)
                close(shard.grad, ref_g[..., s:e], tol(dtype), "gather grad " + what)

                shard = full[..., s:e].clone().requires_grad_(True)
                out = rl.ChunkedDistributedEntropy.apply(shard, chunk, grp, False)
                ref, ref_g = ref_grad(full, ref_neg_entropy, g)
                close(out, ref, tol(torch.float32), "entropy " + what)
                out.backward(g)
                close(shard.grad, ref_g[..., s:e], tol(dtype), "entropy grad " + what)
            # DistributedLogprob (unshifted, the earlier Function) on the same shards
            shard = full[..., s:e].clone().requires_grad_(True)
            out = rl.DistributedLogprob.apply(shard, t, s, e, grp, False)
            ref, ref_g = ref_grad(full, lambda xr, t=t: ref_token_lp(xr, t), g)
            close(out, ref, tol(torch.float32), f"DistributedLogprob V={V} {dtype}")
            out.backward(g)
            close(shard.grad, ref_g[..., s:e], tol(dtype), f"DistributedLogprob grad V={V}")
    # an id outside the vocabulary raises on every rank
    s, e = UNEVEN[13][rank]
    try:
        rl.ChunkedDistributedGatherLogprob.apply(torch.randn(1, 2, e - s),
                                                 torch.full((1, 2, 1), 13), s, e, 1, grp)
    except ValueError as exc:
        assert "outside the vocabulary" in str(exc)
    else:
        raise AssertionError("an id outside the vocabulary did not raise")


def case_context_parallel(rank, gens, solo):
    """cp group of 2 (the vocabulary on one device: a group of one rank), load-balanced
    pieces, padded targets; the gradient of the gather sums every cp rank's upstream."""
    import torch.distributed as dist

    gen = gens()
    B, S, V, C = 2, 8, 11, WORLD
    cp = dist.group.WORLD
    for k, p in [(None, 1.0), (3, 1.0), (None, 0.8), (5, 0.6)]:
        for n in (S, S - 3):  # whole sequences and padded ones
            full = tie_free((B, S), V, gen)
            t = torch.randint(0, V, (B, n), generator=gen)
            # every cp rank's own upstream gradient of the gathered result
            gs = [torch.randn(B, n - 1, generator=gen) for _ in range(C)]
            ref = ref_next_token(full[:, :n], t, k, p)
            ref_g = sum(ref_grad(full[:, :n], lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), gr)[1]
                        for gr in gs)
            ref_g = torch.cat([ref_g, torch.zeros(B, S - n, V, dtype=ref_g.dtype)], dim=1)
            for chunk in (None, 2):
                # (tp_group=None would be the world group here: the one-device vocabulary
                # is a group of one rank)
                local = _cp_local(full, rank, C).requires_grad_(True)
                out = rl.from_parallel_logits_to_logprobs(
                    local, t, 0, V, solo, cp_group=cp, chunk_size=chunk,
                    sampling_params=SP(k, p))
                what = f"cp {k, p} n={n} chunk={chunk}"
                close(out, ref, 2e-5, what)
                out.backward(gs[rank])
                close(local.grad, _cp_local(ref_g, rank, C), 2e-5, what + " grad")
            # get_next_token: the vocabulary-parallel path (group of one) and the plain one
            local = _cp_local(full, rank, C).requires_grad_(True)
            out = rl.get_next_token_logprobs_from_logits(
                t, local, vocab_parallel_rank=0, vocab_parallel_group=solo,
                context_parallel_group=cp, sampling_params=SP(k, p), chunk_size=3)
            close(out, ref, 2e-5, f"get_next_token cp {k, p} n={n}")
            out.backward(gs[rank])
            close(local.grad, _cp_local(ref_g, rank, C), 2e-5, f"get_next_token cp grad {k, p}")
            out = rl.get_next_token_logprobs_from_logits(
                t, _cp_local(full, rank, C), context_parallel_group=cp,
                sampling_params=SP(k, p))
            close(out, ref, 2e-5, f"get_next_token cp plain {k, p} n={n}")


def case_get_next_token_vocab_parallel(rank, gens, solo):
    """The vocabulary-parallel path (equal shards from the rank, as NeMo RL), chunked when
    no filter is on; uneven shards there raise on every rank."""
    import torch.distributed as dist

    gen = gens()
    B, S, V = 2, 5, 14
    grp = dist.group.WORLD
    s, e = _even(V, rank)
    for k, p in FILTERS[:4]:
        for chunk in (None, 2):
            full = tie_free((B, S), V, gen, torch.bfloat16)
            t = torch.randint(0, V, (B, S), generator=gen)
            g = torch.randn(B, S - 1, generator=gen)
            ref, ref_g = ref_grad(full, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), g)
            shard = full[..., s:e].clone().requires_grad_(True)
            out = rl.get_next_token_logprobs_from_logits(
                t, shard, vocab_parallel_rank=rank, vocab_parallel_group=grp,
                sampling_params=SP(k, p), chunk_size=chunk)
            what = f"get_next_token tp {k, p} chunk={chunk}"
            close(out, ref, 2e-5, what)
            out.backward(g)
            close(shard.grad, ref_g[..., s:e], 2e-2, what + " grad")
    s, e = UNEVEN[13][rank]
    try:
        rl.get_next_token_logprobs_from_logits(torch.randint(0, 13, (1, 3)),
                                               torch.randn(1, 3, e - s),
                                               vocab_parallel_rank=rank,
                                               vocab_parallel_group=grp)
    except ValueError as exc:
        assert "tile" in str(exc)
    else:
        raise AssertionError("uneven shards with vocab_parallel_rank did not raise")


def case_get_next_token_dtensor(rank, gens, solo):
    """DTensor logits: vocabulary sharded unevenly by torch.chunk over a 1-D mesh; and
    context-parallel over a ("cp", "tp") mesh with input_ids in seq_index order."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = gens()
    B, S = 2, 6
    mesh = init_device_mesh("cpu", (WORLD,))
    for V in (13, 14):
        for k, p in FILTERS[:4]:
            full = tie_free((B, S), V, gen)
            t = torch.randint(0, V, (B, S), generator=gen)
            g = torch.randn(B, S - 1, generator=gen)
            ref, ref_g = ref_grad(full, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), g)
            dt = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_(True)
            out = rl.get_next_token_logprobs_from_logits(t, dt, sampling_params=SP(k, p))
            what = f"dtensor V={V} {k, p}"
            close(out, ref, 2e-5, what)
            out.backward(g)
            close(dt.grad.full_tensor(), ref_g, 2e-5, what + " grad")
            with torch.no_grad():  # inference: nothing kept
                out = rl.get_next_token_logprobs_from_logits(t, dt.detach(),
                                                             sampling_params=SP(k, p))
            close(out, ref, 2e-5, what + " no_grad")

    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("cp", "tp"))
    S, V = 8, 11
    for k, p in [(None, 1.0), (4, 0.7)]:
        full = tie_free((B, S), V, gen)
        t = torch.randint(0, V, (B, S), generator=gen)
        # the load-balanced layout as a permutation of the sequence
        seq_index = torch.cat([_cp_local(torch.arange(S).view(1, S), r, WORLD)
                               for r in range(WORLD)], dim=1).view(S)
        logits = distribute_tensor(full[:, seq_index], mesh2, [Shard(1), Shard(2)])
        logits.requires_grad_(True)
        ids = distribute_tensor(t[:, seq_index], mesh2, [Shard(1), Replicate()])
        gs = [torch.randn(B, S - 1, generator=gen) for _ in range(WORLD)]
        ref = ref_next_token(full, t, k, p)
        out = rl.get_next_token_logprobs_from_logits(ids, logits, seq_index=seq_index,
                                                     sampling_params=SP(k, p))
        close(out, ref, 2e-5, f"dtensor cp {k, p}")
        out.backward(gs[rank])
        # DTensor's gather hands each rank its own upstream gradient's part (no sum)
        _, ref_g = ref_grad(full, lambda xr, t=t, k=k, p=p: ref_next_token(xr, t, k, p), gs[rank])
        mine = ref_g[:, seq_index].narrow(1, rank * (S // WORLD), S // WORLD)
        close(logits.grad.to_local(), mine, 2e-5, f"dtensor cp grad {k, p}")
        try:
            rl.get_next_token_logprobs_from_logits(ids, logits.detach())
        except ValueError as exc:
            assert "seq_index" in str(exc)
        else:
            raise AssertionError("a cp DTensor without seq_index did not raise")


def case_log_softmax_and_group_none(rank, gens, solo):
    """The seed's helpers keep working beside the new ones; None is the world group."""
    import torch.distributed as dist

    gen = gens()
    V = 13
    s, e = UNEVEN[V][rank]
    full = gaussian((2, 4), V, gen)
    ls = rl._compute_distributed_log_softmax(full[..., s:e], None)
    close(ls, torch.log_softmax(full.double(), -1)[..., s:e], 2e-5, "log_softmax")
    t = torch.randint(0, V, (2, 4), generator=gen)
    a = rl.from_parallel_logits_to_logprobs(full[..., s:e], t, s, e, None)
    b = rl.from_parallel_logits_to_logprobs(full[..., s:e], t, s, e, dist.group.WORLD)
    assert torch.equal(a, b)


CASES = {
    "tp_from_parallel": case_tp_from_parallel,
    "tp_chunked_functions": case_tp_chunked_functions,
    "context_parallel": case_context_parallel,
    "get_next_token_vocab_parallel": case_get_next_token_vocab_parallel,
    "get_next_token_dtensor": case_get_next_token_dtensor,
    "log_softmax_and_group_none": case_log_softmax_and_group_none,
}


def rank_worker(ctx, seed):
    """Every distributed case on this rank; returns {case: None or traceback}."""
    import torch.distributed as dist
    from dist_utils import progress

    # one group per rank (created on every rank, in the same order): a vocabulary that
    # lives on one device while the sequence is context-parallel
    solos = [dist.new_group([r]) for r in range(ctx.world_size)]
    solo = solos[ctx.rank]
    results = {}
    for i, (name, fn) in enumerate(CASES.items()):
        progress(name)

        def gens(i=i):
            # the same inputs on every rank
            return torch.Generator().manual_seed(seed + 1000 * i)

        try:
            fn(ctx.rank, gens, solo)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case to the parent
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def rank_results():
    from dist_utils import run_ranks

    return run_ranks(rank_worker, WORLD, 1234, timeout=150.0)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks(rank_results, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(rank_results) if res[case]]
    assert not failures, "\n".join(failures)
