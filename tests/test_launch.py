"""The eager fast launcher (fusedce.triton.launch) on a stand-in kernel: the first launch of a
specialisation goes through ``kernel[grid]``, later ones call the compiled launcher with the
positional arguments and the constexpr tail in the kernel's parameter order; anything that
can change Triton's specialisation (tensor alignment and dtype, ints equal to 1, divisible
by 16 or wider than 32 bits, the constexprs, the options) gives a new entry; launch hooks or
unfamiliar Triton internals fall back to ``kernel[grid]``. On GPUs the same code runs with
FUSEDCE_VERIFY_LAUNCH=1 in tests/test_gpu.py, where every fast launch is checked against the
kernel Triton's own binder picks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fusedce.triton import launch


class _Compiled:
    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "fn", "meta", log

    def run(self, *a):
        self.log.append(("fast", a))


class _Kernel:
    """Parameters (x_ptr, n, BLOCK: constexpr, FLAG: constexpr = 3)."""

    debug = False

    def __init__(self):
        self.log = []
        self.compiled = []

        def binder(x_ptr, n, BLOCK, FLAG=3, **options):
            return OrderedDict(x_ptr=x_ptr, n=n, BLOCK=BLOCK, FLAG=FLAG), None, options

        self.device_caches = {0: (None, None, None, None, binder)}

    def __getitem__(self, grid):
        def call(*a, **kw):
            self.log.append(("slow", grid, a, kw))
            c = _Compiled(self.log)
            self.compiled.append(c)
            return c
        return call


@pytest.fixture
def fake_runtime(monkeypatch):
    state = {"hooked": False}
    monkeypatch.setattr(launch, "_VERIFY", False)  # (the stand-in has no Triton caches)
    monkeypatch.setattr(launch, "_hooked", lambda: state["hooked"])
    monkeypatch.setattr(launch, "_debug", lambda: False)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 77)
    return state


def _kinds(k):
    return [e[0] for e in k.log]


def test_fast_launch_reuses_the_compiled_kernel(fake_runtime):
    k = _Kernel()
    f = launch.FastLauncher(k)
    x = torch.empty(64)
    f[(5,)](x, 32, BLOCK=128, num_warps=4)
    f[(6, 2)](x, 48, BLOCK=128, num_warps=4)
    assert _kinds(k) == ["slow", "fast"]
    # grid padded to 3-d, stream, handles, no metadata or hooks, then every parameter in
    # order: the positional ones, the keyword constexpr and the default of the other
    assert k.log[1][1] == (6, 2, 1, 77, "fn", "meta", None, None, None, x, 48, 128, 3)
    # the compiled kernel returned is the one compiled by the first launch
    assert f[(1,)](x, 64, BLOCK=128, num_warps=4) is k.compiled[0]


@pytest.mark.parametrize("change", ["align", "dtype", "one", "div16", "wide", "constexpr",
                                    "option"])
def test_fast_launch_respecialises(fake_runtime, change):
    k = _Kernel()
    f = launch.FastLauncher(k)
    buf = torch.empty(64)
    x, n, kw = buf[:32], 32, {"BLOCK": 128, "num_warps": 4}
    f[(1,)](x, n, **kw)
    if change == "align":
        x = buf[1:33]  # 4 bytes off a 16-byte boundary
    elif change == "dtype":
        x = torch.empty(32, dtype=torch.float16)
    elif change == "one":
        n = 1
    elif change == "div16":
        n = 33
    elif change == "wide":
        n = 2**32
    elif change == "constexpr":
        kw = {"BLOCK": 256, "num_warps": 4}
    else:
        kw = {"BLOCK": 128, "num_warps": 8}
    f[(1,)](x, n, **kw)
    assert _kinds(k) == ["slow", "slow"]
    f[(1,)](x, n, **kw)
    assert _kinds(k) == ["slow", "slow", "fast"]


def test_fast_launch_same_specialisation_same_entry(fake_runtime):
    k = _Kernel()
    f = launch.FastLauncher(k)
    f[(1,)](torch.empty(64), 2, BLOCK=64)
    f[(1,)](torch.empty(128), 3, BLOCK=64)  # 2 and 3: neither 1 nor a multiple of 16
    f[(1,)](torch.empty(8), 5, BLOCK=64)
    assert _kinds(k) == ["slow", "fast", "fast"]


def test_fast_launch_keys_tuples_per_element(fake_runtime):
    """Tuple arguments (the fused kernels' scalars, strides and layout ints) are keyed element
    by element, as Triton specialises them: new floats reuse the entry, an int that turns 1
    does not."""
    k = _Kernel()
    f = launch.FastLauncher(k)
    x = torch.empty(64)
    f[(1,)](x, (0.5, 2.0, 3), BLOCK=64)
    f[(1,)](x, (0.7, 1.5, 5), BLOCK=64)
    f[(1,)](x, (0.7, 1.5, 1), BLOCK=64)
    assert _kinds(k) == ["slow", "fast", "slow"]


def test_fast_launch_falls_back(fake_runtime):
    k = _Kernel()
    f = launch.FastLauncher(k)
    x = torch.empty(16)
    fake_runtime["hooked"] = True  # a profiler's launch hooks see every launch
    f[(1,)](x, 4, BLOCK=64)
    f[(1,)](x, 4, BLOCK=64)
    assert _kinds(k) == ["slow", "slow"]
    fake_runtime["hooked"] = False
    k.device_caches = {}  # internals this module does not know
    f[(1,)](x, 4, BLOCK=64)
    f[(1,)](x, 4, BLOCK=64)
    assert _kinds(k) == ["slow"] * 4 and f.broken


def test_launcher_picks_fast_only_in_eager_gpu_calls(monkeypatch):
    from torch._library.triton import set_wrap_triton_enabled

    from fusedce.triton import grad

    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "OPAQUE", False)  # FUSEDCE_COMPILE_OPS=triton_op
    kernel = grad._scale_kernel
    with set_wrap_triton_enabled(False):
        assert isinstance(launch.launcher(kernel), launch.FastLauncher)
        monkeypatch.setattr(launch, "_FAST", False)
        assert not isinstance(launch.launcher(kernel), launch.FastLauncher)
    monkeypatch.setattr(launch, "_FAST", True)
    # wrap_triton on (torch.compile tracing the triton_op ops): never the fast path
    assert not isinstance(launch.launcher(kernel), launch.FastLauncher)
    # except for the fused kernels, whose ops stay opaque (tuple arguments)
    from fusedce.triton import fused

    assert isinstance(launch.launcher(fused._fused_rows_kernel), launch.FastLauncher)
    # opaque ops (the default): compiled graphs call fusedce's launches, so
    # the fast path serves them too; tracing stops before any launch (skip on fake tensors)
    monkeypatch.setattr(launch, "OPAQUE", True)
    assert isinstance(launch.launcher(kernel), launch.FastLauncher)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4, 8)
    assert launch.skip(fake) and not launch.skip(torch.empty(4, 8))
    monkeypatch.setattr(launch, "OPAQUE", False)
    assert not launch.skip(fake)


def test_empty_hook_chains_are_inactive():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not launch._active(None)
    assert not launch._active(Chain([]))
    assert launch._active(Chain([print]))
    assert launch._active(print)
    # whatever this Triton keeps there by default is inactive
    assert not launch._hooked()


def test_ops_are_opaque_unless_triton_op_is_asked_for():
    """FUSEDCE_COMPILE_OPS: unset or "opaque" -> opaque custom ops (the default on GPUs since
    the triton_op form gave wrong gradients under Inductor with torch 2.11); "triton_op" opts
    back in on GPUs; the interpreter always takes opaque ops."""
    for setting in (None, "", "opaque", " OPAQUE ", "other"):
        assert launch._opaque_ops(setting, interpret=False)
    for setting in ("triton_op", " Triton_Op "):
        assert not launch._opaque_ops(setting, interpret=False)
        assert launch._opaque_ops(setting, interpret=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CPU interpreter's calls")
def test_host_ops_per_call():
    """A call's aten ops do not grow back (benchmarks/host_ops.py; on slow GPU hosts each is
    ~10-20 us before the kernel launch): no_grad mean 6 (the target scan's output, which
    holds the mean's denominator, four outputs, the loss sum), logprobs 5, forward+backward
    in place 10, into a new buffer 11."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_ops.py")
    spec = importlib.util.spec_from_file_location("host_ops", path)
    host_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_ops)
    x = torch.randn(64, 40)
    t = torch.randint(0, 40, (64,))
    limits = {"no_grad": 6, "logprobs inference_only": 5, "fb in place": 10,
              "fb new buffer": 11}
    for name, fn in host_ops.calls(x, t).items():
        ops = host_ops.count(fn)
        assert len(ops) <= limits[name], (name, ops)
        assert not any("view" in o or "select" in o or "unsqueeze" in o for o in ops
                       if not name.startswith("fb")), (name, ops)
