"""The ``fusedce`` command line and its benchmark machinery, on tiny CPU shapes.

Checks: ``bench`` writes a table whose rows are every (case, method) with finite times,
floor ratios and small fp64 errors, plus CSV / JSON / Markdown / PNG files; a method that
raises (or runs out of memory) is recorded and the sweep goes on; the CPU peak-memory
probe reproduces known allocations exactly; ``check`` passes the torch backend; ``demo``
reports memory saved; the console script runs once in a subprocess.
"""

from __future__ import annotations

import argparse
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
    # explicit shapes replace a preset (both together are refused)
    preset = [] if "--shape" in extra else ["--preset", "tiny"]
    rc = main(["bench", *preset, "--quiet", "--out", str(out), "--markdown", str(md),
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


def _logged_method(name, log):
    """A method that records (name, grad enabled) on every call and is otherwise eager."""
    eager = methods.select_methods(["eager"])[0]

    def build(case, device):
        fn = eager.build(case, device)

        def run(inp):
            log.append((name, torch.is_grad_enabled()))
            return fn(inp)
        return run
    return methods.Method(name, eager.ops, eager.family, build)


@pytest.mark.parametrize("passes", [1, 3])
def test_cpu_timing_runs_in_passes_over_the_methods(passes, monkeypatch):
    """On the CPU every method of a case is timed in ``cpu_passes`` passes, the methods'
    order rotated from pass to pass, each pass its share of the reps; the reported times are
    the medians over every pass's step times."""
    log = []
    case = shapes.preset_cases("tiny", ["cross_entropy"], None)[:1]
    ms = [_logged_method("a", log), _logged_method("b", log)]
    timed = []  # (method, forward + backward?, step times) per timing burst, in order
    real = measure.time_cpu

    def recording(step, **kw):
        before = len(log)
        out = real(step, **kw)
        (who,) = {(name, grad) for name, grad in log[before:]}
        timed.append((*who, out))
        return out
    monkeypatch.setattr(measure, "time_cpu", recording)
    cfg = runner.SweepConfig(device=torch.device("cpu"), cpu_min_time_s=0, cpu_min_reps=6,
                             cpu_passes=passes, ceilings=False, progress=False)
    results, _ = runner.run_sweep(case, ms, cfg)
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(len(t) == 6 // passes for _, _, t in timed)
    # per pass each method's forward + backward, then its forward only
    order = [(name, grad) for name, grad, _ in timed]
    a, b = [("a", True), ("a", False)], [("b", True), ("b", False)]
    assert order == {1: a + b, 3: a + b + b + a + a + b}[passes]
    for r in results:
        fb = [x for name, grad, t in timed if name == r.method and grad for x in t]
        fw = [x for name, grad, t in timed if name == r.method and not grad for x in t]
        assert r.fwd_bwd_ms == measure.median(fb) and r.fwd_ms == measure.median(fw)


def test_a_method_failing_in_a_later_pass_keeps_its_first_times(monkeypatch):
    eager = methods.select_methods(["eager"])[0]
    calls = []

    def build(case, device):
        fn = eager.build(case, device)

        def run(inp):
            calls.append(1)
            # the first pass: warm-up, memory probe, 2 timed steps, forward warm-up, 2 timed
            if len(calls) > 7:
                raise RuntimeError("gone")
            return fn(inp)
        return run
    timed = []
    real = measure.time_cpu

    def recording(step, **kw):
        timed.append(real(step, **kw))
        return timed[-1]
    monkeypatch.setattr(measure, "time_cpu", recording)
    cfg = runner.SweepConfig(device=torch.device("cpu"), cpu_min_time_s=0, cpu_min_reps=6,
                             cpu_passes=3, ceilings=False, progress=False)
    case = shapes.preset_cases("tiny", ["cross_entropy"], None)[:1]
    (r,), _ = runner.run_sweep(case, [methods.Method("flaky", eager.ops, eager.family, build)],
                               cfg)
    assert r.status == "ok" and len(timed) == 2
    assert r.fwd_bwd_ms == measure.median(timed[0]) and r.fwd_ms == measure.median(timed[1])


def test_a_slow_step_is_timed_once_without_further_passes(monkeypatch):
    """A step slower than slow_step_s is timed by its memory-probed step and one forward,
    with no timing passes after it."""
    calls = []
    monkeypatch.setattr(measure, "time_cpu", lambda *a, **k: calls.append(1) or [1.0])
    cfg = runner.SweepConfig(device=torch.device("cpu"), cpu_min_time_s=0, ceilings=False,
                             progress=False, slow_step_s=0.0)
    case = shapes.preset_cases("tiny", ["cross_entropy"], None)[:1]
    (r,), _ = runner.run_sweep(case, methods.select_methods(["eager"]), cfg)
    assert r.status == "ok" and r.message.startswith("slow: timed by one step")
    assert r.fwd_bwd_ms > 0 and r.fwd_ms > 0 and calls == []


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


NO_CUDA = not torch.cuda.is_available()
HUGE = "2000000000x262144"  # logits no machine holds


def _bad_argv(tmp_path):
    """(argv, option the one-line error must name) for every kind of nonsense argument."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        # bench: sizes and shapes
        (["bench", "--shape=-5x100"], "--shape"), (["bench", "--shape", "0x100"], "--shape"),
        (["bench", "--shape", "1.5x100"], "--shape"), (["bench", "--shape", "10x1"], "--shape"),
        (["bench", "--shape", "10x0k"], "--shape"), (["bench", "--shape", "10xfoo"], "--shape"),
        (["bench", "--shape", "1x2x3x4"], "--shape"), (["bench", "--shape", ","], "--shape"),
        (["bench", "--shape", "3000000000x100"], "--shape"),
        (["bench", "--op", "linear_cross_entropy", "--shape=8x-3x100"], "--shape"),
        (["bench", "--op", "cross_entropy", "--shape", "8x32x700"], "--shape"),
        (["bench", "--op", "linear_cross_entropy", "--shape", "8x700"], "--shape"),
        (["bench", "--shape", HUGE, "--no-files"], "--shape"),
        (["bench", "--vocab", "0"], "--vocab"), (["bench", "--vocab", "1.5k"], "--vocab"),
        (["bench", "--vocab", "llama3", "--tokens", "2000000000", "--no-files"], "--vocab"),
        (["bench", "--tokens", "0"], "--tokens"), (["bench", "--tokens", "x"], "--tokens"),
        (["bench", "--tokens", "64", "--shape", "8x100"], "--tokens"),
        (["bench", "--hidden", "-1"], "--hidden"), (["bench", "--hidden", "64"], "--hidden"),
        (["bench", "--hidden", "64", "--op", "logprobs", "--vocab", "100"], "--hidden"),
        # bench: timing, seed, choices
        (["bench", "--min-time", "-1"], "--min-time"),
        (["bench", "--min-time", "nan"], "--min-time"),
        (["bench", "--min-time", "x"], "--min-time"), (["bench", "--rep-ms", "0"], "--rep-ms"),
        (["bench", "--rep-ms", "inf"], "--rep-ms"), (["bench", "--seed", "-1"], "--seed"),
        (["bench", "--seed", "1e3"], "--seed"), (["bench", "--seed", str(2**70)], "--seed"),
        (["bench", "--preset", "bogus"], "--preset"),
        (["bench", "--preset", "tiny", "--shape", "8x100"], "--preset"),
        (["bench", "--op", "nope"], "--op"), (["bench", "--op", "cross_entropy,nope"], "--op"),
        (["bench", "--dtype", "int8"], "--dtype"), (["bench", "--dtype", ""], "--dtype"),
        (["bench", "--methods", "no-such-method"], "--methods"),
        (["bench", "--methods", "eager,nope*"], "--methods"),
        (["bench", "--methods", "cce", "--op", "cross_entropy", "--no-files"], "--methods"),
        # bench: devices and files
        (["bench", "--device", "meta"], "--device"),
        (["bench", "--device", "bogus"], "--device"),
        (["bench", "--device", "cuda:x"], "--device"),
        (["bench", "--list", "--device", "meta"], "--device"),
        (["bench", "--out", str(a_file / "x")], "--out"),
        (["bench", "--out", str(a_file)], "--out"),
        (["bench", "--out", ""], "--out"), (["bench", "--out", "x", "--no-files"], "--out"),
        (["bench", "--markdown", str(tmp_path)], "--markdown"),
        (["bench", "--markdown", str(a_file / "t.md"), "--no-files"], "--markdown"),
        (["bench", "--bogus"], "--bogus"), (["bench", "stray"], "stray"),
        # check
        (["check", "--device", "meta"], "--device"),
        (["check", "--backend", "bogus"], "--backend"),
        (["check", "--backend", "torch,nope"], "--backend"),
        (["check", "--shape", "axbxc"], "--shape"), (["check", "--shape", "2x3x0"], "--shape"),
        (["check", "--shape", "2x3"], "--shape"), (["check", "--shape=-1x3x100"], "--shape"),
        (["check", "--shape", "2x3x1"], "--shape"),
        (["check", "--shape", "100000x1000x100000"], "--shape"),
        (["check", "--seed", "-3"], "--seed"), (["check", "--seed", "x"], "--seed"),
        (["check", "--quick=yes"], "--quick"), (["check", "--bogus"], "--bogus"),
        # demo
        (["demo", "--device", "meta"], "--device"), (["demo", "--device", "bogus"], "--device"),
        (["demo", "--vocab", "0"], "--vocab"), (["demo", "--vocab", "1"], "--vocab"),
        (["demo", "--batch", "-1"], "--batch"), (["demo", "--seq", "x"], "--seq"),
        (["demo", "--seq", "1.5"], "--seq"), (["demo", "--hidden", "0"], "--hidden"),
        (["demo", "--batch", "99999999999"], "--batch"),
        (["demo", "--batch", "100000", "--seq", "100000"], "--batch"),
        # the command itself
        (["bogus"], "bogus"), ([], "command"), (["--bogus"], "--bogus"),
    ]
    if NO_CUDA:
        cases += [(["bench", "--preset", "perf"], "--preset"),
                  (["bench", "--preset", "gpu", "--no-files"], "--preset"),
                  (["bench", "--methods", "liger", "--no-files"], "--methods"),
                  (["bench", "--device", "cuda"], "--device"),
                  (["check", "--device", "cuda:0"], "--device"),
                  (["demo", "--device", "cuda"], "--device")]
    return cases


def _error_line(argv, capsys):
    """Run ``main(argv)``; it must exit 2 with one stderr line; returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, (argv, exc.value.code, captured.err)
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, (argv, captured.err)
    return lines[0]


def test_bad_arguments_exit_2_with_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    """Every nonsense argument: exit status 2, one stderr line naming it, no work done."""
    monkeypatch.chdir(tmp_path)
    for argv, option in _bad_argv(tmp_path):
        line = _error_line(argv, capsys)
        assert line.startswith("fusedce") and "error:" in line, (argv, line)
        assert option in line, (argv, option, line)
    # nothing ran: the default output directory was never made
    assert not (tmp_path / "fusedce-bench-results").exists()


@pytest.mark.parametrize("argv,option", [
    (["demo", "--device", "meta"], "--device"), (["bench", "--out", "/dev/null/x"], "--out"),
])
def test_bad_arguments_in_a_subprocess(argv, option):
    """``python -m fusedce``: the same one line and exit status 2 from the real process."""
    proc = subprocess.run([sys.executable, "-m", "fusedce", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedce {version('fusedce')}"


def test_every_option_has_help(capsys):
    """``fusedce check --help`` (and bench, demo) describes each option it takes."""
    from fusedce.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
    with pytest.raises(SystemExit) as exc:
        main(["check", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt, words in (("--device", "cuda"), ("--backend", "triton"), ("--quick", "option sets"),
                       ("--shape", "BxTxV"), ("--seed", "seed")):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(opt))
        assert words in line, (opt, line)


def test_available_host_memory():
    have = measure.available_host_bytes()
    assert have is None or have > 0


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
