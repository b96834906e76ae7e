"""The pure-PyTorch parts of the diagnostic tools (tools/), on the CPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

_TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_TOOLS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sd():
    return _load("split_diag")


def test_split_bounds_match_the_launcher(sd):
    # fused_rows.launch: segments of ceil(V / parts) columns rounded up to whole blocks
    assert sd.split_bounds(262144, 8, 4096) == list(range(0, 262144, 32768)) + [262144]
    assert sd.split_bounds(100, 3, 16) == [0, 48, 96, 100]
    assert sd.split_bounds(40, 8, 5) == list(range(0, 40, 5)) + [40]


def test_fold_loss_is_the_cross_entropy_of_the_row(sd):
    z = torch.randn(40, dtype=torch.float64) * 3
    t = 17
    parts = sd.segment_stats(z, sd.split_bounds(40, 8, 5), t)
    want = float(torch.logsumexp(z, 0) - z[t])
    assert abs(sd.fold_loss(parts) - want) < 1e-12


@pytest.mark.parametrize("fault", ["stale", "ahead", "lost", "twice"])
def test_explain_names_the_single_fault(sd, fault):
    """A loss made wrong by one known fault (one part's record from the row two iterations
    earlier or one later in the same group, z_t lost or doubled) is explained by it."""
    gen = torch.Generator().manual_seed(3)
    N, V, groups = 12, 40, 3
    x = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, V, (N,), generator=gen)
    bounds = sd.split_bounds(V, 8, 5)
    row = 7

    def get(r):
        return x[r], int(t[r])

    mine = sd.segment_stats(x[row], bounds, int(t[row]))
    ref = sd.fold_loss(mine)
    zt = float(x[row, t[row]])
    if fault in ("stale", "ahead"):
        k = -2 if fault == "stale" else 1
        other = row + k * groups
        q = 2 if int(t[row]) // 5 != 2 else 3
        mixed = list(mine)
        mixed[q] = sd.segment_stats(x[other], bounds, int(t[other]))[q]
        got = sd.fold_loss(mixed)
        want = f"part {q} from row {row}{k:+d}*{groups}"
    else:
        got = ref + zt if fault == "lost" else ref - zt
        want = "z_t lost" if fault == "lost" else "z_t counted twice"
    found = sd.explain(get, N, row, got, bounds, groups)
    assert want in found, (found, want)
    assert sd.explain(get, N, row, ref, bounds, groups) == []


@pytest.mark.parametrize("args", [["--V", "1000,131072"], ["--V", "131072", "--split", "8"]])
def test_kernels_compile_for_sm90_without_a_gpu(args, tmp_path):
    """tools/compile_offline.py: the fused kernel's variants (in place, every option, the TP
    exchange with split shard rows, no gradient) compile down to an sm_90 cubin on this
    CPU-only machine, catching what the interpreter cannot (types that differ between the
    branches of a runtime if, layouts the compiler rejects)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(_TOOLS, "compile_offline.py"), *args],
                       env=env, capture_output=True, text=True, timeout=600)
    ok = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(ok) == (16 if args[1] == "1000,131072" else 8), r.stdout
