"""Hypothesis property tests: random shapes and options against the fp64 oracle, and the
associativity of the statistics combine (the fact the whole architecture rests on)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedce as fce
from fusedce import spec, torch_backend
from fusedce.layout import as_rows3d
from oracle import assert_close_normwise, ref_cross_entropy

SETTINGS = settings(max_examples=40, deadline=None, derandomize=False)


@st.composite
def problems(draw):
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    V = draw(st.integers(1, 70))
    opts = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        logit_scale=draw(st.sampled_from([1.0, 0.3, 2.5])),
        ignore_index=draw(st.sampled_from([-100, 0, -1])),
    )
    use_w = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, V, opts, use_w, seed


@SETTINGS
@given(problems())
def test_cross_entropy_matches_oracle(problem):
    lead, V, opts, use_w, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, V, generator=g) * 4).requires_grad_(True)
    t = torch.randint(0, V, tuple(lead), generator=g)
    drop = torch.rand(tuple(lead), generator=g) < 0.3
    t = torch.where(drop, torch.full_like(t, opts["ignore_index"]), t)
    w = torch.rand(V, generator=g) + 0.1 if use_w else None
    out = fce.cross_entropy(x, t, weight=w, **opts)
    xr = x.detach().double().requires_grad_(True)
    ref = ref_cross_entropy(xr, t, weight=w, **opts)
    assert_close_normwise(out, ref, 2e-5, "loss", floor=1.0)  # error scales with lse, not loss
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(up.float())
    ref.backward(up)
    assert_close_normwise(x.grad, xr.grad, 1e-4, "grad")


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_combine_is_associative_over_any_split(n, V, pieces, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * 5
    t = torch.randint(0, V, (n,), generator=g)
    opts = spec.LossOptions(label_smoothing=0.1)
    whole = torch_backend.row_stats(as_rows3d(x), t, opts, need_sz=True, need_sez=True)
    cuts = sorted(torch.randint(1, V, (min(pieces, V - 1),), generator=g).unique().tolist())
    bounds = [0] + cuts + [V]
    parts = [torch_backend.row_stats(as_rows3d(x[:, a:b]), t, opts, vocab_start=a, need_sz=True,
                                     need_sez=True) for a, b in zip(bounds[:-1], bounds[1:])]
    folded = parts[0]
    for p in parts[1:]:
        folded = spec.combine(folded, p)
    stacked = spec.combine_stacked(*(torch.stack([getattr(p, f) for p in parts])
                                     for f in ("m", "s", "zt", "sz", "am", "sez")))
    for res in (folded, stacked):
        assert torch.allclose(spec.lse_of(res), spec.lse_of(whole), atol=1e-5)
        assert torch.allclose(res.zt, whole.zt) and torch.allclose(res.sz, whole.sz, atol=1e-4)
        assert torch.equal(res.am, whole.am)
        assert torch.allclose(res.sez / res.s, whole.sez / whole.s, atol=1e-4)
