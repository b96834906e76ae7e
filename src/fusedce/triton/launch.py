"""How the kernel files launch their kernels: the launcher of a kernel (torch.compile's
wrap_triton, the fast launcher below, or the kernel itself in the interpreter), the
registration of each launcher as a torch.library op, and the argument layout helpers.

The fast launcher: eager launches of compiled Triton kernels without JITFunction.run's
per-call work. ``kernel[grid](*args, **constexprs)`` re-derives the kernel's specialisation
from every argument on each call (a generated binder over its arguments, a cache key over
the result, option parsing), which costs ~70-90 us of host time per launch on the GPU hosts
measured (lab/host_split.py), against ~17 us for the compiled kernel's own launcher. A loss
call that is already host-bound at V = 32000 spends that on every step.

Here the first launch of a specialisation goes through ``kernel[grid]`` (which compiles and
caches it) and the resulting CompiledKernel is kept under a key that is at least as fine as
Triton's specialisation: per tensor argument its dtype and whether its address is 16-byte
aligned, per int its equality to 1, divisibility by 16 and integer width, per tuple the keys
of its elements, per anything else its value or type, plus the constexpr keywords, the launch
options and the device. Later launches with the same key call the compiled launcher
directly. A finer key only costs more cache entries; a coarser one would launch a kernel
specialised for other arguments, so with FUSEDCE_VERIFY_LAUNCH=1 (set by the GPU tests)
every fast launch also asks Triton's binder for its own key and checks that it names the
same compiled kernel.

Used on GPUs only (the interpreter runs the kernels itself), in eager calls and inside
compiled graphs, which call the opaque ops' launchers (with FUSEDCE_COMPILE_OPS=triton_op,
torch.compile traces the kernels through wrap_triton instead), and only while no Triton
launch hooks are installed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .common import INTERPRET

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
    if c is tuple:  # (the fused kernels' fp32 scalars: specialised per element)
        return tuple(map(_arg_key, a))
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


# ----------------------------------------------------------------------------- launchers

try:  # torch >= 2.6
    from torch._library.triton import is_wrap_triton_enabled as _wrap_on
except ImportError:  # pragma: no cover - older torch
    _wrap_on = None
# FUSEDCE_FAST_LAUNCH=0: every eager launch through JITFunction.run
_FAST = os.environ.get("FUSEDCE_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no")


def _opaque_ops(setting: Optional[str], interpret: bool) -> bool:
    """Whether the ops are registered as opaque custom ops: always in the interpreter, else
    unless FUSEDCE_COMPILE_OPS is "triton_op" (unset or anything else: opaque).

    Opaque (the default): compiled graphs call fusedce's own launches (fast launcher,
    register caps), and tracing with fake tensors must not launch: _skip() says so.
    "triton_op" (GPUs only; read at import) registers them with torch.library.triton_op, so
    that Inductor sees and launches the Triton kernels itself. That form is wrong with torch
    2.11 where V is not a multiple of 64: Inductor pads the row stride of the saved gradient
    buffer, and the functional clone of a mutated view reads the padded storage as if it
    were contiguous, so the backward scales the wrong elements."""
    return interpret or (setting or "opaque").strip().lower() != "triton_op"


OPAQUE = _opaque_ops(os.environ.get("FUSEDCE_COMPILE_OPS"), INTERPRET)


# kernels whose ops are opaque whatever FUSEDCE_COMPILE_OPS says (see opaque_only)
_OPAQUE_ONLY: set = set()


def opaque_only(*kernels) -> None:
    """Launch ``kernels`` as opaque ops' kernels always: they take tuple arguments, which
    Inductor's code generation for user-defined Triton kernels does not support, so their ops
    are registered opaque (op(..., opaque=True)) and torch.compile never traces them."""
    _OPAQUE_ONLY.update(kernels)


def launcher(kernel):
    """The kernel as torch.compile can capture it (wrap_triton); in eager calls that switched
    wrap_triton off (fusedce.triton.backend._call) its cached compiled variants launched
    directly (FastLauncher); itself in the interpreter."""
    if INTERPRET:
        return kernel
    opaque = OPAQUE or kernel in _OPAQUE_ONLY
    if _FAST and (opaque or (_wrap_on is not None and not _wrap_on())):
        # (opaque ops never trace their kernels: skip stops them on fake tensors)
        return fast(kernel)
    if opaque:
        return kernel
    return torch.library.wrap_triton(kernel)


def is_traced(*ts) -> bool:
    """True for fake / functional tensors (torch.compile tracing, meta kernels)."""
    if all(t is None or type(t) is torch.Tensor for t in ts):  # eager: the common case
        return False
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in ts)


def skip(*ts) -> bool:
    """Whether an op's launcher must not launch: opaque ops traced with fake tensors."""
    return OPAQUE and is_traced(*ts)


# the undecorated launchers, for eager calls (see fusedce.triton.backend._call)
RAW: dict = {}


def op(name: str, mutates_args, opaque: bool = False):
    """Register ``fn`` as the op ``name``: an opaque custom_op with ``fn`` itself as the fake
    implementation (it launches nothing on fake tensors: its skip test is is_traced when
    ``opaque``, else skip), or with FUSEDCE_COMPILE_OPS=triton_op on GPUs, unless ``opaque``,
    a triton_op (torch.compile traces into its kernels)."""

    def dec(fn):
        RAW[name.split("::")[1]] = fn
        if OPAQUE or opaque:
            o = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            o.register_fake(fn)
            return o
        return torch.library.triton_op(name, mutates_args=mutates_args)(fn)

    return dec


# ----------------------------------------------------------------------------- arguments

_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def cdiv(a: int, b: int) -> int:
    # triton.cdiv / next_power_of_2 are constexpr functions in Triton >= 3.4, a few us of
    # host time per call on the launch path
    return -(-a // b)


def pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def dims3(x: torch.Tensor):
    """(B, T, V) of the kernels' row layout of x: [B, T, V], or [T, V] as B = 1 (the backend
    hands 2-D tensors to the ops where it can: see fusedce.triton.backend._k)."""
    if x.dim() == 2:
        return 1, x.shape[0], x.shape[1]
    return x.shape[0], x.shape[1], x.shape[2]


def strides3(x: torch.Tensor):
    """(stride_b, stride_t, stride_v) of x in the same layout; a 2-D x has stride_b = 0 (never
    used: B = 1), a multiple of 16 like the strides it stands for, so that Triton's
    alignment specialisation of the row addresses is the same as for the 3-D view."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def col64(V: int, sv: int) -> bool:
    """Whether column offsets need 64 bits: (V - 1) * stride_v could pass 2**31."""
    return (V - 1) * abs(sv) >= 2**31 - 1

