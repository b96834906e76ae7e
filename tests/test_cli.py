"""The ``fusedce`` command line and its benchmark machinery, on tiny CPU shapes.

Checks: ``bench`` writes a table whose rows are every (case, method) with finite times,
floor ratios and small fp64 errors, plus CSV / JSON / Markdown / PNG files; a method that
raises (or runs out of memory) is recorded and the sweep goes on; the CPU peak-memory
probe reproduces known allocations exactly; ``check`` passes the torch backend; ``demo``
reports memory saved; the console script runs once in a subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedce.bench import measure, memtarget, methods, runner, shapes
from fusedce.cli import main

MB = 2**20


def _bench(tmp_path, capsys, *extra):
    out = tmp_path / "res"
    md = tmp_path / "table.md"
    rc = main(["bench", "--preset", "tiny", "--quiet", "--out", str(out), "--markdown", str(md),
               "--min-time", "0", *extra])
    assert rc == 0
    return out, md, capsys.readouterr().out


def test_bench_cross_entropy_table_and_files(tmp_path, capsys):
    out, md, text = _bench(tmp_path, capsys, "--op", "cross_entropy", "--methods",
                           "fusedce-torch,fusedce-torch-inplace,eager")
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["op", "shape", "dtype", "method"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    # tiny preset: V in {512, 1000} at N = 64, three methods each
    assert {(r["shape"], r["method"]) for r in rows} == {
        (s, m) for s in ("64x512", "64x1000")
        for m in ("fusedce-torch", "fusedce-torch-inplace", "eager")}
    for r in rows:
        assert r["status"] == "ok", r
        for k in ("fwd_bwd_ms", "fwd_ms", "ratio_fwd_bwd", "floor_fwd_bwd_ms"):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0, (k, r)
        assert float(r["err"]) < 1e-5, r
    by = {(r["shape"], r["method"]): float(r["peak_bytes"]) for r in rows}
    grad = 64 * 1000 * 4
    # eager keeps log-softmax + gradient; fusedce a gradient (its forward temporaries are one
    # chunk, here all 64 rows); in-place no gradient, only the forward's chunk
    assert by[("64x1000", "eager")] >= 2 * grad
    assert grad <= by[("64x1000", "fusedce-torch")] < by[("64x1000", "eager")]
    assert by[("64x1000", "fusedce-torch-inplace")] <= by[("64x1000", "fusedce-torch")]
    doc = json.load(open(out / "results.json"))
    assert doc["info"]["copy_bytes_per_s"] > 0 and doc["info"]["matmul_flops"]["float32"] > 0
    assert len(doc["results"]) == len(rows)
    table = md.read_text()
    assert "| op | shape | dtype | method |" in table and table.count("\n| cross_entropy") == 6
    assert "ceilings" in table
    if methods.module_available("matplotlib"):
        assert (out / "bench_cross_entropy_fp32_N64.png").stat().st_size > 1000


def test_bench_linear_and_logprobs(tmp_path, capsys):
    if not hasattr(__import__("fusedce"), "linear_cross_entropy"):
        pytest.skip("fusedce.linear_cross_entropy not available")
    out, _, _ = _bench(tmp_path, capsys, "--op", "linear_cross_entropy,logprobs",
                          "--methods", "fusedce-torch,eager", "--shape", "48x32x700,48x700",
                          "--no-plots", "--no-forward")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["op"], r["shape"], r["method"]) for r in rows} == {
        (op, s, m) for op, s in (("linear_cross_entropy", "48x32x700"), ("logprobs", "48x700"))
        for m in ("fusedce-torch", "eager")}
    for r in rows:
        assert r["status"] == "ok" and float(r["err"]) < 1e-5, r
        assert r["fwd_ms"] == "nan"  # --no-forward


def _boom_method(exc):
    def build(case, device):
        def fn(inp):
            raise exc
        return fn
    return methods.Method("boom", ("cross_entropy",), "pytorch", build)


def test_failures_are_recorded_and_sweep_continues():
    cases = shapes.preset_cases("tiny", ["cross_entropy"], None)
    ms = [_boom_method(MemoryError("out of memory")), _boom_method(RuntimeError("kaput")),
          methods.select_methods(["eager"])[0]]
    # same name twice would be ambiguous: rename the second failure
    ms[1] = methods.Method("boom2", ms[1].ops, ms[1].family, ms[1].build)
    cfg = runner.SweepConfig(device=torch.device("cpu"), cpu_min_time_s=0, ceilings=False,
                             progress=False)
    results, _ = runner.run_sweep(cases, ms, cfg)
    assert [(r.method, r.status) for r in results] == [
        ("boom", "OOM"), ("boom2", "error"), ("eager", "ok")] * 2
    assert "kaput" in results[1].message
    assert math.isnan(results[0].fwd_bwd_ms) and results[2].fwd_bwd_ms > 0


def test_cpu_peak_probe_on_known_allocations():
    a, b, c = 3 * MB, 1 * MB, 2 * MB
    # a + b live, then b + c: the peak is the larger pair, the net what stays
    peak, net, (tb, tc) = measure.cpu_peak_bytes(memtarget._known_step(a, b, c))
    assert peak == max(a + b, b + c)
    assert net == b + c


def test_shapes_and_presets():
    assert shapes.parse_vocab("gemma3") == (262144, "gemma3")
    assert shapes.parse_vocab("50k") == (50000, "")
    assert shapes.parse_shape("8192x4096xllama3", "linear_cross_entropy")[:3] == (8192, 4096,
                                                                                 128256)
    assert shapes.parse_shape("16xgemma2", "linear_cross_entropy")[:3] == (16, 2304, 256000)
    with pytest.raises(ValueError):
        shapes.parse_vocab("nonsense")
    perf = shapes.preset_cases("perf", ["cross_entropy", "linear_cross_entropy"], None)
    assert {(c.op, c.n, c.d, c.v) for c in perf} == {
        ("cross_entropy", 16384, 0, 32000), ("cross_entropy", 16384, 0, 128256),
        ("cross_entropy", 16384, 0, 262144), ("linear_cross_entropy", 8192, 4096, 128256),
        ("linear_cross_entropy", 8192, 2304, 256000)}
    assert all(c.dtype == torch.bfloat16 for c in perf)


def test_bench_bad_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "--op", "nope", "--quiet", "--no-files"])
    with pytest.raises(SystemExit):
        main(["bench", "--methods", "no-such-method", "--quiet", "--no-files"])


@pytest.mark.parametrize("argv", [
    ["demo", "--vocab", "0"], ["demo", "--batch", "-1"], ["demo", "--seq", "x"],
    ["demo", "--device", "bogus"], ["bench", "--dtype", "bogus", "--no-files"],
    ["bench", "--device", "bogus", "--no-files"], ["bench", "--tokens", "0", "--no-files"],
    ["check", "--shape", "axbxc"], ["check", "--shape", "2x3x0"], ["check", "--shape", "2x3"],
])
def test_bad_options_exit_with_a_message(argv, capsys):
    """A bad option ends in one line naming it and a non-zero exit, not a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    text = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    assert "fusedce" in text and "Traceback" not in text


def test_check_torch_backend(capsys):
    rc = main(["check", "--backend", "torch", "--quick"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "PASS" in text and "FAIL" not in text
    assert text.strip().splitlines()[-1].endswith("passed, 0 failed")


def test_demo(capsys):
    assert main(["demo", "--batch", "2", "--seq", "16", "--hidden", "32", "--vocab", "3000"]) == 0
    text = capsys.readouterr().out
    assert "fusedce.cross_entropy(inplace_backward=True)" in text and "saved" in text
    from fusedce.bench.demo import run_demo

    # logits 512 x 32000 fp32 = 62.5 MB: several row chunks of fusedce's 32 MB budget
    rows = run_demo(torch.device("cpu"), batch=2, seq=256, hidden=32, vocab=32000,
                    log=lambda s: None)
    eager = rows[0]
    assert len(rows) >= 3
    for r in rows[1:]:
        assert abs(r["loss"] - eager["loss"]) < 1e-5 and r["grad_diff"] < 1e-5, r
        # the default keeps the logits and a fresh gradient like eager (no log-softmax, but
        # a chunk of temporaries); in-place and fused-linear save at least a logits' worth
        if "inplace" in r["name"] or "linear" in r["name"]:
            assert r["peak_bytes"] < 0.8 * eager["peak_bytes"], r
        else:
            assert r["peak_bytes"] <= 1.01 * eager["peak_bytes"], r


def test_python_dash_m_fusedce():
    proc = subprocess.run([sys.executable, "-m", "fusedce", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--vocab" in proc.stdout, proc.stderr


def test_console_script_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("fusedce")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fusedce.cli"]
    proc = subprocess.run(cmd + ["bench", "--preset", "tiny", "--op", "logprobs", "--methods",
                                 "eager", "--no-files", "--no-ceilings", "--quiet",
                                 "--min-time", "0"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "logprobs" in proc.stdout and "2 measurements" in proc.stdout


def test_bench_vocab_parallel_under_torchrun(tmp_path):
    """Two gloo ranks: fusedce with tp_group and the hand-written PyTorch TP baseline."""
    out = tmp_path / "tp"
    proc = subprocess.run(
        # --standalone: a free rendezvous port, so concurrent runs do not collide
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fusedce.cli", "bench",
         "--preset", "tiny", "--op", "cross_entropy", "--methods", "fusedce-torch,pytorch-tp",
         "--no-ceilings", "--no-forward", "--no-plots", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["shape"], r["method"]) for r in rows} == {
        (s, m) for s in ("64x512 tp2", "64x1000 tp2") for m in ("fusedce-torch", "pytorch-tp")}
    for r in rows:
        assert r["status"] == "ok" and float(r["err"]) < 1e-5 and r["tp"] == "2", r
