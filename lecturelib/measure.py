"""Measuring quantized models well: bytes on disk and in memory, latency distributions, a profiler
breakdown, and the two small models the measurements are made on (a digits CNN and a tiny
character-level transformer trained on Python's own standard-library source).

Scope: CPU inference with PyTorch's eager modules (fp32/fp16/bf16), torch.ao's fbgemm int8
(dynamic and static), and torchao's int8/int4 configs where they run. The measurement habits follow
J. Ousterhout, "Always Measure One Level Deeper", CACM 61(7), 2018; the int8 recipes Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018; the transformer Vaswani et al. 2017 / Radford et al. 2019 (GPT-2 layout).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sysconfig
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .gptq import GPTQConfig
from .harness import progress
from .qat_toolchains import quiet  # the one implementation (notebook 10 uses measure.quiet)
from .quantizers import PerChannel, PerGroup, choose_qparams, quantize

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- size
def serialize(obj: Any) -> bytes:
    """The bytes ``torch.save(obj)`` writes (a zip archive: data.pkl + one entry per tensor storage).

    Used in: 10_measure_one_level_deeper.
    """
    buf = io.BytesIO()
    with quiet():
        torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class SizeAccount:
    """Where the bytes of a ``torch.save`` file go; the three parts add up to ``total``."""

    storage_bytes: int
    """Raw tensor storages (data/0, data/1, ...): the numbers themselves."""
    pickle_bytes: int
    """data.pkl: names, shapes, dtypes, strides, quantizer parameters of per-tensor int8."""
    container_bytes: int
    """Zip headers, the central directory, 64-byte alignment padding, version/byteorder files."""
    total: int
    """len(serialized bytes)."""


def size_account(data: bytes) -> SizeAccount:
    """Split a torch.save file into storage + pickle + container bytes (sum == len(data)).

    storage = sum of uncompressed sizes of the entries under data/; pickle = size of data.pkl;
    container = len(data) - storage - pickle (torch.save stores entries uncompressed).
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"data must be bytes from torch.save, got {type(data).__name__}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ValueError("data must be a torch.save zip archive (torch >= 1.6 format)") from e
    storage = pickle = 0
    for info in zf.infolist():
        parts = info.filename.split("/")
        if len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit():
            storage += info.file_size
        elif parts[-1] == "data.pkl":
            pickle += info.file_size
    return SizeAccount(storage, pickle, len(data) - storage - pickle, len(data))


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def tensor_bytes(t: Tensor) -> int:
    """Bytes of one tensor's elements in memory: numel * element_size, plus per-channel qparams.

    A per-channel quantized tensor also holds its scales (float64) and zero points (int64).
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        # a tensor subclass (torchao): its outer dtype is the float it stands for, so count the
        # inner tensors it is made of (int8 data, scales, ...) instead
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner)
    n = t.numel() * t.element_size()
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += t.q_per_channel_scales().numel() * 8 + t.q_per_channel_zero_points().numel() * 8
    return n


def _state_of(model_or_state: nn.Module | dict) -> dict:
    """A module's state_dict (torch.ao warnings silenced), or the dict itself; anything else is a ValueError."""
    if isinstance(model_or_state, nn.Module):
        with quiet():
            model_or_state = model_or_state.state_dict()
    if not isinstance(model_or_state, dict):
        raise ValueError(f"model_or_state must be an nn.Module or a state dict, got {type(model_or_state).__name__}")
    return model_or_state


def memory_bytes(model_or_state: nn.Module | dict) -> int:
    """Bytes of the numbers a model keeps in memory: sum of tensor_bytes over its state_dict.

    For torch.ao's quantized modules the state_dict unpacks fbgemm's packed weights into
    int8 tensors of the same element count. Python objects and allocator slack are not counted.
    Used in: 10_measure_one_level_deeper.
    """
    model_or_state = _state_of(model_or_state)
    return sum(tensor_bytes(t) for t in _tensors(model_or_state))


def bytes_by_dtype(model_or_state: nn.Module | dict) -> dict[str, int]:
    """memory_bytes split by element type: {"float32": ..., "qint8": ..., "uint8": ...}, largest first.

    The values add up to memory_bytes(model_or_state); a per-channel quantized tensor's scales and
    zero points count with its own dtype; a tensor subclass (torchao) is split into its inner tensors.
    Used in: 10_measure_one_level_deeper.
    """
    model_or_state = _state_of(model_or_state)
    out: dict[str, int] = {}

    def add(t: Tensor) -> None:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + tensor_bytes(t)

    for t in _tensors(model_or_state):
        add(t)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def pack_codes(codes: Tensor, num_bits: int) -> Tensor:
    """Pack integer codes in [0, 2^num_bits) densely into uint8: ceil(numel * num_bits / 8) bytes.

    Bit k (LSB first) of code i goes to bit position i * num_bits + k of the stream.
    Used in: 10_measure_one_level_deeper.
    """
    if num_bits not in range(1, 9):
        raise ValueError(f"num_bits must be in 1..8, got {num_bits!r}")
    c = codes.detach().reshape(-1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**num_bits):
        raise ValueError(f"codes must lie in [0, {2**num_bits - 1}] for num_bits={num_bits}")
    bits = ((c.numpy()[:, None] >> np.arange(num_bits)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def weight_only_state(model: nn.Module, cfg: GPTQConfig, names: list[str]) -> dict[str, Tensor]:
    """The deployable state of a weight-only quantized model: what a checkpoint would store.

    Each named nn.Linear weight W (out, in) becomes bit-packed unsigned codes
    (num_bits * out * in / 8 bytes) + fp16 scales and uint8 zero points, one per row and group
    (from quantizers.choose_qparams on the current, already quantized weights, which map back
    onto the same grid); every other tensor (embeddings, norms, biases, the output head) stays fp32.
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(cfg, GPTQConfig):
        raise ValueError(f"cfg must be a GPTQConfig, got {type(cfg).__name__}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n in names:
        W = state.pop(f"{n}.weight").float()
        gran = PerChannel(axis=0) if cfg.group_size is None else PerGroup(axis=1, group_size=cfg.group_size)
        qp = choose_qparams(W, cfg.num_bits, cfg.symmetric, gran)
        q = quantize(W, qp) - qp.qmin  # unsigned codes 0 .. 2^N - 1
        state[f"{n}.codes"] = pack_codes(q, cfg.num_bits)
        state[f"{n}.scale"] = qp.scale.half()
        state[f"{n}.zero_point"] = (qp.zero_point - qp.qmin).to(torch.uint8)
    return state


# ----------------------------------------------------------------------------- latency
@dataclass
class LatencySample:
    """Per-call wall-clock times of one (model, input) pair."""

    times_ms: np.ndarray
    """One entry per timed call, in milliseconds, in call order."""
    warmup: int
    """Calls run (and discarded) before timing."""
    threads: int
    """torch.get_num_threads() during the run."""

    def percentile(self, q: float) -> float:
        """q-th percentile (0..100) with linear interpolation (numpy's default)."""
        return float(np.percentile(self.times_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)



def _check_timing_args(fn: Any, reps: Any, warmup: Any, threads: Any) -> None:
    """ValueError unless fn is callable, reps >= 1, warmup >= 0 and threads >= 1 are ints."""
    if not callable(fn):
        raise ValueError("fn must be a callable taking no arguments")
    for name, v, lo in (("reps", reps, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

def measure_latency(fn: Callable[[], Any], reps: int = 200, warmup: int = 20, threads: int = 2) -> LatencySample:
    """Time ``reps`` calls of ``fn`` one by one with time.perf_counter_ns after ``warmup`` untimed calls.

    Threads are pinned to ``threads`` for the run (and restored); autograd is off.
    Used in: 10_measure_one_level_deeper, bench/latency.py.
    """
    _check_timing_args(fn, reps, warmup, threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), quiet():
            for _ in range(warmup):
                fn()
            out = np.empty(reps)
            for i in range(reps):
                t0 = time.perf_counter_ns()
                fn()
                out[i] = (time.perf_counter_ns() - t0) / 1e6
    finally:
        torch.set_num_threads(old)
    return LatencySample(out, warmup, threads)


def measure_interleaved(fns: dict[str, Callable[[], Any]], reps: int = 200, warmup: int = 20, threads: int = 2,
                        rounds: int = 5) -> dict[str, LatencySample]:
    """Time several callables in turn: ``rounds`` rounds, each giving every callable reps/rounds timed calls.

    Each callable first gets ``warmup`` untimed calls. Visiting the callables in turn, round after round,
    spreads a change of machine load (another program starting) over all of them instead of letting it
    land on whichever one was being timed; the per-call samples of all rounds are concatenated.
    Used in: 10_measure_one_level_deeper, bench/latency.py.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise ValueError("fns must be a non-empty dict of name -> callable taking no arguments")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= max(reps, 1):
        raise ValueError(f"rounds must be an int in 1..reps, got {rounds!r}")
    per = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    for r, n in enumerate(per):
        for k, f in fns.items():
            parts[k].append(measure_latency(f, n, warmup if r == 0 else 0, threads).times_ms)
    return {k: LatencySample(np.concatenate(v), warmup, threads) for k, v in parts.items()}


def naive_latency(fn: Callable[[], Any]) -> float:
    """The seed report's way: one call, no warm-up, cold caches and lazy initialisation included (ms).

    Used in: 10_measure_one_level_deeper.
    """
    with torch.inference_mode(), quiet():
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e6


def timer_median_ms(fn: Callable[[], Any], min_run_time: float = 0.3, threads: int = 2) -> float:
    """A second, independent clock: torch.utils.benchmark.Timer.blocked_autorange median (ms).

    It times blocks of calls (not single calls) and picks the block size itself.
    Used in: 10_measure_one_level_deeper.
    """
    with torch.inference_mode(), quiet():
        from torch.utils import benchmark  # its import logs a CUDA notice on CPU-only machines

        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
            min_run_time=min_run_time)
    return m.median * 1e3


CATEGORIES = ("quantize activations", "int GEMM / conv", "dequantize", "float GEMM / conv", "dtype casts", "other")
_INT8_STEPS = CATEGORIES[:3]


def op_category(name: str) -> str:
    """Map one profiler op name to one of CATEGORIES (by the op's own name only).

    dequantize*: "dequantize"; quantize_* / choose_qparams*: "quantize activations";
    quantized::* (fbgemm's fused int8 kernels, which quantize and dequantize inside) and
    _int_mm: "int GEMM / conv"; float matmul/conv/linear: "float GEMM / conv"; to/_to_copy/copy_:
    "dtype casts"; everything else "other".
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    n = name.lower()
    op = n.split("::")[-1]
    if "dequantize" in op:
        return "dequantize"
    if op.startswith(("quantize_", "choose_qparams", "_choose_qparams")):
        return "quantize activations"
    if n.startswith("quantized::") or "int_mm" in op or "int8" in op:
        return "int GEMM / conv"
    if any(k in op for k in ("addmm", "mm", "matmul", "conv", "mkldnn", "linear", "scaled_dot")):
        return "float GEMM / conv"
    if op in ("to", "_to_copy", "copy_", "type_as"):
        return "dtype casts"
    return "other"


def event_category(event: Any) -> str:
    """Category of one profiler event, counting the ops *inside* a quantize/int GEMM/dequantize op as part of it.

    Walks from the event up its cpu_parent chain; the first op whose own category is one of the
    three int8 steps wins (so torchao's quantize_affine, built from aten::mul/round/clamp, counts
    as "quantize activations"); if there is none, the event's own category.
    Used in: 10_measure_one_level_deeper (through profile_breakdown).
    """
    e = event
    while e is not None:
        c = op_category(e.name)
        if c in _INT8_STEPS:
            return c
        e = e.cpu_parent
    return op_category(event.name)


@dataclass
class Breakdown:
    """Per-call self CPU time of each op category, from torch.profiler."""

    ms: dict[str, float]
    """Category -> self CPU milliseconds per call (sums to total_ms)."""
    total_ms: float
    """Sum of self CPU time per call: the profiler's view of the whole forward."""
    wall_ms: float = 0.0
    """Wall clock per call of the same profiled calls (perf_counter around the loop)."""
    top_ops: list[tuple[str, float]] = field(default_factory=list)
    """The five ops with the most self CPU time per call (name, ms)."""


@contextlib.contextmanager
def _mute_native_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null: the profiler's C++ side (kineto) logs there directly."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def profile_breakdown(fn: Callable[[], Any], reps: int = 30, warmup: int = 5, threads: int = 2) -> Breakdown:
    """Run ``fn`` under torch.profiler and sum each op's self CPU time into CATEGORIES, per call.

    Self time counts an op's own time without its children, so the categories add up to the
    profiled total (which includes the profiler's own overhead of a few microseconds per op).
    The ops inside a quantize / int GEMM / dequantize op count for that op (``event_category``).
    Used in: 10_measure_one_level_deeper.
    """
    from torch.profiler import ProfilerActivity, profile

    _check_timing_args(fn, reps, warmup, threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), quiet():
            for _ in range(warmup):
                fn()
            with _mute_native_output():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter_ns()
                    for _ in range(reps):
                        fn()
                    wall = (time.perf_counter_ns() - t0) / 1e6 / reps
                events = list(prof.events())
    finally:
        torch.set_num_threads(old)
    ms = {c: 0.0 for c in CATEGORIES}
    per_op: dict[str, float] = {}
    for e in events:
        t = e.self_cpu_time_total / 1e3 / reps
        ms[event_category(e)] += t
        per_op[e.name] = per_op.get(e.name, 0.0) + t
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])
    return Breakdown(ms, sum(ms.values()), wall, ops[:5])


def profile_interleaved(fns: dict[str, Callable[[], Any]], reps: int = 10, warmup: int = 3, threads: int = 2,
                        rounds: int = 3) -> dict[str, Breakdown]:
    """profile_breakdown of several callables in interleaved rounds; per callable, its least disturbed round.

    Each round profiles every callable in turn (``reps`` calls each; ``warmup`` untimed calls in the
    first round only). A burst of load from another program inflates whichever round it hits, so per
    callable the round with the smallest profiled wall time is kept (the same reasoning as taking the
    minimum of repeated timeit runs).
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise ValueError("fns must be a non-empty dict of name -> callable taking no arguments")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    best: dict[str, Breakdown] = {}
    for r in range(rounds):
        for k, f in fns.items():
            b = profile_breakdown(f, reps, warmup if r == 0 else 0, threads)
            if k not in best or b.wall_ms < best[k].wall_ms:
                best[k] = b
    return best


@dataclass
class LinearParts:
    """Latency of one linear layer, whole and taken apart (``int8_linear_parts``)."""

    samples: dict[str, LatencySample]
    """Step name -> per-call times; see int8_linear_parts for the steps."""
    max_abs_error: float
    """max |y_chain - y_fp32| of the hand-made int8 chain: it computes the same layer."""


def int8_linear_parts(layer: nn.Linear, x: Tensor, reps: int = 200, warmup: int = 20,
                      threads: int = 2) -> LinearParts:
    """Time y = x W^T + b for one layer: fp32, fbgemm's fused int8 kernel, and int8 built from separate ops.

    The chain does what a dynamic int8 linear must do, one PyTorch op per step:
      quantize activations: s_x = max|x| / 127, x_q = clamp(round(x / s_x), -127, 127) as int8
      int GEMM:             acc = x_q @ W_q^T in int32 (torch._int_mm), W_q = round(W / s_w) per row
      dequantize:           y = acc * (s_x * s_w) + b in float32
    fbgemm's quantized::linear_dynamic does all three inside one kernel. Each step is timed on its
    own (warm-up, then ``reps`` calls, interleaved with the other steps by measure_interleaved);
    "int8 chain" times the three in a row.
    Paper: Jacob et al. 2018 (integer GEMM with float rescaling).
    Used in: 10_measure_one_level_deeper, bench/latency.py.
    """
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
    if x.ndim != 2 or x.shape[1] != layer.in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float (n, {layer.in_features}) tensor, got {tuple(x.shape)} {x.dtype}")
    W = layer.weight.detach().float()
    b = layer.bias.detach().float() if layer.bias is not None else torch.zeros(W.shape[0])
    s_w = W.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,)
    Wq_t = torch.round(W / s_w[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()  # (in, out)
    fused = dynamic_int8(nn.Sequential(layer))[0]

    def quant(x: Tensor) -> tuple[Tensor, Tensor]:
        s_x = x.abs().amax().clamp_min(1e-12) / 127
        return torch.round(x / s_x).clamp(-127, 127).to(torch.int8), s_x

    def dequant(acc: Tensor, s_x: Tensor) -> Tensor:
        return acc.float() * (s_x * s_w) + b

    def chain(x: Tensor) -> Tensor:
        xq, s_x = quant(x)
        return dequant(torch._int_mm(xq, Wq_t), s_x)

    with torch.inference_mode():
        xq, s_x = quant(x)
        acc = torch._int_mm(xq, Wq_t)
        err = float((chain(x) - F.linear(x, W, b)).abs().max())
    steps: dict[str, Callable[[], Any]] = {
        "fp32 F.linear": lambda: F.linear(x, W, b),
        "fbgemm fused int8": lambda: fused(x),
        "int8 chain": lambda: chain(x),
        "quantize activations": lambda: quant(x),
        "int GEMM (_int_mm)": lambda: torch._int_mm(xq, Wq_t),
        "dequantize": lambda: dequant(acc, s_x),
    }
    return LinearParts(measure_interleaved(steps, reps, warmup, threads, rounds=min(5, reps)), err)


# ----------------------------------------------------------------------------- digits CNN
class DigitsCNN(nn.Module):
    """conv(1->16, 3x3) -> ReLU -> conv(16->32, 3x3) -> ReLU -> maxpool 2 -> fc(512->64) -> ReLU -> fc(64->10).

    Takes flat (n, 64) digits, as ``models.load_digits_split`` gives them; QuantStub/DeQuantStub
    mark where torch.ao's static int8 version quantizes the input and dequantizes the logits.
    Used in: 10_measure_one_level_deeper.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.relu3 = nn.Linear(32 * 4 * 4, 64), nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x.reshape(-1, 1, 8, 8))  # (n, 1, 8, 8)
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))  # (n, 32, 4, 4)
        x = self.relu3(self.fc1(x.reshape(x.shape[0], -1)))  # (n, 64)
        return self.dequant(self.fc2(x))


def static_int8(model: DigitsCNN, calib: Tensor) -> nn.Module:
    """torch.ao eager static int8 (fbgemm): fuse conv+ReLU and fc+ReLU, observe ``calib``, convert.

    Weights per-channel int8, activations per-tensor uint8 with ranges from the calibration data.
    Paper: Jacob et al. 2018.
    Used in: 10_measure_one_level_deeper.
    """
    if not isinstance(model, DigitsCNN):
        raise ValueError(f"model must be a DigitsCNN, got {type(model).__name__}")
    tq = torch.ao.quantization
    with quiet():
        m = copy.deepcopy(model).eval()
        m = tq.fuse_modules(m, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]])
        m.qconfig = tq.get_default_qconfig("fbgemm")
        torch.backends.quantized.engine = "fbgemm"
        tq.prepare(m, inplace=True)
        with torch.no_grad():
            m(calib)
        tq.convert(m, inplace=True)
    return m


def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch.ao dynamic int8 (fbgemm): nn.Linear weights int8 ahead of time, activations quantized per call.

    y = dequant(int8 GEMM(quant(x; S_x from min/max of this x), W_q)) + b; convolutions stay float.
    Used in: 10_measure_one_level_deeper.
    """
    with quiet():
        torch.backends.quantized.engine = "fbgemm"
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


TORCHAO_CONFIGS = ("Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig", "Int4WeightOnlyConfig")


def torchao_variant(model: nn.Module, config: str) -> tuple[nn.Module | None, str]:
    """Apply torchao.quantization.quantize_(model copy, <config>()); return (model, "") or (None, error).

    A failure (e.g. Int4WeightOnlyConfig needs a GPU kernel package on CPU) is caught and returned
    as "ExceptionType: message", never raised, so the notebook can show it.
    Used in: 10_measure_one_level_deeper.
    """
    if config not in TORCHAO_CONFIGS:
        raise ValueError(f"config must be one of {TORCHAO_CONFIGS}, got {config!r}")
    with quiet():
        try:
            import torchao.quantization as tao

            m = copy.deepcopy(model).eval()
            tao.quantize_(m, getattr(tao, config)())
            return m, ""
        except Exception as e:  # noqa: BLE001 - shown to the reader, by design
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def cast_variant(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with float parameters in ``dtype`` (fp16 / bf16); inputs must be cast too.

    Used in: 10_measure_one_level_deeper.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return copy.deepcopy(model).eval().to(dtype)


# ----------------------------------------------------------------------------- tiny LM
def stdlib_files() -> list[Path]:
    """The .py files of Python's standard library, sorted by path.

    Found via sysconfig.get_paths()["stdlib"]; site-packages, test suites and idlelib are skipped.
    Used in: 10_measure_one_level_deeper.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & skip))
    if len(files) < 2:
        raise ValueError(f"found fewer than 2 .py files under {root}")
    return files


@dataclass
class Corpus:
    """Byte tokens (ASCII codes) of the stdlib, split by file so no file is in both sets."""

    train: Tensor
    """int64 tokens of the training files, concatenated."""
    heldout: Tensor
    """int64 tokens of the held-out files (every k-th file in path order)."""
    train_files: int
    """Number of training files."""
    heldout_files: int
    """Number of held-out files."""


def load_corpus(max_chars: int = 2_000_000, heldout_every: int = 10) -> Corpus:
    """Tokenize the stdlib source as ASCII codes; every ``heldout_every``-th file (by path) is held out.

    Files are taken in path order until ``max_chars`` characters are collected.
    Used in: 10_measure_one_level_deeper.
    """
    if max_chars < 10_000:
        raise ValueError(f"max_chars must be >= 10000, got {max_chars!r}")
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every!r}")
    tr: list[bytes] = []
    ho: list[bytes] = []
    n = 0
    for i, p in enumerate(stdlib_files()):
        # non-ASCII characters become "?" so the vocabulary is the 128 ASCII codes
        text = p.read_text(encoding="utf-8", errors="replace").encode("ascii", errors="replace")
        (ho if i % heldout_every == heldout_every - 1 else tr).append(text)
        n += len(text)
        if n >= max_chars:
            break
    def tok(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
    return Corpus(tok(tr), tok(ho), len(tr), len(ho))


@dataclass(frozen=True)
class LMConfig:
    """Shape and training budget of the tiny character-level transformer."""

    vocab: int = 128
    """ASCII codes."""
    ctx: int = 128
    """Context length (tokens)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    d_ff: int = 512
    """Hidden width of each MLP."""
    steps: int = 600
    """Adam steps."""
    batch: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (cosine decay to 10% of it)."""
    seed: int = 0
    """Seeds the initialisation and the batch sampling."""


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); causal attention."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.reshape(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Decoder-only transformer: token + position embedding, blocks, final LayerNorm, linear head.

    Paper: Vaswani et al. 2017; GPT-2 layout (pre-norm), Radford et al. 2019.
    Used in: 10_measure_one_level_deeper.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.cfg.ctx:
            raise ValueError(f"sequence length must be <= ctx={self.cfg.ctx}, got {T}")
        x = self.tok(idx) + self.pos(torch.arange(T))  # (B, T, C)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)

    def block_linears(self) -> list[str]:
        """Names of the weight matrices weight-only quantization touches (all block Linears)."""
        return [f"blocks.{i}.{n}" for i in range(self.cfg.n_layers) for n in ("qkv", "proj", "fc1", "fc2")]


def _batch(tokens: Tensor, ctx: int, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(tokens) - ctx - 1, (batch,), generator=g)
    x = torch.stack([tokens[s : s + ctx] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + ctx + 1] for s in starts.tolist()])
    return x, y


def train_lm(model: TinyLM, tokens: Tensor, cfg: LMConfig) -> list[float]:
    """Next-token cross-entropy training with AdamW and a cosine schedule; returns the loss per step.

    Used in: 10_measure_one_level_deeper.
    """
    if len(tokens) < cfg.ctx + 2:
        raise ValueError(f"tokens must have more than ctx + 1 = {cfg.ctx + 1} entries, got {len(tokens)}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1))))
    model.train()
    losses = []
    for _ in progress(range(cfg.steps), desc="training TinyLM"):
        x, y = _batch(tokens, cfg.ctx, cfg.batch, g)
        loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def lm_windows(tokens: Tensor, ctx: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping (input, target) windows of length ctx, in text order.

    The text holds n = (len(tokens) - 1) // ctx windows; with ``max_windows`` < n, that many are
    taken evenly spaced over the whole text (window k = round(k (n - 1) / (max_windows - 1))), so
    a small sample still covers every file instead of only the first one.
    Used in: 10_measure_one_level_deeper.
    """
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise ValueError(f"ctx must be a positive int, got {ctx!r}")
    n = (len(tokens) - 1) // ctx
    if n < 1:
        raise ValueError(f"tokens must have more than ctx = {ctx} entries, got {len(tokens)}")
    x = tokens[: n * ctx].reshape(n, ctx)
    y = tokens[1 : n * ctx + 1].reshape(n, ctx)
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows must be None or a positive int, got {max_windows!r}")
        if max_windows < n:
            idx = torch.linspace(0, n - 1, max_windows).round().long()
            x, y = x[idx], y[idx]
    return x, y


@dataclass
class LMEval:
    """Held-out quality of a language model, two independent ways."""

    perplexity: float
    """exp(mean next-token cross-entropy) over every held-out position."""
    accuracy: float
    """Fraction of positions where argmax p(next | prefix) is the true next character."""
    tokens: int
    """Positions evaluated."""
    window_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Mean cross-entropy (nats) of each window, in window order: for paired comparisons of two models."""
    last_char_correct: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Per window: is the argmax prediction of its *last* character right (the seed report's kind of metric)."""


@torch.no_grad()
def evaluate_lm(model: nn.Module, x: Tensor, y: Tensor, batch: int = 32) -> LMEval:
    """Perplexity = exp(mean CE) and next-token accuracy over all positions of the windows (x, y).

    Also keeps the mean CE of each window and whether each window's last character was predicted.
    Used in: 10_measure_one_level_deeper.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must be equal (n, ctx) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    window_nll, last, correct = [], [], 0
    with quiet():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch]).float()  # (b, T, vocab)
            yy = y[i : i + batch]
            nll = F.cross_entropy(logits.transpose(1, 2), yy, reduction="none")  # (b, T)
            window_nll.append(nll.double().mean(dim=1))
            hit = logits.argmax(-1) == yy
            correct += int(hit.sum())
            last.append(hit[:, -1])
    w = torch.cat(window_nll).numpy()
    return LMEval(math.exp(float(w.mean())), correct / y.numel(), y.numel(), w, torch.cat(last).numpy())


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_flags() -> list[str]:
    """The CPU features (of SIMD_FLAGS) that int8 / bf16 / fp16 kernels can use, from /proc/cpuinfo.

    Empty where /proc/cpuinfo does not exist (macOS, Windows).
    Used in: 10_measure_one_level_deeper.
    """
    info = Path("/proc/cpuinfo")
    words = set(info.read_text().split()) if info.exists() else set()
    return [f for f in SIMD_FLAGS if f in words]
