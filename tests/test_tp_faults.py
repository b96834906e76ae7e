"""Under tensor parallelism, bad input on one rank raises on every rank within seconds and
never leaves the others waiting in a collective (gloo, world 2 and 3, uneven shards, a hard
timeout per run; every case runs in the same process group, so a case that desynchronised
the ranks would hang the next one)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from dist_utils import progress, run_ranks

V = 23
N = 6


def _widths(world):
    return [7, 16] if world == 2 else [5, 11, 7]


def _shard(ctx, x_full):
    w = _widths(ctx.world_size)
    start = sum(w[:ctx.rank])
    return x_full[:, start:start + w[ctx.rank]].contiguous(), start


def _cases(ctx):
    """(name, call) pairs; each call is made on every rank and rank 1 (or every rank, where
    the fault is a disagreement) gets the bad argument."""
    import fusedce as fce

    g = torch.distributed.group.WORLD
    torch.manual_seed(0)
    x_full = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    x, start = _shard(ctx, x_full)
    bad = ctx.rank == 1

    def ce(**kw):
        args = dict(tp_group=g, vocab_start=start)
        args.update(kw)
        xx = args.pop("x", x)
        tt = args.pop("t", t)
        return fce.cross_entropy(xx, tt, **args)

    def lp(**kw):
        args = dict(tp_group=g, vocab_start=start)
        args.update(kw)
        xx = args.pop("x", x)
        tt = args.pop("t", t)
        return fce.logprobs(xx, tt, **args)

    def ent(**kw):
        args = dict(tp_group=g, vocab_start=start)
        args.update(kw)
        return fce.entropy(args.pop("x", x), **args)

    t_bad = t.clone()
    t_bad[2] = V + 5
    no_cuda = {"TRITON_INTERPRET": "0"}
    return [
        ("ce target list", lambda: ce(t=t.tolist() if bad else t), None),
        ("logprobs target list", lambda: lp(t=t.tolist() if bad else t), None),
        ("ce target out of range", lambda: ce(t=t_bad if bad else t), None),
        ("logprobs target out of range", lambda: lp(t=t_bad if bad else t), None),
        ("ce mismatched N", lambda: ce(x=x[:-1] if bad else x, t=t[:-1] if bad else t), None),
        ("entropy mismatched N", lambda: ent(x=x[:-1] if bad else x), None),
        ("ce widths", lambda: ce(vocab_start=start + 1 if bad else start), None),
        ("ce overlap", lambda: ce(vocab_start=start - 1 if bad else start), None),
        ("ce options", lambda: ce(label_smoothing=0.1 if bad else 0.0), None),
        ("ce z_loss", lambda: ce(z_loss=1e-4 if bad else 0.0), None),
        ("ce reduction", lambda: ce(reduction="sum" if bad else "mean"), None),
        ("ce return_aux", lambda: ce(return_aux=bad), None),
        ("ce bad option on one rank", lambda: ce(softcap=-1.0 if bad else None), None),
        ("ce flag type", lambda: ce(inplace_backward="no" if bad else False), None),
        ("logprobs inference_only type", lambda: lp(inference_only="yes" if bad else False),
         None),
        ("entropy scale", lambda: ent(logit_scale=2.0 if bad else 1.0), None),
        ("ce backends", lambda: ce(backend="triton" if bad else "torch"), None),
        ("ce triton without cuda", lambda: ce(backend="triton"), no_cuda if bad else None),
        ("ce dtypes", lambda: ce(x=x.to(torch.bfloat16) if bad else x), None),
        ("entropy dtypes", lambda: ent(x=x.to(torch.float16) if bad else x), None),
        ("ce meta logits", lambda: ce(x=x.to("meta") if bad else x), None),
        ("ce target dtype", lambda: ce(t=t.float() if bad else t), None),
    ]


def _run_faults(ctx):
    import fusedce as fce

    out = []
    for name, call, env in _cases(ctx):
        progress(name)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        t0 = time.monotonic()
        try:
            call()
            res = None
        except (TypeError, ValueError) as exc:
            res = type(exc).__name__
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out.append((name, res, time.monotonic() - t0))
    # the group still works after every fault
    progress("good call")
    x, start = _shard(ctx, torch.randn(N, V))
    loss = fce.cross_entropy(x, torch.randint(0, V, (N,)), tp_group=torch.distributed.group.WORLD,
                             vocab_start=start)
    out.append(("good call", None if torch.isfinite(loss) else "nan", 0.0))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_on_one_rank_raises_everywhere(world):
    results = run_ranks(_run_faults, world, timeout=180.0)
    names = [name for name, _, _ in results[0][:-1]]
    for r, res in enumerate(results):
        for name, raised, dt in res[:-1]:
            assert raised in ("TypeError", "ValueError", "InputError"), (r, name, raised)
            assert dt < 20.0, (r, name, dt)
        assert res[-1][1] is None, res[-1]
        assert [n for n, _, _ in res[:-1]] == names
