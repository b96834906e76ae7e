"""Benchmark cases: operations, shapes (N tokens, D hidden, V vocabulary), dtypes, presets.

A case is one (operation, N, D, V, dtype, TP world size). Materialised-logits operations
(cross_entropy, logprobs) use logits [N, V] (per rank [N, V / tp]); the fused linear one
uses hidden [N, D] and head [V, D]. Vocabulary sizes can be given by model name:

    llama2/mistral 32000, llama3 128256, qwen2.5 151936, gemma2 256000, gemma3 262144

with the matching hidden size (llama3-8B 4096, qwen2.5-7B 3584, gemma2-2B 2304,
gemma3-4B 2560) when a linear shape names a model instead of D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

OPS = ("cross_entropy", "linear_cross_entropy", "logprobs")

VOCABS: Dict[str, int] = {
    "llama2": 32000, "mistral": 32000, "32k": 32000,
    "llama3": 128256, "qwen2.5": 151936, "qwen2": 151936, "qwen": 151936,
    "gemma2": 256000, "gemma3": 262144, "gemma": 262144,
}
HIDDEN: Dict[str, int] = {
    "llama2": 4096, "mistral": 4096, "llama3": 4096, "qwen2.5": 3584, "qwen2": 3584,
    "qwen": 3584, "gemma2": 2304, "gemma3": 2560, "gemma": 2560,
}
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    """One benchmark point."""

    op: str
    n: int
    v: int
    dtype: torch.dtype
    d: int = 0  # hidden size (linear_cross_entropy only)
    tp: int = 1  # vocabulary-parallel world size (1: single device)
    label: str = ""  # model name the vocabulary came from, if any

    @property
    def shape_str(self) -> str:
        s = f"{self.n}x{self.d}x{self.v}" if self.op == "linear_cross_entropy" else \
            f"{self.n}x{self.v}"
        return s + (f" tp{self.tp}" if self.tp > 1 else "")

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))


# no size beyond this: the kernels index rows and columns with 32-bit offsets
MAX_SIZE = 2**31 - 1


def parse_size(tok: str, what: str, minimum: int = 1) -> int:
    """A size from text: an integer in [minimum, MAX_SIZE], else a ValueError naming ``what``."""
    try:
        v = int(tok.strip())
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {tok!r}") from None
    if v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    if v > MAX_SIZE:
        raise ValueError(f"{what} must be at most {MAX_SIZE}, got {v}")
    return v


def parse_vocab(tok: str) -> tuple:
    """'llama3' -> (128256, 'llama3'); '50000' or '50k' -> (50000, '')."""
    t = tok.strip().lower()
    if t in VOCABS:
        return VOCABS[t], t
    if t.endswith("k") and t[:-1].isdigit():
        return parse_size(str(int(t[:-1]) * 1000), "vocabulary size", 2), ""
    try:
        int(t)
    except ValueError:
        raise ValueError(f"unknown vocabulary {tok!r}: give a number or one of "
                         f"{sorted(set(VOCABS))}") from None
    return parse_size(t, "vocabulary size", 2), ""


def parse_dtype(tok: str) -> torch.dtype:
    t = tok.strip().lower()
    if t not in DTYPES:
        raise ValueError(f"unknown dtype {tok!r}: one of {sorted(DTYPES)}")
    return DTYPES[t]


def _parts(tok: str) -> List[str]:
    return [p for p in tok.strip().lower().replace("*", "x").split("x") if p]


def shape_parts(tok: str) -> List[str]:
    """The parts of a 'NxV' / 'NxDxV' shape, each checked (ValueError saying which is bad)."""
    parts = _parts(tok)
    if len(parts) not in (2, 3):
        raise ValueError(f"shape {tok!r} must be NxV or NxDxV")
    parse_size(parts[0], f"N in {tok!r}")
    if len(parts) == 3:
        parse_size(parts[1], f"D in {tok!r}")
    try:
        parse_vocab(parts[-1])
    except ValueError as exc:
        raise ValueError(f"V in {tok!r}: {exc}") from None
    return parts


def parse_shape(tok: str, op: str) -> tuple:
    """'NxV' (cross_entropy, logprobs) or 'NxDxV' (linear) -> (n, d, v, label).

    V may be a model name; for linear shapes 'NxMODEL' takes D from the model.
    """
    parts = shape_parts(tok)
    n = parse_size(parts[0], f"N in {tok!r}")
    if op == "linear_cross_entropy":
        if len(parts) == 2 and parts[1] in HIDDEN:
            v, label = parse_vocab(parts[1])
            return n, HIDDEN[parts[1]], v, label
        if len(parts) != 3:
            raise ValueError(f"linear shape {tok!r} must be NxDxV (or NxMODEL)")
        v, label = parse_vocab(parts[2])
        return n, parse_size(parts[1], f"D in {tok!r}"), v, label
    if len(parts) != 2:
        raise ValueError(f"shape {tok!r} must be NxV")
    v, label = parse_vocab(parts[1])
    return n, 0, v, label


def shape_mismatch(tok: str, ops: Sequence[str], hidden: Optional[int]) -> str:
    """Why the shape ``tok`` gives no case for any of ``ops`` (see :func:`custom_cases`)."""
    parts = _parts(tok)
    if len(parts) == 3:
        return (f"{tok} is NxDxV, a linear_cross_entropy shape, but --op is {','.join(ops)}; "
                "give NxV for the others")
    return (f"{tok} gives linear_cross_entropy no hidden size: use NxDxV, --hidden, or a model "
            f"name for V ({', '.join(sorted(HIDDEN))})")


def _cases(op: str, n: int, vocabs: Sequence, dtype: torch.dtype, d: Optional[int] = None,
           tp: int = 1) -> List[Case]:
    out = []
    for tok in vocabs:
        v, label = parse_vocab(str(tok))
        dd = 0
        if op == "linear_cross_entropy":
            dd = d if d is not None else HIDDEN.get(label, 4096)
        out.append(Case(op, n, v, dtype, dd, tp, label))
    return out


PRESETS = ("cpu", "gpu", "perf", "models", "tiny")


def preset_cases(name: str, ops: Sequence[str], dtype: Optional[torch.dtype], tp: int = 1
                 ) -> List[Case]:
    """The cases of a named preset, restricted to ``ops``.

    cpu:    small fp32 shapes (N = 256; V = 8192, 32000; linear D = 256) that run in
            seconds on two cores (the default without CUDA).
    gpu:    CE at N = 8192 over the 32K / Llama 3 / Qwen 2.5 / Gemma 3 vocabularies, bf16;
            logprobs and linear CE (D = 4096) at the Llama 3 vocabulary.
    perf:   the reference performance shapes: CE on N = 16384 x V in {32000, 128256, 262144}, bf16;
            linear CE (8192, 4096, 128256) and (8192, 2304, 256000); under torchrun
            (tp > 1) the vocab-parallel CE at V in {128256, 262144}.
    models: N = 4096 over every model vocabulary in the table above.
    tiny:   minute shapes for tests.
    """
    out: List[Case] = []
    for op in ops:
        lin = op == "linear_cross_entropy"
        if name == "tiny":
            dt = dtype or torch.float32
            out += _cases(op, 64, ["512", "1000"], dt, d=32, tp=tp)
        elif name == "cpu":
            dt = dtype or torch.float32
            if lin:
                out += _cases(op, 256, ["32000"], dt, d=256, tp=tp)
            elif op == "logprobs":
                out += _cases(op, 256, ["32000"], dt, tp=tp)
            else:
                out += _cases(op, 256, ["8192", "32000"], dt, tp=tp)
        elif name == "gpu":
            dt = dtype or torch.bfloat16
            if lin:
                out += _cases(op, 8192, ["llama3"], dt, tp=tp)
            elif op == "logprobs":
                out += _cases(op, 8192, ["llama3"], dt, tp=tp)
            else:
                out += _cases(op, 8192, ["32000", "llama3", "qwen2.5", "gemma3"], dt, tp=tp)
        elif name == "models":
            dt = dtype or torch.bfloat16
            out += _cases(op, 4096, ["32000", "llama3", "qwen2.5", "gemma2", "gemma3"], dt,
                          tp=tp)
        elif name == "perf":
            dt = dtype or torch.bfloat16
            if lin:
                out.append(Case(op, 8192, 128256, dt, 4096, tp, "llama3"))
                out.append(Case(op, 8192, 256000, dt, 2304, tp, "gemma2"))
            elif tp > 1:
                out += _cases(op, 16384, ["llama3", "262144"], dt, tp=tp)
            else:
                out += _cases(op, 16384, ["32000", "llama3", "262144"], dt, tp=tp)
        else:
            raise ValueError(f"unknown preset {name!r}: one of {PRESETS}")
    return out


def custom_cases(ops: Sequence[str], *, shapes: Sequence[str] = (), vocabs: Sequence[str] = (),
                 tokens: Optional[int] = None, hidden: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = (torch.float32,), tp: int = 1) -> List[Case]:
    """Cases from explicit shapes ('NxV' / 'NxDxV') or from vocabularies x tokens x hidden."""
    out: List[Case] = []
    for dt in dtypes:
        for op in ops:
            for s in shapes:
                parts = _parts(s)
                if op != "linear_cross_entropy":
                    if len(parts) == 2:
                        n, _, v, label = parse_shape(s, op)
                        out.append(Case(op, n, v, dt, 0, tp, label))
                    continue
                # linear CE takes NxDxV shapes, and NxV ones when D is known (--hidden,
                # or V named by a model)
                if len(parts) == 3 or (len(parts) == 2 and parts[1] in HIDDEN
                                       and hidden is None):
                    n, d, v, label = parse_shape(s, op)
                    out.append(Case(op, n, v, dt, d, tp, label))
                elif len(parts) == 2 and hidden is not None:
                    n, _, v, label = parse_shape(s, "cross_entropy")
                    out.append(Case(op, n, v, dt, hidden, tp, label))
            if vocabs:
                n = tokens or 4096
                out += _cases(op, n, vocabs, dt, d=hidden, tp=tp)
    return out
