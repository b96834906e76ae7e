"""Benchmark output: terminal table, Markdown (for BENCHMARKS.md), CSV, JSON and PNG plots.

Each row shows the median forward + backward and forward-only times, their ratios to the
hardware floors (time / floor), the peak extra memory of one forward + backward, and the
max-norm relative error against fp64 on a sample (see :mod:`fusedce.bench.reference`).
The plots draw time and memory against the vocabulary size V, one line per method, with
the floor as a dashed line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from .runner import Result, RunInfo

COLUMNS = ("op", "shape", "dtype", "method", "fwd+bwd ms", "x floor", "fwd ms", "fwd x floor",
           "peak extra", "err", "status")


def fmt_ms(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_ratio(x: float) -> str:
    return "-" if x is None or math.isnan(x) or math.isinf(x) else f"{x:.2f}x"


def fmt_bytes(b: float) -> str:
    if b is None or math.isnan(b):
        return "-"
    if abs(b) >= 1 << 30:
        return f"{b / 2**30:.2f} GB"
    if abs(b) >= 1 << 20:
        return f"{b / 2**20:.1f} MB"
    return f"{b / 2**10:.1f} KB"


def fmt_err(e: float) -> str:
    if e is None or math.isnan(e):
        return "-"
    if math.isinf(e):
        return "inf"
    return f"{e:.1e}"


def row_cells(r: Result) -> List[str]:
    status = f"{r.status}: {r.message}"[:60] if r.message else r.status
    return [r.op, r.shape, r.dtype, r.method, fmt_ms(r.fwd_bwd_ms), fmt_ratio(r.ratio_fwd_bwd),
            fmt_ms(r.fwd_ms), fmt_ratio(r.ratio_fwd), fmt_bytes(r.peak_bytes), fmt_err(r.err),
            status]


def header_lines(info: RunInfo) -> List[str]:
    lines = [f"device: {info.device_name} | torch {info.torch} | triton {info.triton} | "
             f"python {info.python} | {info.date}"
             + (f" | world size {info.world_size}" if info.world_size > 1 else "")]
    ceil = []
    if not math.isnan(info.copy_bytes_per_s):
        ceil.append(f"copy {info.copy_bytes_per_s / 1e9:.1f} GB/s")
    for dt, f in info.matmul_flops.items():
        ceil.append(f"{dt} matmul {f / 1e12:.2f} TFLOP/s")
    if ceil:
        lines.append("ceilings (measured in this run): " + ", ".join(ceil))
    lines.append("floors: CE/logprobs fwd+bwd = 2 x itemsize bytes/elem, fwd = itemsize "
                 "bytes/elem over the copy bandwidth; linear CE fwd+bwd = 3 x 2NDV FLOPs, fwd "
                 "= 2NDV FLOPs over the matmul rate; TP: per-rank shard")
    lines.append("time: median; peak extra: max allocated during one fwd+bwd minus what was "
                 "allocated before (inputs), gradients included; err: max|y - y64| / max|y64| "
                 "over the loss and sampled gradient rows vs fp64")
    for n in info.notes:
        lines.append("note: " + n)
    for name, why in info.skipped.items():
        lines.append(f"not run: {name} ({why})")
    return lines


def plain_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def print_table(results: Sequence[Result], info: RunInfo, file=None) -> None:
    """The terminal table (rich when stdout is a terminal and rich is installed)."""
    file = file or sys.stdout
    rows = [row_cells(r) for r in results]
    use_rich = False
    if getattr(file, "isatty", lambda: False)():
        try:
            from rich.console import Console
            from rich.table import Table

            use_rich = True
        except ImportError:
            pass
    if use_rich:
        table = Table(show_lines=False)
        for i, h in enumerate(COLUMNS):
            table.add_column(h, justify="right" if 4 <= i <= 9 else "left")
        for r in rows:
            table.add_row(*r)
        console = Console(file=file)
        console.print(table)
        for ln in header_lines(info):
            console.print(ln, highlight=False, markup=False)
        return
    print(plain_table(rows, COLUMNS), file=file)
    for ln in header_lines(info):
        print(ln, file=file)


def markdown(results: Sequence[Result], info: RunInfo) -> str:
    """The table as GitHub Markdown, with its run's device, versions and ceilings."""
    out = []
    for ln in header_lines(info):
        out.append(f"- {ln}")
    out.append("")
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in results:
        cells = [c.replace("|", "\\|") for c in row_cells(r)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_csv(results: Sequence[Result], path: str) -> None:
    rows = [asdict(r) for r in results]
    fields = list(Result.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(results: Sequence[Result], info: RunInfo, path: str) -> None:
    doc = {"info": asdict(info), "results": [asdict(r) for r in results]}
    with open(path, "w") as f:
        json.dump(_json_safe(doc), f, indent=1)


def _groups(results: Sequence[Result]) -> Dict[Tuple, List[Result]]:
    groups: Dict[Tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.dtype, r.n, r.tp), []).append(r)
    return groups


def _plot_methods(ax_t, ax_m, rows) -> None:
    """Each method's time and peak memory against V (failures named in the legend)."""
    for m in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.v, r.fwd_bwd_ms, r.peak_bytes) for r in rows
                     if r.method == m and r.status == "ok")
        failed = sorted(f"{r.status}@{r.v}" for r in rows if r.method == m and r.status != "ok")
        label = m + (f" ({', '.join(failed)})" if failed else "")
        if not pts:
            continue
        vs = [p[0] for p in pts]
        ax_t.plot(vs, [p[1] for p in pts], marker="o", label=label)
        ax_m.plot(vs, [max(p[2], 1.0) / 2**20 for p in pts], marker="o", label=label)


def _plot_references(ax_t, ax_m, rows, op, dtype, n, tp) -> None:
    """The time floor, and the memory of one fresh N x V_local gradient (logits ops)."""
    floor = sorted({(r.v, r.floor_fwd_bwd_ms) for r in rows if not math.isnan(r.floor_fwd_bwd_ms)})
    if floor:
        ax_t.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="floor")
    if op != "linear_cross_entropy":
        item = {"fp32": 4, "bf16": 2, "fp16": 2}.get(dtype, 4)
        vs = sorted({r.v for r in rows})
        ax_m.plot(vs, [n * (v // max(tp, 1)) * item / 2**20 for v in vs], "k:",
                  label="one N x V gradient")


def _style_axes(ax_t, ax_m, rows) -> None:
    all_v = [r.v for r in rows]
    if all_v and max(all_v) / max(1, min(all_v)) > 4:
        ax_t.set_xscale("log")
        ax_m.set_xscale("log")
    ax_t.set_xlabel("vocabulary size V")
    ax_t.set_ylabel("forward + backward, ms (median)")
    ax_m.set_xlabel("vocabulary size V")
    ax_m.set_ylabel("peak extra memory, MB")
    for ax in (ax_t, ax_m):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)


def write_plots(results: Sequence[Result], info: RunInfo, out_dir: str) -> List[str]:
    """One PNG per (op, dtype, N, tp): time and memory against V. Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    paths = []
    for (op, dtype, n, tp), rows in _groups(results).items():
        fig = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(fig)
        ax_t, ax_m = fig.subplots(1, 2)
        _plot_methods(ax_t, ax_m, rows)
        _plot_references(ax_t, ax_m, rows, op, dtype, n, tp)
        _style_axes(ax_t, ax_m, rows)
        title = f"{op}, N={n}, {dtype}" + (f", TP={tp}" if tp > 1 else "")
        fig.suptitle(f"{title} - {info.device_name}", fontsize=9)
        fig.tight_layout()
        name = f"bench_{op}_{dtype}_N{n}" + (f"_tp{tp}" if tp > 1 else "") + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def write_outputs(results: Sequence[Result], info: RunInfo, out_dir: Optional[str], *,
                  plots: bool = True, markdown_path: Optional[str] = None) -> List[str]:
    """Write results.csv, results.json and plots under ``out_dir``; the Markdown table too."""
    written = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        p = os.path.join(out_dir, "results.csv")
        write_csv(results, p)
        written.append(p)
        p = os.path.join(out_dir, "results.json")
        write_json(results, info, p)
        written.append(p)
        if plots:
            written += write_plots(results, info, out_dir)
    if markdown_path:
        text = markdown(results, info)
        if markdown_path == "-":
            sys.stdout.write(text)
        else:
            d = os.path.dirname(os.path.abspath(markdown_path))
            os.makedirs(d, exist_ok=True)
            with open(markdown_path, "w") as f:
                f.write(text)
            written.append(markdown_path)
    return written
