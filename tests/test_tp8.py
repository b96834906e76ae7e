"""TP = 8 on the CPU (gloo, 8 processes): cross_entropy and linear_cross_entropy with uneven
vocabulary shards against the unsharded fp64 result. The 8-GPU run needs a
machine kind that is not lent; this is the part the CPU can check."""

from __future__ import annotations

import torch

from dist_utils import run_ranks

WORLD = 8


def _shards(V: int, world: int):
    # uneven: the first V % world ranks get one column more, and rank 0 one extra on top
    base = [V // world + (1 if r < V % world else 0) for r in range(world)]
    base[0] += 1
    base[-1] -= 1
    starts = [sum(base[:r]) for r in range(world)]
    return starts, base


def _worker(ctx, seed):
    import torch.distributed as dist

    import fusedce as fce
    from oracle import ref_cross_entropy

    g = torch.Generator().manual_seed(seed)
    N, D, V = 24, 16, 61
    x = torch.randn(N, V, generator=g) * 3
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    starts, sizes = _shards(V, ctx.world_size)
    s, n = starts[ctx.rank], sizes[ctx.rank]
    grp = dist.group.WORLD
    out = {}
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)

    xl = x[:, s:s + n].clone().requires_grad_(True)
    loss = fce.cross_entropy(xl, t, tp_group=grp, vocab_start=s, **kw)
    loss.backward()
    xr = x.double().requires_grad_(True)
    ref = ref_cross_entropy(xr, t, **kw)
    ref.backward()
    out["ce_loss"] = abs(loss.item() - ref.item())
    out["ce_grad"] = float((xl.grad.double() - xr.grad[:, s:s + n]).abs().max())

    hl = h.clone().requires_grad_(True)
    wl = w[s:s + n].clone().requires_grad_(True)
    loss = fce.linear_cross_entropy(hl, wl, t, tp_group=grp, vocab_start=s, **kw)
    loss.backward()
    hr = h.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    ref = ref_cross_entropy(hr @ wr.T, t, **kw)
    ref.backward()
    out["lin_loss"] = abs(loss.item() - ref.item())
    out["lin_dh"] = float((hl.grad.double() - hr.grad).abs().max())
    out["lin_dw"] = float((wl.grad.double() - wr.grad[s:s + n]).abs().max())
    return out


def test_tp8_gloo_matches_unsharded():
    results = run_ranks(_worker, WORLD, 1234, timeout=240.0)
    assert len(results) == WORLD
    for r, res in enumerate(results):
        for key, err in res.items():
            assert err < 1e-4, f"rank {r}: {key} error {err:.2e}"
