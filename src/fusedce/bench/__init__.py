"""Benchmarks and self-checks behind the ``fusedce`` command line.

Measures forward + backward and forward-only time, peak extra memory and error against
float64 for fusedce and its peers, and expresses every time as a ratio to the hardware
floors computed from ceilings measured in the same run:

    materialised logits [N, V] of s bytes/element:  fwd+bwd 2 s N V / B,  fwd  s N V / B
    fused linear CE [N, D] x [V, D]:                fwd+bwd 3 (2 N D V) / F,  fwd  2 N D V / F

(B: measured copy bandwidth, bytes read + written per second; F: measured matmul FLOP/s.)
Modules: shapes (cases, presets), methods (fusedce, PyTorch and peer adapters), measure
(timers, peak memory, ceilings), reference (inputs, fp64 references), runner (the sweep),
report (table, Markdown, CSV/JSON, plots), check (``fusedce check``), demo (``fusedce demo``),
memtarget (the CPU memory/time target of BENCH_CPU.md).
"""

from .methods import Method, all_methods, select_methods
from .runner import Result, RunInfo, SweepConfig, run_sweep
from .shapes import Case, custom_cases, preset_cases

__all__ = ["Case", "Method", "Result", "RunInfo", "SweepConfig", "all_methods", "custom_cases",
           "preset_cases", "run_sweep", "select_methods"]
