"""The CPU memory / time target (docs/performance.md), measured two independent ways.

Setting: torch backend on the CPU, logits x [N, V] = [4096, 32000] fp32 (a leaf that
requires grad), targets [N]; one step = forward + backward of the mean loss, leaving the
gradient in x.grad. Compared: eager ``F.cross_entropy(x.float(), t)``, fusedce default
(fresh [N, V] gradient, like eager) and fusedce ``inplace_backward=True`` (the gradient is
written over x, so x.grad aliases x).

Peak extra memory = highest live bytes during the step minus live bytes just before it
(inputs excluded, the gradient left in x.grad included), by

  1. allocator events: torch.profiler(profile_memory=True), events integrated in time order
     (:func:`fusedce.bench.measure.cpu_peak_bytes`), after one warm-up step;
  2. resident set size: a fresh subprocess per method makes the inputs (touched), resets the
     kernel's peak-RSS mark (/proc/self/clear_refs), reads its current RSS, runs ONE step,
     and reports VmHWM - RSS_before (no warm-up there, so first-call runtime initialisation
     is included; RSS counts touched pages only).

Both are validated on a known allocation (a step that allocates and touches A, then B,
frees A, allocates C: the expected peak is max(A + B, B + C)). Time: median over
interleaved rounds (eager, default, in-place, eager, ...) of one step each; the ratio is
median(fusedce) / median(eager).

    python -m fusedce.bench.memtarget [--n 4096 --v 32000 --rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MB = 2**20
METHODS = ("eager", "fusedce", "fusedce-inplace")


def _make(n: int, v: int, seed: int = 0):
    g = torch.Generator()
    g.manual_seed(seed)
    # filled in place: no input-sized temporaries that would raise the RSS high-water mark
    x = torch.empty(n, v).normal_(generator=g).mul_(2).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    return x, t


def _step_fn(method: str, x: torch.Tensor, t: torch.Tensor):
    import fusedce as fce

    fce.set_validation(False)
    if method == "eager":
        return lambda: F.cross_entropy(x.float(), t).backward()
    if method == "fusedce":
        return lambda: fce.cross_entropy(x, t, backend="torch").backward()
    if method == "fusedce-inplace":
        return lambda: fce.cross_entropy(x, t, backend="torch", inplace_backward=True).backward()
    raise ValueError(method)


def _known_step(a: int, b: int, c: int):
    def step():
        ta = torch.ones(a // 4)
        tb = torch.ones(b // 4)
        del ta
        tc = torch.ones(c // 4)
        return tb, tc
    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(method: str, n: int, v: int) -> None:
    """Run in a fresh interpreter: print {'peak': ru_maxrss - rss_before} as JSON."""
    if method == "known":
        step = _known_step(300 * MB, 100 * MB, 200 * MB)
    else:
        x, t = _make(n, v)
        step = _step_fn(method, x, t)
    reset = _reset_hwm()
    before = _rss_bytes()
    hwm_before = _hwm_bytes()
    out = step()
    after = _hwm_bytes()
    del out
    # without a reset, a high-water mark set before the step would hide a smaller step peak
    print(json.dumps({"peak": after - before, "reset": reset,
                      "stale_before": max(0, hwm_before - before)}))


def rss_peak(method: str, n: int, v: int) -> dict:
    cmd = [sys.executable, "-m", "fusedce.bench.memtarget", "--child", method, "--n", str(n),
           "--v", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def profiler_peak(method: str, n: int, v: int) -> tuple:
    from .measure import cpu_peak_bytes

    if method == "known":
        peak, net, _ = cpu_peak_bytes(_known_step(300 * MB, 100 * MB, 200 * MB))
        return peak, net
    x, t = _make(n, v)
    step = _step_fn(method, x, t)
    step()
    x.grad = None
    if method == "fusedce-inplace":
        x, t = _make(n, v)
        step = _step_fn(method, x, t)
    peak, net, _ = cpu_peak_bytes(step)
    return peak, net


def interleaved_times(n: int, v: int, rounds: int) -> dict:
    xs = {m: _make(n, v) for m in METHODS}
    steps = {m: _step_fn(m, *xs[m]) for m in METHODS}
    times = {m: [] for m in METHODS}
    for m in METHODS:  # warm-up
        steps[m]()
        xs[m][0].grad = None
    for _ in range(rounds):
        for m in METHODS:
            t0 = time.perf_counter()
            steps[m]()
            times[m].append((time.perf_counter() - t0) * 1e3)
            xs[m][0].grad = None
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        _child(a.child, a.n, a.v)
        return 0
    n, v = a.n, a.v
    grad_mb = n * v * 4 / MB
    print(f"N={n} V={v} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}; one N x V fp32 tensor = {grad_mb:.1f} MB")
    kp, kn = profiler_peak("known", n, v)
    kr = rss_peak("known", n, v)
    if not kr.get("reset"):
        print("warning: could not reset the peak-RSS mark; RSS numbers may be stale")
    print(f"validation (expect peak 400.0 MB): profiler {kp / MB:.1f} MB (net {kn / MB:.1f}, "
          f"expect 300.0), RSS {kr['peak'] / MB:.1f} MB")
    mem = {}
    for m in METHODS:
        pp, pn = profiler_peak(m, n, v)
        rr = rss_peak(m, n, v)
        mem[m] = (pp, pn, rr["peak"])
    times = interleaved_times(n, v, a.rounds)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    e_p, _, e_r = mem["eager"]
    print("\n| method | peak extra (profiler) | % of eager | left after step | peak extra (RSS) "
          "| % of eager | fwd+bwd ms (median) | x eager |")
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        pp, pn, rr = mem[m]
        print(f"| {m} | {pp / MB:.1f} MB | {100 * pp / e_p:.1f}% | {pn / MB:.1f} MB | "
              f"{rr / MB:.1f} MB | {100 * rr / e_r:.1f}% | {med[m]:.0f} | "
              f"{med[m] / med['eager']:.2f}x |")
    ratios = {m: statistics.median(a_ / b_ for a_, b_ in zip(times[m], times["eager"]))
              for m in METHODS}
    print("\nmedian of per-round ratios to eager: " + ", ".join(
        f"{m} {r:.2f}x" for m, r in ratios.items() if m != "eager"))
    print(f"times (ms, {a.rounds} interleaved rounds): " + "; ".join(
        f"{m}: min {min(ts):.0f} med {statistics.median(ts):.0f} max {max(ts):.0f}"
        for m, ts in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
