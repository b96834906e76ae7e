"""Eager launches of compiled Triton kernels without JITFunction.run's per-call work.

``kernel[grid](*args, **constexprs)`` re-derives the kernel's specialisation from every
argument on each call (a generated binder over ~60 arguments, a cache key over the result,
option parsing), which costs ~70-90 us of host time per launch on the GPU hosts we measured
(benchmarks/host_split.py), against ~17 us for the compiled kernel's own launcher. A loss call
that is already host-bound at V = 32000 spends that on every step.

Here the first launch of a specialisation goes through ``kernel[grid]`` (which compiles and
caches it) and the resulting CompiledKernel is kept under a key that is at least as fine as
Triton's specialisation: per tensor argument its dtype and whether its address is 16-byte
aligned, per int its equality to 1, divisibility by 16 and integer width, per anything else
its value or type, plus the constexpr keywords, the launch options and the device. Later
launches with the same key call the compiled launcher directly. A finer key only costs more
cache entries; a coarser one would launch a kernel specialised for other arguments, so with
FUSEDCE_VERIFY_LAUNCH=1 (set by the GPU tests) every fast launch also asks Triton's binder
for its own key and checks that it names the same compiled kernel.

Used on GPUs only (the interpreter runs the kernels itself), in eager calls and inside
compiled graphs, which call the opaque ops' launchers (with FUSEDCE_COMPILE_OPS=triton_op,
torch.compile traces the kernels through wrap_triton instead), and only while no Triton
launch hooks are installed.
"""

from __future__ import annotations

import os

import torch

_VERIFY = os.environ.get("FUSEDCE_VERIFY_LAUNCH", "0").strip().lower() not in ("0", "", "false")
_I32 = 2**31
_U64 = 2**63


def _arg_key(a, _tensor=torch.Tensor, _int=int, _float=float):
    c = a.__class__
    if c is _tensor:
        return (a.dtype, (a.data_ptr() & 15) == 0)
    if c is _int:
        return (a == 1, (a & 15) == 0, -_I32 <= a < _I32, a >= _U64)
    if c is _float:
        return _float
    if isinstance(a, _tensor):  # subclasses (parameters)
        return (a.dtype, (a.data_ptr() & 15) == 0)
    return ("v", a)  # bools (their own key: not ints here), None, strings


_RT: list = []


def _runtime():
    """(triton.knobs.runtime, triton's driver), imported once."""
    if not _RT:
        from triton import knobs
        from triton.runtime.driver import driver

        _RT.extend((knobs.runtime, driver))
    return _RT


def _active(hook) -> bool:
    """Whether a launch hook would do anything: Triton >= 3.4 keeps a HookChain there (never
    None; active when it holds calls), older ones None or a callable."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return not isinstance(calls, list) or len(calls) > 0


def _hooked() -> bool:
    rt = _runtime()[0]
    return _active(rt.launch_enter_hook) or _active(rt.launch_exit_hook)


def _debug() -> bool:
    return bool(_runtime()[0].debug)


def _device():
    return _runtime()[1].active.get_current_device()


def _stream(device):
    return _runtime()[1].active.get_current_stream(device)


class FastLauncher:
    """``FastLauncher(kernel)[grid](*args, **kw)`` launches like ``kernel[grid](...)``."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache: dict = {}
        self.broken = False
        self.hits = 0
        self.why = ""  # why the fast path is off (broken), for stats()

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launch(grid, args, kw)

    def _slow(self, grid, args, kw):
        return self.kernel[grid](*args, **kw)

    def _remember(self, key, compiled, device, args, kw) -> None:
        """Cache ``compiled`` under ``key`` with the values of the parameters after the
        positional ones (constexprs: fixed for the key, which holds the keywords)."""
        try:
            bound, _, _ = self.kernel.device_caches[device][4](*args, **kw)
            names = list(bound.keys())[len(args):]
            tail = tuple(kw[n] if n in kw else bound[n] for n in names)
            entry = (compiled, compiled.function, compiled.packed_metadata, compiled.run, tail)
        except Exception as e:  # noqa: BLE001 - a Triton whose internals differ: the regular path
            self.broken, self.why = True, f"{type(e).__name__}: {e}"
            return
        self.cache[key] = entry

    def launch(self, grid, args, kw):
        if self.broken or _hooked():
            return self._slow(grid, args, kw)
        device = _device()
        key = (device, _debug(), tuple(map(_arg_key, args)), tuple(kw.items()))
        hit = self.cache.get(key)
        if hit is None:
            compiled = self._slow(grid, args, kw)
            self._remember(key, compiled, device, args, kw)
            return compiled
        compiled, fn, meta, run, tail = hit
        self.hits += 1
        if _VERIFY:
            self._verify(args, kw, compiled, device)
        g = tuple(grid) + (1, 1)
        run(g[0], g[1], g[2], _stream(device), fn, meta, None, None, None, *args, *tail)
        return compiled

    def _verify(self, args, kw, compiled, device):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        global VERIFIED
        kernel_cache, key_cache, _, _, binder = self.kernel.device_caches[device]
        kw2 = dict(kw)
        kw2["debug"] = kw.get("debug", self.kernel.debug) or knobs.runtime.debug
        kw2["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        _, spec, options = binder(*args, **kw2)
        theirs = kernel_cache.get(compute_cache_key(key_cache, spec, options))
        if theirs is not compiled:
            raise RuntimeError(f"fusedce fast launch: {self.kernel.fn.__name__} would run a "
                               "kernel compiled for other arguments than Triton would pick")
        VERIFIED += 1


# fast launches checked against Triton's own choice (FUSEDCE_VERIFY_LAUNCH=1)
VERIFIED = 0
_LAUNCHERS: dict = {}


def stats() -> dict:
    """Per kernel name: (compiled variants cached, fast launches, why the path is off or "")."""
    return {f.kernel.fn.__name__ if hasattr(f.kernel, "fn") else repr(f.kernel):
            (len(f.cache), f.hits, f.why) for f in _LAUNCHERS.values()}


def fast(kernel) -> FastLauncher:
    """The fast launcher of ``kernel`` (one per kernel, holding its compiled variants)."""
    f = _LAUNCHERS.get(kernel)
    if f is None:
        f = _LAUNCHERS[kernel] = FastLauncher(kernel)
    return f
