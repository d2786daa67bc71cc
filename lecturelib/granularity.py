"""PTQ granularity: group quantization, two-level VS-Quant, MX formats, and effective bit width.

Scope: the lecture's "quantization granularity" slides after per-tensor and per-channel
(which live in ``quantizers``). Every scheme here is a *multi-level scaling scheme*

    r = s_l0 * s_l1 * ... * (q - z)          (scale factors from fine to coarse, z = 0 here)

and is described by one ``FormatSpec``: the element type and, for each level, how many
elements share one scale and the scale's storage type. The same description gives the
effective bit width (``effective_bits``), the exact storage (``storage_bits``) and the
simulator that fake-quantizes a weight matrix with it (``quantize_format``).

All simulators take a 2-D weight ``W`` of shape (out_channels, in_features): a row is an
output channel, groups are runs of consecutive elements along a row (the dot-product
dimension, as in GPTQ/AWQ, VS-Quant and MX). Reshape a conv weight to
(C_out, C_in * kH * kW) first. Integer weights are symmetric (Z = 0, S = |r|_max / q_max).

Papers: Dai et al., "VS-Quant: Per-vector Scaled Quantization for Accurate Low-Precision
Neural Network Inference", MLSys 2021. Darvish Rouhani et al., "With Shared Microexponents,
A Little Shifting Goes a Long Way", ISCA 2023 (arXiv:2302.08007). Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019 (BatchNorm folding,
channel ranges that differ by more than 100x).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .quantizers import (
    PerChannel,
    PerGroup,
    PerTensor,
    QParams,
    block_minmax,
    check_bits,
    check_tensor,
    choose_qparams,
    fake_quantize,
    qparams_from_range,
    qrange,
    quantize,
)

Tensor = torch.Tensor

__all__ = [
    "FORMATS",
    "FormatSpec",
    "MXResult",
    "ScaleLevel",
    "VSQuantResult",
    "dtype_bits",
    "effective_bits",
    "effective_bits_expr",
    "fold_batchnorm",
    "fold_batchnorm_sequential",
    "get_format",
    "group_fake_quantize",
    "group_size_explorer",
    "int_format",
    "mx_format",
    "mx_quantize",
    "pareto_front",
    "plot_sweep",
    "quantize_format",
    "quantize_model_weights",
    "storage_bits",
    "sweep_formats",
    "vsquant_format",
    "vsquant_quantize",
]

# ----------------------------------------------------------------------------- data types
_INT_RE = re.compile(r"^(U?INT)(\d+)$")
_FP_RE = re.compile(r"^(FP|BF)(\d+)$")
_SEM_RE = re.compile(r"^(?:S(\d+))?(?:E(\d+))?(?:M(\d+))?$")
_FLOAT_SCALE_TYPES = {"FP32": None, "FP16": torch.float16, "BF16": torch.bfloat16}
DTYPE_GRAMMAR = (
    "INTn / UINTn (n-bit integer), FP16 / FP32 / BF16 (IEEE-style float), or a bit-field name "
    "S<s>E<e>M<m> with each part optional, counting s + e + m bits (S1M2: sign + 2-bit "
    "magnitude; E8M0: 8 exponent bits, no sign, no mantissa; S1E2M1: an FP4 element)"
)


def dtype_bits(name: str) -> int:
    """Bits one value of the storage type ``name`` takes.

    INTn, UINTn -> n;  FP16, BF16 -> 16;  FP32 -> 32;
    S<s>E<e>M<m> -> s + e + m  (S1M2 -> 3, S1M7 -> 8, E8M0 -> 8, E1M0 -> 1, S1E2M1 -> 4).
    A name without "S" has no sign bit: E8M0 is an unsigned power of two, 2^E.
    Source: the lecture's multi-level scaling table; Darvish Rouhani et al. 2023 (MX).
    Used in: 02_granularity.
    """
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string such as 'INT4' or 'E8M0', got {name!r}")
    m = _INT_RE.match(name)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= 32:
            raise ValueError(f"dtype {name!r}: integer width must be 1..32")
        return n
    m = _FP_RE.match(name)
    if m:
        if name not in _FLOAT_SCALE_TYPES:
            raise ValueError(f"dtype {name!r}: float types must be one of {sorted(_FLOAT_SCALE_TYPES)}")
        return int(m.group(2))
    m = _SEM_RE.match(name)
    if m and any(g is not None for g in m.groups()):
        s, e, mant = (int(g) if g is not None else 0 for g in m.groups())
        if s > 1:
            raise ValueError(f"dtype {name!r}: at most one sign bit (S1)")
        if s + e + mant == 0:
            raise ValueError(f"dtype {name!r} has zero bits")
        return s + e + mant
    raise ValueError(f"dtype must be {DTYPE_GRAMMAR}; got {name!r}")


def _sem(name: str) -> tuple[int, int, int] | None:
    """(sign, exponent, mantissa) bits of a bit-field name, or None for INT/FP names."""
    if _INT_RE.match(name) or _FP_RE.match(name):
        return None
    m = _SEM_RE.match(name)
    return tuple(int(g) if g is not None else 0 for g in m.groups()) if m else None  # type: ignore[return-value]


# ----------------------------------------------------------------------------- format description
_SHARED_BY = ("channel", "tensor")


@dataclass(frozen=True)
class ScaleLevel:
    """One level of scale factors: which elements share one scale, and how it is stored."""

    group_size: int | str
    """Elements sharing one scale: an int (consecutive elements along a row), "channel" (a whole
    row, N elements) or "tensor" (the whole matrix)."""
    dtype: str
    """Storage type of one scale: "FP16", "UINT4", "E8M0", ... (see ``dtype_bits``)."""

    def __post_init__(self) -> None:
        g = self.group_size
        if isinstance(g, bool) or not ((isinstance(g, int) and g >= 1) or g in _SHARED_BY):
            raise ValueError(f"group_size must be a positive int, 'channel' or 'tensor', got {g!r}")
        dtype_bits(self.dtype)


@dataclass(frozen=True)
class FormatSpec:
    """A quantized number format: element type plus scale levels, fine to coarse (L0, L1, ...)."""

    name: str
    """Short name shown in tables and plots."""
    element: str
    """Storage type of one quantized element: "INT4", "S1M2", ..."""
    levels: tuple[ScaleLevel, ...]
    """Scale levels from fine (L0) to coarse; their product scales the element."""

    def __post_init__(self) -> None:
        dtype_bits(self.element)
        if not isinstance(self.levels, tuple) or not all(isinstance(lv, ScaleLevel) for lv in self.levels):
            raise ValueError(f"levels must be a tuple of ScaleLevel, got {self.levels!r}")


def _level_size(level: ScaleLevel, channel_size: float | None, tensor_size: float | None) -> float:
    if level.group_size == "channel":
        if channel_size is None:
            raise ValueError("channel_size (N, elements per channel) is needed for a per-channel scale; "
                             "pass math.inf for the slide's N >> group-size limit")
        return channel_size
    if level.group_size == "tensor":
        if tensor_size is None:
            raise ValueError("tensor_size (elements in the tensor) is needed for a per-tensor scale; "
                             "pass math.inf for the large-tensor limit")
        return tensor_size
    return float(level.group_size)


def effective_bits(fmt: FormatSpec, channel_size: float | None = None, tensor_size: float | None = None) -> float:
    """Average bits per element, scales included, read off the format description.

    b_eff = bits(element) + sum over levels l of bits(scale_l) / (elements sharing scale_l)

    e.g. INT4 with an FP16 scale per channel of N elements: 4 + 16/N; VS-Quant:
    4 + 4/16 + 16/N; MX4: 3 + 1/2 + 8/16 = 4. ``channel_size`` is N (math.inf gives the
    N >> 16 limit); ``tensor_size`` the element count for a per-tensor level.
    Source: the lecture's multi-level scaling table; Dai et al. 2021; Darvish Rouhani et al. 2023.
    Used in: 02_granularity.
    """
    for name, v in (("channel_size", channel_size), ("tensor_size", tensor_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1):
            raise ValueError(f"{name} must be a number >= 1 (or math.inf), got {v!r}")
    bits = float(dtype_bits(fmt.element))
    for level in fmt.levels:
        bits += dtype_bits(level.dtype) / _level_size(level, channel_size, tensor_size)
    return bits


def effective_bits_expr(fmt: FormatSpec) -> str:
    """The effective bit width as the slide writes it, e.g. "4 + 4/16 + 16/N" or "3 + 1/2 + 8/16".

    Per-channel levels show N (elements per channel), per-tensor levels "numel".
    Used in: 02_granularity.
    """
    terms = [str(dtype_bits(fmt.element))]
    for level in fmt.levels:
        n = {"channel": "N", "tensor": "numel"}.get(level.group_size, level.group_size)  # type: ignore[arg-type]
        terms.append(f"{dtype_bits(level.dtype)}/{n}")
    return " + ".join(terms)


def _check_matrix(W: Tensor, name: str = "W") -> Tensor:
    check_tensor(W, name)
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float tensor (out_channels, in_features), "
                         f"got shape {tuple(W.shape)} and dtype {W.dtype}")
    return W


def _check_group(group_size: Any, length: int, name: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or length % group_size:
        divisors = [d for d in range(1, length + 1) if length % d == 0]
        raise ValueError(f"{name} must divide the row length {length} (allowed: {divisors}), got {group_size!r}")
    return group_size


def storage_bits(fmt: FormatSpec, shape: tuple[int, int]) -> int:
    """Exact bits to store a (rows, N) matrix in ``fmt``: elements plus every scale of every level.

    bits = rows*N*bits(element) + sum_l (number of scales at level l) * bits(scale_l),
    with rows*N/g scales for a group size g, rows for per-channel, 1 for per-tensor.
    storage_bits / (rows*N) equals effective_bits(fmt, N, rows*N).
    Used in: 02_granularity.
    """
    if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (rows, N) with positive ints, got {shape!r}")
    rows, n = shape
    total = rows * n * dtype_bits(fmt.element)
    for level in fmt.levels:
        if level.group_size == "channel":
            count = rows
        elif level.group_size == "tensor":
            count = 1
        else:
            count = rows * (n // _check_group(level.group_size, n))
        total += count * dtype_bits(level.dtype)
    return total


# ----------------------------------------------------------------------------- named formats
def int_format(num_bits: int, granularity: int | str, scale_dtype: str = "FP16") -> FormatSpec:
    """Symmetric INTn with one ``scale_dtype`` scale per group of ``granularity`` elements.

    granularity: "tensor", "channel" or a group size g.  b_eff = n + 16/g (FP16 scale).
    Used in: 02_granularity.
    """
    check_bits(num_bits)
    label = {"tensor": "per-tensor", "channel": "per-channel"}.get(granularity, f"group {granularity}")  # type: ignore[arg-type]
    return FormatSpec(f"{label} INT{num_bits}", f"INT{num_bits}", (ScaleLevel(granularity, scale_dtype),))


def vsquant_format(num_bits: int = 4, vector_size: int = 16, scale_bits: int = 4,
                   channel_dtype: str = "FP16") -> FormatSpec:
    """VS-Quant: INTn elements, a UINT<scale_bits> scale per vector, a float scale per channel.

    r = gamma * s_q * q;  b_eff = n + scale_bits/vector_size + 16/N  (4 + 4/16 + 16/N on the slide).
    Paper: Dai et al. 2021.
    Used in: 02_granularity.
    """
    check_bits(num_bits)
    check_bits(scale_bits, 1, 16, "scale_bits")
    return FormatSpec(f"VS-Quant INT{num_bits}", f"INT{num_bits}",
                      (ScaleLevel(vector_size, f"UINT{scale_bits}"), ScaleLevel("channel", channel_dtype)))


def mx_format(mantissa_bits: int, subblock: int = 2, block: int = 16, micro_exp_bits: int = 1,
              shared_exp_bits: int = 8, name: str | None = None) -> FormatSpec:
    """An MX format: S1M<m> elements, E<d2>M0 micro-exponent per ``subblock``, E<d1>M0 per ``block``.

    b_eff = (1 + m) + d2/k2 + d1/k1;  MX4 = 3 + 1/2 + 8/16 = 4, MX6 = 6, MX9 = 9.
    micro_exp_bits = 0 drops the second level: block floating point (BFP), b_eff = (1 + m) + d1/k1.
    Paper: Darvish Rouhani et al. 2023, Table 2 (k1 = 16, k2 = 2, d1 = 8, d2 = 1).
    Used in: 02_granularity.
    """
    check_bits(mantissa_bits, 1, 23, "mantissa_bits")
    check_bits(micro_exp_bits, 0, 4, "micro_exp_bits")
    check_bits(shared_exp_bits, 1, 8, "shared_exp_bits")
    shared = ScaleLevel(block, f"E{shared_exp_bits}M0")
    if micro_exp_bits == 0:  # one level: block floating point
        return FormatSpec(name or f"BFP S1M{mantissa_bits}/{block}", f"S1M{mantissa_bits}", (shared,))
    fmt = FormatSpec(name or "MX", f"S1M{mantissa_bits}", (ScaleLevel(subblock, f"E{micro_exp_bits}M0"), shared))
    if name is None:
        fmt = dataclasses.replace(fmt, name=f"MX{round(effective_bits(fmt))}")
    return fmt


FORMATS: dict[str, FormatSpec] = {
    "per_channel_int4": int_format(4, "channel"),
    "vsquant": vsquant_format(4, 16, 4),
    "mx4": mx_format(2),
    "mx6": mx_format(4),
    "mx9": mx_format(7),
}
"""The rows of the lecture's multi-level scaling table. Used in: 02_granularity."""


def get_format(name: str) -> FormatSpec:
    """The named format of the lecture's table ("per_channel_int4", "vsquant", "mx4", "mx6", "mx9").

    Used in: 02_granularity.
    """
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


# ----------------------------------------------------------------------------- simulators
def _round_scale(scale: Tensor, dtype: str) -> Tensor:
    """Round positive scales to their float storage type (FP16: clamped to [2^-24, 65504])."""
    if dtype not in _FLOAT_SCALE_TYPES:
        raise ValueError(f"scale_dtype must be one of {sorted(_FLOAT_SCALE_TYPES)}, got {dtype!r}")
    target = _FLOAT_SCALE_TYPES[dtype]
    if target is None:
        return scale
    info = torch.finfo(target)
    lo = 2.0**-24 if target == torch.float16 else info.tiny  # FP16: its smallest subnormal
    return scale.clamp(min=lo, max=info.max).to(target).float()


def group_fake_quantize(W: Tensor, num_bits: int, group_size: int, scale_dtype: str = "FP32") -> Tensor:
    """Symmetric group quantization of a (rows, N) matrix: one scale per ``group_size`` elements of a row.

    S_g = |r|_max,g / q_max  (rounded to ``scale_dtype``),  W_fq = S_g * clamp(round(W / S_g), q_min, q_max)
    group_size = N is per-channel quantization. The scales come from ``quantizers.choose_qparams``
    with ``PerGroup(axis=1, group_size)``, so the formula lives in one place.
    Paper: the lecture's group-quantization slides; Dai et al. 2021.
    Used in: 02_granularity.
    """
    _check_matrix(W)
    _check_group(group_size, W.shape[1])
    qp = choose_qparams(W, num_bits, symmetric=True, granularity=PerGroup(axis=1, group_size=group_size))
    qp = dataclasses.replace(qp, scale=_round_scale(qp.scale, scale_dtype))
    return fake_quantize(W, qp)


@dataclass(frozen=True)
class VSQuantResult:
    """A VS-Quant reconstruction and its two levels of scales."""

    W_fq: Tensor
    """The fake-quantized matrix: gamma * s_q * q, float32, shape (rows, N)."""
    q: Tensor
    """int32 element codes in q_min..q_max, shape (rows, N)."""
    s_q: Tensor
    """int32 per-vector scale codes in 1..2^M - 1, shape (rows, N / vector_size)."""
    gamma: Tensor
    """float32 per-channel scale (rounded to its storage type), shape (rows, 1)."""


def vsquant_quantize(W: Tensor, num_bits: int = 4, vector_size: int = 16, scale_bits: int = 4,
                     channel_dtype: str = "FP16") -> VSQuantResult:
    """Two-level VS-Quant: an unsigned integer scale per vector, a float scale per channel.

    s_v   = |r|_max,v / q_max                          (the float per-vector scale; 0 for a zero vector)
    gamma = max_v s_v / (2^M - 1)                      (per channel, rounded to channel_dtype)
    s_q   = clamp(round(s_v / gamma), 1, 2^M - 1)      (M-bit unsigned; at least 1, so no vector
                                                        loses its scale)
    q     = clamp(round(W / (gamma s_q)), q_min, q_max),   W_fq = gamma * s_q * q
    Rounding s_v to nearest can make gamma s_q slightly smaller than s_v: the largest element
    of such a vector then saturates at q_max (the rounding choice of the paper's max calibration).
    Paper: Dai et al., "VS-Quant", MLSys 2021, section 3.
    Used in: 02_granularity.
    """
    _check_matrix(W)
    _check_group(vector_size, W.shape[1], "vector_size")
    check_bits(scale_bits, 1, 16, "scale_bits")
    block = PerGroup(axis=1, group_size=vector_size).block_size(tuple(W.shape))
    _, amax = block_minmax(W.detach().float().abs(), block)  # (rows, n / vector_size)
    s_v, zp = qparams_from_range(-amax, amax, num_bits, symmetric=True)
    s_v = torch.where(amax > 0, s_v, torch.zeros_like(s_v))  # an all-zero vector needs no scale
    # gamma from the range [0, max s_v] of the scales, as an unsigned M-bit quantizer (Z = 0)
    s_max = s_v.amax(dim=1, keepdim=True)
    gamma, _ = qparams_from_range(torch.zeros_like(s_max), s_max, scale_bits, symmetric=False, signed=False)
    gamma = _round_scale(gamma, channel_dtype)
    s_q = torch.clamp(torch.round(s_v / gamma), 1, 2**scale_bits - 1)
    qmin, qmax = qrange(num_bits)
    qp = QParams((gamma * s_q).float(), zp, qmin, qmax, block, tuple(W.shape))
    return VSQuantResult(fake_quantize(W, qp), quantize(W, qp), s_q.to(torch.int32), gamma)


@dataclass(frozen=True)
class MXResult:
    """An MX reconstruction with its shared exponents, micro-exponents and element codes."""

    W_fq: Tensor
    """Reconstruction: code * 2^(E - tau - (m - 1)), float32, shape (rows, N)."""
    code: Tensor
    """int32 signed element codes, sign-magnitude in -(2^m - 1)..2^m - 1, shape (rows, N)."""
    shared_exp: Tensor
    """int32 E per block of k1 elements, shape (rows, N / k1)."""
    micro_exp: Tensor
    """int32 tau per subblock of k2 elements (the shift 2^-tau), shape (rows, N / k2)."""
    mantissa_bits: int
    """m, the element's magnitude bits."""


def _floor_log2(x: Tensor) -> Tensor:
    """floor(log2 |x|) exactly (from the float's exponent field); a very negative number for 0."""
    _, e = torch.frexp(x.abs())  # |x| = f * 2^e with f in [0.5, 1)
    return torch.where(x != 0, e.to(torch.int64) - 1, torch.full_like(e, -(2**20), dtype=torch.int64))


def mx_quantize(W: Tensor, fmt: FormatSpec | str = "mx6") -> MXResult:
    """Fake-quantize a (rows, N) matrix to an MX format (shared exponent + shared micro-exponents).

    For each block of k1 elements along a row (E<d1>M0 scale) and each subblock of k2 (E<d2>M0):
      e_i  = floor(log2 |x_i|)                         (exponent of each element)
      E    = clamp(max_block e_i, -(2^(d1-1) - 1), 2^(d1-1) - 1)    (E8M0: -127..127)
      tau  = clamp(E - max_subblock e_i, 0, 2^d2 - 1)  (micro-exponent: shift the pair down)
      step = 2^(E - tau - (m - 1))
      code = clamp(round(x / step), -(2^m - 1), 2^m - 1),   x_fq = code * step
    The element S1M<m> is a sign and an m-bit magnitude with no hidden bit: |x_fq| < 2^(E - tau + 1).
    Rounding is to nearest, ties to even (exact: step is a power of two). A magnitude that rounds
    up to 2^m saturates at 2^m - 1 (only an element with exponent E - tau, the top binade of its
    subblock, can; its error is then below one step instead of half a step); an all-zero block
    stores E = -127 and zeros. Blocks never straddle rows: N must be a multiple of k1.
    Paper: Darvish Rouhani et al., "With Shared Microexponents, A Little Shifting Goes a Long Way",
    ISCA 2023 (MX9/MX6/MX4: m = 7/4/2, k1 = 16, d1 = 8, k2 = 2, d2 = 1).
    Used in: 02_granularity.
    """
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    m, (k2, d2), (k1, d1) = _mx_params(fmt)
    _check_matrix(W)
    rows, n = W.shape
    _check_group(k1, n, "the MX block size k1")
    x = W.detach().float()
    e = _floor_log2(x)
    bias = 2 ** (d1 - 1) - 1
    E = e.view(rows, n // k1, k1).amax(dim=2).clamp(-bias, bias)  # (rows, n/k1)
    e_sub = e.view(rows, n // k2, k2).amax(dim=2)  # (rows, n/k2)
    E_sub = E.repeat_interleave(k1 // k2, dim=1)
    tau = (E_sub - e_sub).clamp(0, 2**d2 - 1)
    step_exp = (E_sub - tau - (m - 1)).repeat_interleave(k2, dim=1)  # (rows, n)
    step = torch.pow(2.0, step_exp.double())
    cmax = 2**m - 1
    code = torch.clamp(torch.round(x.double() / step), -cmax, cmax)
    W_fq = (code * step).float() + 0.0  # + 0.0 turns -0.0 into 0.0
    return MXResult(W_fq, code.to(torch.int32), E.to(torch.int32), tau.to(torch.int32), m)


def _mx_params(fmt: FormatSpec) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(m, (k2, d2), (k1, d1)) of an MX format, or ValueError if ``fmt`` is not one."""
    sem = _sem(fmt.element)
    ok = sem is not None and sem[0] == 1 and sem[1] == 0 and sem[2] >= 1 and len(fmt.levels) in (1, 2)
    if ok and len(fmt.levels) == 1:  # block floating point: no micro-exponent (k2 = k1, d2 = 0)
        l1 = fmt.levels[0]
        s1 = _sem(l1.dtype)
        if isinstance(l1.group_size, int) and s1 is not None and s1[0] == 0 and s1[2] == 0 and s1[1] >= 1:
            return sem[2], (l1.group_size, 0), (l1.group_size, s1[1])  # type: ignore[index]
        ok = False
    if ok:
        (l0, l1) = fmt.levels
        s0, s1 = _sem(l0.dtype), _sem(l1.dtype)
        ok = (isinstance(l0.group_size, int) and isinstance(l1.group_size, int)
              and s0 is not None and s1 is not None and s0[0] == 0 and s0[2] == 0 and s1[0] == 0 and s1[2] == 0
              and s0[1] >= 1 and s1[1] >= 1 and l1.group_size % l0.group_size == 0)
    if not ok:
        raise ValueError(f"an MX format needs an S1M<m> element and levels (k2, E<d2>M0), (k1, E<d1>M0) "
                         f"with k2 dividing k1 (or only (k1, E<d1>M0): block floating point); got {fmt!r}")
    return sem[2], (fmt.levels[0].group_size, s0[1]), (fmt.levels[1].group_size, s1[1])  # type: ignore[index,return-value]


def quantize_format(W: Tensor, fmt: FormatSpec | str) -> Tensor:
    """Fake-quantize a (rows, N) weight matrix with the simulator that the format description names.

    INTn + one float level "tensor" / "channel" / g  -> per-tensor / per-channel / group quantization
    INTn + (g, UINTm) + ("channel", float)            -> VS-Quant (``vsquant_quantize``)
    S1Mm + (k2, E<d2>M0) + (k1, E<d1>M0)              -> MX (``mx_quantize``)
    S1Mm + (k1, E<d1>M0)                              -> block floating point (``mx_quantize``, tau = 0)
    Float scales are rounded to their storage type (FP16 to nearest); integer weights are symmetric.
    Used in: 02_granularity.
    """
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    if not isinstance(fmt, FormatSpec):
        raise ValueError(f"fmt must be a FormatSpec or one of {sorted(FORMATS)}, got {fmt!r}")
    _check_matrix(W)
    el = _INT_RE.match(fmt.element)
    if el and el.group(1) == "INT":
        num_bits = int(el.group(2))
        lv = fmt.levels
        if len(lv) == 1 and lv[0].dtype in _FLOAT_SCALE_TYPES:
            g = lv[0].group_size
            if g == "tensor":
                qp = choose_qparams(W, num_bits, symmetric=True, granularity=PerTensor())
            elif g == "channel":
                qp = choose_qparams(W, num_bits, symmetric=True, granularity=PerChannel(0))
            else:
                return group_fake_quantize(W, num_bits, g, lv[0].dtype)  # type: ignore[arg-type]
            return fake_quantize(W, dataclasses.replace(qp, scale=_round_scale(qp.scale, lv[0].dtype)))
        if (len(lv) == 2 and isinstance(lv[0].group_size, int) and lv[1].group_size == "channel"
                and lv[1].dtype in _FLOAT_SCALE_TYPES):
            sc = _INT_RE.match(lv[0].dtype)
            if sc and sc.group(1) == "UINT":
                return vsquant_quantize(W, num_bits, lv[0].group_size, int(sc.group(2)), lv[1].dtype).W_fq
    elif _sem(fmt.element) is not None:
        return mx_quantize(W, fmt).W_fq
    raise ValueError(f"no simulator for format {fmt.name!r} (element {fmt.element}, levels {fmt.levels}); "
                     "supported: INTn with one float scale level (tensor, channel or a group size), "
                     "VS-Quant (INTn, UINTm per vector, float per channel), MX (S1Mm, E1M0, E8M0)")


# ----------------------------------------------------------------------------- models
def fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """A new Linear equal to BatchNorm(Linear(x)) in eval mode (running statistics).

    W' = diag(gamma / sqrt(var + eps)) W,   b' = gamma (b - mu) / sqrt(var + eps) + beta
    Folding multiplies row i of W by gamma_i / sigma_i: channels with very different gammas end
    up with very different ranges, the outlier problem of per-tensor quantization.
    Paper: Jacob et al. 2018, section 3.2; Nagel et al. 2019 (ranges differing > 100x).
    Used in: 02_granularity.
    """
    if not isinstance(linear, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
        raise ValueError(f"expected (nn.Linear, nn.BatchNorm1d), got ({type(linear).__name__}, {type(bn).__name__})")
    if bn.num_features != linear.out_features or bn.running_mean is None:
        raise ValueError(f"bn must track running stats of {linear.out_features} features, got {bn}")
    with torch.no_grad():
        gamma = bn.weight if bn.affine else torch.ones(bn.num_features)
        beta = bn.bias if bn.affine else torch.zeros(bn.num_features)
        a = gamma / torch.sqrt(bn.running_var + bn.eps)
        b = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        # skip_init: no random initialisation, so folding leaves the global RNG untouched
        out = nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features)
        out.weight.copy_(linear.weight * a[:, None])
        out.bias.copy_(a * (b - bn.running_mean) + beta)
    return out.eval()


def fold_batchnorm_sequential(model: nn.Sequential) -> nn.Sequential:
    """Copy of ``model`` with every (Linear, BatchNorm1d) pair folded into one Linear.

    Used in: 02_granularity.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential, got {type(model).__name__}")
    layers, mods, i = [], list(model), 0
    while i < len(mods):
        if isinstance(mods[i], nn.Linear) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm1d):
            layers.append(fold_batchnorm(mods[i], mods[i + 1]))
            i += 2
        else:
            layers.append(copy.deepcopy(mods[i]))
            i += 1
    return nn.Sequential(*layers).eval()


def quantize_model_weights(model: nn.Module, fmt: FormatSpec | str,
                           layers: list[int] | None = None) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` whose Linear weights are fake-quantized with ``fmt`` (biases stay float).

    Returns (model_q, stats) with stats = {"rel_error": ||W - W_fq||_F / ||W||_F over all quantized
    weights together, "effective_bits": total storage_bits / total weights}. ``layers`` picks
    Linear layers by their index among the Linear layers (default: all). ``model`` is not changed.
    Used in: 02_granularity.
    """
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    model_q = copy.deepcopy(model).eval()
    linears = [m for m in model_q.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear layer to quantize")
    chosen = range(len(linears)) if layers is None else layers
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(linears):
            raise ValueError(f"layers must be indices in 0..{len(linears) - 1}, got {layers!r}")
    err2 = ref2 = bits = count = 0.0
    with torch.no_grad():
        for i in chosen:
            W = linears[i].weight
            W_fq = quantize_format(W.detach(), fmt)
            err2 += float(((W - W_fq).double() ** 2).sum())
            ref2 += float((W.double() ** 2).sum())
            bits += storage_bits(fmt, tuple(W.shape))
            count += W.numel()
            W.copy_(W_fq)
    return model_q, {"rel_error": math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, "effective_bits": bits / count}


@torch.no_grad()
def sweep_formats(model: nn.Module, formats: list[FormatSpec], X: Tensor, y: Tensor,
                  layers: list[int] | None = None) -> list[dict[str, Any]]:
    """Quantize the weights of ``model`` with each format; one row per format.

    Row: {"scheme": fmt.name, "effective_bits": bits per weight (scales included),
          "rel_error": ||W - W_fq||_F / ||W||_F, "accuracy": top-1 of the quantized model on (X, y)}.
    Used in: 02_granularity.
    """
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    rows = []
    for fmt in formats:
        model_q, stats = quantize_model_weights(model, fmt, layers)
        acc = float((model_q(X).argmax(dim=1) == y).float().mean())
        rows.append({"scheme": fmt.name, "effective_bits": stats["effective_bits"],
                     "rel_error": stats["rel_error"], "accuracy": acc})
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) that no other point beats in both (lower is better).

    i is on the front unless some j has cost_j <= cost_i and error_j <= error_i, one of them strictly.
    Returned sorted by cost. Used in: 02_granularity.
    """
    front = []
    for i, (c, e) in enumerate(points):
        dominated = any((c2 <= c and e2 <= e) and (c2 < c or e2 < e) for j, (c2, e2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


# ----------------------------------------------------------------------------- figures and widgets
def _family(scheme: str) -> str:
    for key in ("per-tensor", "per-channel", "group", "VS-Quant", "MX", "BFP"):
        if scheme.startswith(key):
            return key
    return "other"


_STYLE = {"per-tensor": ("tab:red", "v"), "per-channel": ("tab:blue", "o"), "group": ("tab:green", "s"),
          "VS-Quant": ("tab:purple", "D"), "MX": ("tab:orange", "*"), "BFP": ("tab:brown", "P"),
          "other": ("0.4", "x")}


def plot_sweep(rows: list[dict[str, Any]], float_accuracy: float | None = None) -> Any:
    """Two panels: relative error vs effective bits (log scale, Pareto front dashed) and accuracy vs bits.

    ``rows`` are ``sweep_formats`` rows; colours and markers tell the scheme families apart.

    Used in: 02_granularity.
    """
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows must hold at least one sweep row")
    fig, (ax_e, ax_a) = plt.subplots(1, 2, figsize=(12, 4.2))
    seen = set()
    for r in rows:
        fam = _family(r["scheme"])
        color, marker = _STYLE[fam]
        label = None if fam in seen else fam
        seen.add(fam)
        for ax, key in ((ax_e, "rel_error"), (ax_a, "accuracy")):
            ax.scatter(r["effective_bits"], r[key], color=color, marker=marker, s=50 if marker == "*" else 28,
                       label=label, zorder=3)
    front = pareto_front([(r["effective_bits"], r["rel_error"]) for r in rows])
    ax_e.plot([rows[i]["effective_bits"] for i in front], [rows[i]["rel_error"] for i in front],
              "k--", lw=1, label="Pareto front", zorder=2)
    for r in rows:  # name the few multi-level points; the integer families are told apart by colour
        if _family(r["scheme"]) in ("VS-Quant", "MX", "BFP"):
            ax_e.annotate(r["scheme"], (r["effective_bits"], r["rel_error"]), fontsize=7,
                          xytext=(-6, -11), textcoords="offset points", ha="right")
    ax_e.set_yscale("log")
    ax_e.set_xlabel("effective bits per weight (scales included)")
    ax_e.set_ylabel("relative error ||W - W_q||_F / ||W||_F")
    ax_e.legend(fontsize=8)
    ax_e.grid(alpha=0.3)
    if float_accuracy is not None:
        ax_a.axhline(float_accuracy, color="k", ls="--", lw=1, label="float32")
    ax_a.set_xlabel("effective bits per weight (scales included)")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title("accuracy against effective bits", fontsize=10)
    ax_e.set_title("weight error against effective bits", fontsize=10)
    ax_a.legend(fontsize=8)
    ax_a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def group_size_explorer(W: Tensor, num_bits: int = 4, scale_dtype: str = "FP16") -> Any:
    """An ipywidgets explorer: a group-size slider (and a bit-width slider) over one weight matrix.

    Shows, for the chosen group size g and bits n, the relative error ||W - W_q||_F / ||W||_F and
    the effective bits n + 16/g, next to the whole error-vs-bits curve for that n.
    Used in: 02_granularity.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .explorers import explorer, int_slider

    _check_matrix(W)
    n = W.shape[1]
    sizes = [d for d in range(1, n + 1) if n % d == 0]
    ref = float(W.norm())

    def point(g: int, bits: int) -> tuple[float, float]:
        fmt = int_format(bits, g, scale_dtype)
        return effective_bits(fmt, n, W.numel()), float((W - quantize_format(W, fmt)).norm()) / ref

    def draw(group_size: int, num_bits: int) -> None:
        curve = [point(g, num_bits) for g in sizes]
        bx, ex = point(group_size, num_bits)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", color="tab:green", ms=3)
        ax.scatter([bx], [ex], s=90, color="tab:red", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel("relative error ‖W − W_q‖_F / ‖W‖_F")
        ax.set_title(f"group size {group_size}, INT{num_bits}: "
                     f"{bx:.3f} bits/weight, relative error {ex:.4f}", fontsize=9)

    return explorer(
        draw,
        title="Group size: more scales, fewer errors, more bits",
        group_size=widgets.SelectionSlider(options=sizes, value=min(16, n) if 16 in sizes else sizes[-1],
                                           description="group size", continuous_update=False),
        num_bits=int_slider(num_bits, 2, 8, description="num_bits"),
    )
