"""Integer-only inference: fixed-point requantization and int8 linear / conv2d layers.

Scope: the integer-arithmetic-only layer of the paper, checked bit for bit against PyTorch's
fbgemm kernels (``torch.ops.quantized.linear`` / ``conv2d``). Weights are symmetric int8
(Z_W = 0, per tensor or per output channel), activations uint8, bias Z_b = 0, S_b = S_W S_X:

    acc    = sum_k q_W[o, k] q_X[k]                   int8 x uint8 products, int32 sum
    q_bias = q_b - Z_X sum_k q_W[o, k]                int32, one per output channel o
    q_Y    = clamp(Z_Y + M (acc + q_bias), qmin, qmax),   M = S_W S_X / S_Y = M0 2^-n

The last line is computed with integers only (int64 tensors), with one of two roundings:
- rounding="gemmlowp": gemmlowp / TFLite fixed point, M0 in [2^30, 2^31) and
  SaturatingRoundingDoublingHighMul then RoundingDivideByPOT (each rounds half away from 0).
- rounding="fbgemm": what fbgemm does on x86 (ReQuantizeOutput, OutputProcessing-inl.h and
  requantizeOutputProcessingAvx2, QuantUtilsAvx2.cc), which is float32 arithmetic:
      q_Y = Z_Y + rint(fl(fl(fl(acc + q_bias) + fl(b / fl(S_X S_W))) * C))
  with q_b = 0, C = fl(fl(S_X S_W) / S_Y), fl = round to float32, rint = half to even (one
  S_W: the bias term is fl(b * fl(1 / fl(S_X S_W))) instead; see ``quantize_bias``).
  fbgemm never makes an int32 q_b: b / (S_X S_W) stays a float32 with a fraction. We carry it
  exactly as an integer in units of 2^-30, rounded to odd (a sticky bit), and do each fl() as a
  round to 24 significant bits with shifts. C is a float32, so M0 = its mantissa << 7 and
  M0 2^-n == C exactly (as QNNPACK does).
Parameters (M0, n, q_b) are chosen offline with floats; the per-input path is integer-only.
Measured (tests/test_intops.py): rounding="fbgemm" matches fbgemm on every output code;
rounding="gemmlowp" differs on ~0.1-0.2 % of codes, by one code (mostly its two-step rounding).

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (sec. 2.2-2.4). Lecture: integer-only inference.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lecturelib.quantizers import (
    PerChannel, check_tensor, choose_qparams, qparams_with_range, qrange, quantize,
)

Tensor = torch.Tensor
ROUNDINGS = ("gemmlowp", "fbgemm")
BIAS_FRAC_BITS = 30
"""fbgemm rounding: the float32 bias b / (S_X S_W) is carried as an integer in units of 2^-30."""
X_RANGE, W_RANGE = qrange(8, signed=False), qrange(8, signed=True)


# ----------------------------------------------------------------------------- checks
def _check_codes(q: Tensor, name: str, qmin: int, qmax: int) -> Tensor:
    if isinstance(q, Tensor) and (q.is_quantized or q.is_floating_point() or q.is_complex()
                                  or q.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer codes (e.g. torch.int32), got dtype {q.dtype}")
    check_tensor(q, name)
    lo, hi = int(q.min()), int(q.max())
    if lo < qmin or hi > qmax:
        raise ValueError(f"{name} must lie in {qmin}..{qmax}, got values in {lo}..{hi}")
    return q.to(torch.int64)


def _check_int(v: int, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _check_scale(s, name: str, channels: int = 1) -> Tensor:
    t = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
    if t.numel() not in {1, channels} or not bool((torch.isfinite(t) & (t > 0)).all()):
        n = "1" if channels == 1 else f"1 or {channels}"
        raise ValueError(f"{name} must be {n} finite value(s) > 0, got {s!r}")
    return t


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


# ----------------------------------------------------------------------------- fixed point
def quantize_multiplier(M: float) -> tuple[int, int]:
    """Fixed-point form of a real multiplier:  M ~= M0 * 2^-n,  M0 an int32 in [2^30, 2^31).

    M = f * 2^e with f in [0.5, 1) (frexp);  M0 = round(f * 2^31) (half away from 0),  n = 31 - e.
    Allowed: finite 2^-32 <= M < 1 (so n is in 31..62 and acc * M0 fits int64); M may not
    round up to 1. A float32 M (24-bit mantissa) is represented exactly: M0 * 2^-n == M.
    Paper: Jacob et al. 2018, sec. 2.2 (eq. 5-6); gemmlowp QuantizeMultiplierSmallerThanOne.
    Used in: 01_linear_quantization
    """
    M = float(M)
    if not math.isfinite(M) or not 2.0**-32 <= M < 1.0:
        raise ValueError(f"M must be a finite float in [2^-32, 1), got {M!r}")
    f, e = math.frexp(M)
    M0 = math.floor(f * 2**31 + 0.5)
    if M0 == 2**31:
        M0, e = 2**30, e + 1
    if e > 0:
        raise ValueError(f"M must be in [2^-32, 1) and not round up to 1 in 31 bits, got {M!r}")
    return M0, 31 - e


def _bit_length(a: Tensor) -> Tensor:
    """Bits needed for |a| (0 for 0), by a binary search with shifts."""
    a, length = a.abs(), torch.zeros_like(a)
    for s in (32, 16, 8, 4, 2, 1):
        big = (a >> s) > 0
        a, length = torch.where(big, a >> s, a), length + big * s
    return length + (a > 0)


def _shift_round(x: Tensor, k: Tensor) -> Tensor:
    """round(x / 2^k) with ties to even, for int64 x and shifts k >= 0 (clamped to 62)."""
    k = k.clamp(0, 62)
    half_minus_1 = torch.where(k > 0, (torch.ones_like(k) << (k - 1).clamp(min=0)) - 1, 0)
    return (x + half_minus_1 + ((x >> k) & 1) * (k > 0)) >> k


def _to_float32(x: Tensor) -> tuple[Tensor, Tensor]:
    """x ~= m * 2^k with m rounded to 24 significant bits, ties to even: float32 rounding."""
    k = (_bit_length(x) - 24).clamp(min=0)
    return _shift_round(x, k), k


def requantize(acc: Tensor, M0, n, zero_point: int, qmin: int, qmax: int,
               rounding: str = "gemmlowp", bias_q30: Tensor | None = None) -> Tensor:
    """Integer-only rescale of an int32 accumulator (acc + q_bias) to output codes.

    gemmlowp: q = clamp(Z + RDPOT(SRDHM(acc, M0), n - 31), qmin, qmax)
              SRDHM(a, M0) = round(a M0 / 2^31), RDPOT(x, s) = round(x / 2^s), half away from 0
    fbgemm:   q = clamp(Z + rint(fl(fl(fl(acc) + bias_q30 2^-30) * M0 2^-n)), qmin, qmax)
              fl = round to 24 significant bits (float32), rint = half to even; shifts only.
    M0, n: ints or int64 tensors broadcasting against acc (per channel: shape (C_out,), last dim).
    bias_q30 (fbgemm only): fbgemm's float bias from ``quantize_bias(..., rounding="fbgemm")``.
    Paper: Jacob et al. 2018, sec. 2.2; gemmlowp fixedpoint.h; fbgemm QuantUtilsAvx2.cc.
    Used in: 01_linear_quantization
    """
    _check_rounding(rounding)
    acc = _check_codes(acc, "acc", -(2**31), 2**31 - 1)
    M0, n = torch.as_tensor(M0, dtype=torch.int64), torch.as_tensor(n, dtype=torch.int64)
    if M0.numel() == 0 or int(M0.min()) < 2**30 or int(M0.max()) >= 2**31:
        raise ValueError(f"M0 must lie in 2^30..2^31-1 (see quantize_multiplier), got {M0}")
    if n.numel() == 0 or int(n.min()) < 31 or int(n.max()) > 62:
        raise ValueError(f"n must lie in 31..62 (see quantize_multiplier), got {n}")
    _check_int(qmin, "qmin", -(2**31), 2**31 - 1)
    _check_int(qmax, "qmax", qmin + 1, 2**31 - 1)
    _check_int(zero_point, "zero_point", qmin, qmax)
    if rounding == "gemmlowp":
        if bias_q30 is not None:
            raise ValueError("bias_q30 is for rounding='fbgemm'; with gemmlowp add q_b to acc")
        ab = acc * M0
        nudge = torch.where(ab >= 0, 2**30, 1 - 2**30)
        x = torch.div(ab + nudge, 2**31, rounding_mode="trunc")  # SRDHM
        e = n - 31
        mask = (torch.ones_like(e) << e) - 1
        y = (x >> e) + ((x & mask) > (mask >> 1) + (x < 0))  # RDPOT
    else:
        bias = torch.zeros((), dtype=torch.int64) if bias_q30 is None else bias_q30
        bias = _check_codes(bias, "bias_q30", -(2**61), 2**61)
        raw_m, raw_k = _to_float32(acc)  # fl(acc)
        s_m, s_k = _to_float32((raw_m << (raw_k + BIAS_FRAC_BITS)) + bias)  # fl(raw + bias)
        p_m, p_k = _to_float32(s_m * M0)  # fl(s * C)
        sh = BIAS_FRAC_BITS + n - s_k - p_k  # y = p_m 2^-sh; sh < 0 only when |y| >= 2^23
        y = torch.where(sh >= 0, _shift_round(p_m, sh), p_m << (-sh).clamp(0, 9))  # rint
    return torch.clamp(y + zero_point, qmin, qmax)


def quantize_bias(bias: Tensor, scale_x: float, scale_w, rounding: str = "gemmlowp") -> Tensor:
    """Bias in accumulator units, S_b = S_X S_W and Z_b = 0 (int64 tensor, one per channel).

    gemmlowp: q_b = round(b / (S_X S_W))                      (int32 range, half to even)
    fbgemm:   q_b = round_to_odd(fl(b / fl(S_X S_W)) 2^30)     (fbgemm's float32 bias, Q.30)
              with one S_W it is fl(b * fl(1 / fl(S_X S_W))), as fbgemm's AVX2 kernel does.
    Round to odd keeps a sticky bit, so the later round to float32 in ``requantize`` is exact.
    Paper: Jacob et al. 2018, sec. 2.4 (eq. 11); fbgemm requantizeOutputProcessingAvx2.
    Used in: 01_linear_quantization
    """
    _check_rounding(rounding)
    check_tensor(bias, "bias")
    if not bias.is_floating_point() or bias.ndim != 1:
        raise ValueError(f"bias must be a 1-D float tensor, got {bias.dtype} {tuple(bias.shape)}")
    s_x, s_w = _check_scale(scale_x, "scale_x"), _check_scale(scale_w, "scale_w", len(bias))
    if rounding == "gemmlowp":
        q_b = torch.round(bias.double() / (s_x * s_w))
    else:
        atw = s_x.float() * s_w.float()
        if s_w.numel() == 1:
            q_b = bias.float() * (1.0 / atw.double()).float()
        else:
            q_b = bias.float() / atw
        q_b = q_b.double() * 2.0**BIAS_FRAC_BITS
    if not bool((q_b.abs() < 2.0 ** (31 + (rounding == "fbgemm") * BIAS_FRAC_BITS)).all()):
        raise ValueError("bias / (scale_x * scale_w) must be below 2^31 in magnitude (int32)")
    q_int = torch.floor(q_b).to(torch.int64)
    return q_int | (q_b != q_int.double()) if rounding == "fbgemm" else q_int


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class IntLayerTrace:
    """The integer pieces of one integer-only layer, to show it step by step."""

    acc: Tensor
    """int64, sum_k q_W q_X; (..., C_out) for linear, (N, C_out, H, W) for conv."""
    q_bias: Tensor
    """int64 (C_out,): q_b - Z_X sum q_W (fbgemm rounding: -Z_X sum q_W, q_b is in bias_q30)."""
    bias_q30: Tensor | None
    """fbgemm rounding only: int64 (C_out,), fbgemm's float bias in units of 2^-30."""
    M0: Tensor
    """int64 (C_out,) or (1,): fixed-point multiplier, M = M0 2^-n."""
    n: Tensor
    """int64, same shape as M0: the shift."""
    q_y: Tensor
    """int64 output codes, same shape as acc."""


def _int_layer(acc, w_sum, zp_x, scale_x, scale_w, bias, scale_y, zp_y, qmin_y, qmax_y,
               rounding) -> IntLayerTrace:
    """Shared tail of both layers; acc is channel-last (..., C_out)."""
    _check_rounding(rounding)
    c_out = len(w_sum)
    s_x, s_w = _check_scale(scale_x, "scale_x"), _check_scale(scale_w, "scale_w", c_out)
    s_y = _check_scale(scale_y, "scale_y")
    _check_int(zp_x, "zp_x", *X_RANGE)
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (c_out,)):
        raise ValueError(f"bias must be None or a float tensor of shape ({c_out},), got {bias!r}")
    if rounding == "gemmlowp":
        M = (s_x * s_w / s_y).tolist()
    else:  # fbgemm: float32 products, as PyTorch's qlinear.cpp / qconv.cpp build C_multiplier
        M = ((s_x.float() * s_w.float()) / s_y.float()).tolist()
    if not all(2.0**-32 <= m < 1.0 for m in M):
        raise ValueError(f"M = scale_x * scale_w / scale_y must be in [2^-32, 1), got {M}")
    M0, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*map(quantize_multiplier, M)))
    q_bias, bias_q30 = -zp_x * w_sum, None
    if bias is not None and rounding == "gemmlowp":
        q_bias = q_bias + quantize_bias(bias, scale_x, scale_w, rounding)
    elif bias is not None:
        bias_q30 = quantize_bias(bias, scale_x, scale_w, rounding)
    q_y = requantize(acc + q_bias, M0, n, zp_y, qmin_y, qmax_y, rounding, bias_q30)
    return IntLayerTrace(acc, q_bias, bias_q30, M0, n, q_y)


def int_linear_trace(q_x: Tensor, zp_x: int, scale_x: float, q_w: Tensor, scale_w,
                     bias: Tensor | None, scale_y: float, zp_y: int, qmin_y: int = 0,
                     qmax_y: int = 255, rounding: str = "gemmlowp") -> IntLayerTrace:
    """Integer-only fully-connected layer, returning every integer piece.

    acc = q_X q_W^T;  q_bias = q_b - Z_X sum_k q_W[:, k];  q_Y = requantize(acc + q_bias, M0, n)
    q_x: (..., K) uint8 codes; q_w: (C_out, K) int8 codes; scale_w: 1 or C_out scales (Z_W = 0);
    bias: float (C_out,) or None, quantized with ``quantize_bias``.
    Paper: Jacob et al. 2018, sec. 2.3-2.4 (eq. 7-9).
    Used in: 01_linear_quantization
    """
    q_x, q_w = _check_codes(q_x, "q_x", *X_RANGE), _check_codes(q_w, "q_w", *W_RANGE)
    if q_x.ndim < 1 or q_w.ndim != 2 or q_x.shape[-1] != q_w.shape[1]:
        raise ValueError(f"q_x (..., in_features) and q_w (C_out, in_features) must agree, "
                         f"got {tuple(q_x.shape)} and {tuple(q_w.shape)}")
    acc = q_x @ q_w.T  # (..., C_out)
    return _int_layer(acc, q_w.sum(1), zp_x, scale_x, scale_w, bias, scale_y, zp_y, qmin_y,
                      qmax_y, rounding)


def int_linear(q_x: Tensor, zp_x: int, scale_x: float, q_w: Tensor, scale_w,
               bias: Tensor | None, scale_y: float, zp_y: int, qmin_y: int = 0,
               qmax_y: int = 255, rounding: str = "gemmlowp") -> Tensor:
    """Integer-only linear layer: the output codes of ``int_linear_trace`` (int64, (..., C_out)).

    q_Y = clamp(Z_Y + M0 2^-n (q_X q_W^T + q_b - Z_X sum_k q_W[:, k]), qmin_y, qmax_y)
    Paper: Jacob et al. 2018, eq. 7-9.
    Used in: 01_linear_quantization
    """
    return int_linear_trace(q_x, zp_x, scale_x, q_w, scale_w, bias, scale_y, zp_y, qmin_y,
                            qmax_y, rounding).q_y


def int_conv2d_trace(q_x: Tensor, zp_x: int, scale_x: float, q_w: Tensor, scale_w,
                     bias: Tensor | None, scale_y: float, zp_y: int, stride: int = 1,
                     padding: int = 0, qmin_y: int = 0, qmax_y: int = 255,
                     rounding: str = "gemmlowp") -> IntLayerTrace:
    """Integer-only 2-D convolution (NCHW, groups=1, dilation 1) by integer im2col.

    acc[n, o, i, j] = sum_{c,u,v} q_W[o, c, u, v] q_Xpad[n, c, s i + u, s j + v]   (int64 matmul)
    q_bias[o] = q_b[o] - Z_X sum_{c,u,v} q_W[o, c, u, v];  q_Y = requantize(acc + q_bias, M0, n)
    Padding uses the code Z_X (real 0), as fbgemm's im2col does, so the zero-point correction is
    the same Z_X sum q_W at every output position, borders included.
    Paper: Jacob et al. 2018, sec. 2.3-2.4.
    Used in: 01_linear_quantization
    """
    q_x, q_w = _check_codes(q_x, "q_x", *X_RANGE), _check_codes(q_w, "q_w", *W_RANGE)
    if q_x.ndim != 4 or q_w.ndim != 4 or q_x.shape[1] != q_w.shape[1]:
        raise ValueError(f"q_x must be (N, C, H, W) and q_w (C_out, C, kH, kW) with the same C, "
                         f"got {tuple(q_x.shape)} and {tuple(q_w.shape)}")
    _check_int(stride, "stride", 1, 64)
    _check_int(padding, "padding", 0, 64)
    _check_int(zp_x, "zp_x", *X_RANGE)
    x = F.pad(q_x, (padding,) * 4, value=zp_x)  # (N, C, H + 2p, W + 2p)
    c_out, c, kh, kw = q_w.shape
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"kernel {kh}x{kw} is larger than the padded input {tuple(x.shape[2:])}")
    cols = x.unfold(2, kh, stride).unfold(3, kw, stride)  # (N, C, Ho, Wo, kH, kW)
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(*cols.shape[:1], *cols.shape[2:4], c * kh * kw)
    w2 = q_w.reshape(c_out, -1)
    t = _int_layer(cols @ w2.T, w2.sum(1), zp_x, scale_x, scale_w, bias, scale_y, zp_y, qmin_y,
                   qmax_y, rounding)  # channel-last (N, Ho, Wo, C_out)
    return replace(t, acc=t.acc.permute(0, 3, 1, 2), q_y=t.q_y.permute(0, 3, 1, 2))


def int_conv2d(q_x: Tensor, zp_x: int, scale_x: float, q_w: Tensor, scale_w,
               bias: Tensor | None, scale_y: float, zp_y: int, stride: int = 1, padding: int = 0,
               qmin_y: int = 0, qmax_y: int = 255, rounding: str = "gemmlowp") -> Tensor:
    """Integer-only conv2d: the output codes of ``int_conv2d_trace`` (int64, NCHW).

    q_Y = clamp(Z_Y + M0 2^-n (Conv(q_W, q_Xpad) + q_b - Z_X sum q_W), qmin_y, qmax_y)
    Paper: Jacob et al. 2018, sec. 2.3-2.4.
    Used in: 01_linear_quantization
    """
    return int_conv2d_trace(q_x, zp_x, scale_x, q_w, scale_w, bias, scale_y, zp_y, stride,
                            padding, qmin_y, qmax_y, rounding).q_y


# ----------------------------------------------------------------------------- fbgemm reference
@contextmanager
def _fbgemm():
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch 2.x
            warnings.filterwarnings("ignore", ".*quantized tensor creation", UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = old


def fbgemm_layer(q_x: Tensor, zp_x: int, scale_x: float, q_w: Tensor, scale_w,
                 bias: Tensor | None, scale_y: float, zp_y: int, stride: int = 1,
                 padding: int = 0) -> Tensor:
    """PyTorch's own quantized linear (2-D q_w) or conv2d (4-D q_w) on the same codes.

    Runs ``torch.ops.quantized.linear`` / ``conv2d`` with the fbgemm engine (restored after) and
    returns the output codes (int64): the trusted reference for ``int_linear`` / ``int_conv2d``.
    q_Y = torch.ops.quantized.linear(X, prepack(W, b), S_Y, Z_Y)  with X = S_X (q_x - Z_X),
    W = S_W q_w; one scale_w: per-tensor weights, C_out scales: per-channel (Z_W = 0 both).
    Keep q_x in 0..127 on CPUs without AVX-512 VNNI (fbgemm's vpmaddubsw saturates at int16).
    Paper: Jacob et al. 2018; FBGEMM (Khudia et al., "FBGEMM: Enabling High-Performance
    Low-Precision Deep Learning Inference", 2021).
    Used in: 01_linear_quantization
    """
    s_w = _check_scale(scale_w, "scale_w", q_w.shape[0])
    w_real = (q_w.double() * s_w.view(-1, *[1] * (q_w.ndim - 1))).float()
    with _fbgemm():
        x = torch.quantize_per_tensor(((q_x.double() - zp_x) * scale_x).float(), float(scale_x),
                                      zp_x, torch.quint8)
        if s_w.numel() == 1:
            w = torch.quantize_per_tensor(w_real, float(s_w), 0, torch.qint8)
        else:
            zeros = torch.zeros(len(s_w), dtype=torch.int64)
            w = torch.quantize_per_channel(w_real, s_w, zeros, 0, torch.qint8)
        if not (torch.equal(x.int_repr().long(), q_x.long())
                and torch.equal(w.int_repr().long(), q_w.long())):
            raise ValueError("codes must lie in q_x: 0..255 and q_w: -128..127")
        if q_w.ndim == 2:
            packed = torch.ops.quantized.linear_prepack(w, bias)
            y = torch.ops.quantized.linear(x, packed, float(scale_y), zp_y)
        else:
            packed = torch.ops.quantized.conv2d_prepack(w, bias, [stride] * 2, [padding] * 2,
                                                        [1, 1], 1)
            y = torch.ops.quantized.conv2d(x, packed, float(scale_y), zp_y)
    return y.int_repr().long()


def random_layer(seed: int, conv: bool = False, per_channel: bool = False) -> dict:
    """A random layer (codes, log-uniform scales, float bias) as keyword arguments for the layers.

    S_X, S_W ~ log-uniform on [1e-3, 1e-1]; b ~ N(0, sigma^2) with sigma ~ U(0, 3) (or no bias);
    S_Y, Z_Y from the real output range times U(0.5, 1.5) (so M < 1). Activation codes and Z_X
    are in 0..127 (reduce_range: exact for fbgemm on any AVX2 CPU).
    Paper: Jacob et al. 2018 (the layer it feeds).
    Used in: 01_linear_quantization
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ri = lambda lo, hi, *s: torch.randint(lo, hi, s, generator=g)  # noqa: E731
    c_out, c_in, k = int(ri(1, 40)), int(ri(1, 6 if conv else 80)), int(ri(1, 4))
    w_shape, x_shape = (c_out, c_in, k, k), (int(ri(1, 4)), c_in, int(ri(3, 9)), int(ri(3, 9)))
    w_shape, x_shape = (w_shape, x_shape) if conv else (w_shape[:2], (int(ri(1, 9)), c_in))
    q_x, zp_x, q_w = ri(0, 128, *x_shape), int(ri(0, 128)), ri(-128, 128, *w_shape)
    scale_x = float(10 ** (-3 + 2 * u(1)))
    scale_w = 10 ** (-3 + 2 * u(c_out if per_channel else 1))
    bias = torch.randn(c_out, generator=g) * 3 * float(u(1)) if bool(u(1) < 0.8) else None
    case = dict(q_x=q_x, zp_x=zp_x, scale_x=scale_x, q_w=q_w, scale_w=scale_w, bias=bias)
    x, w = (q_x - zp_x).double() * scale_x, q_w * scale_w.view(-1, *[1] * (q_w.ndim - 1))
    if conv:
        case.update(stride=int(ri(1, 3)), padding=int(ri(0, 3)))
        b = None if bias is None else bias.double()
        y = F.conv2d(x, w, b, case["stride"], case["padding"])
    else:
        y = x @ w.T + (0 if bias is None else bias)
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    scale_y = max((hi - lo) / 255 * float(0.5 + u(1)), 2 * scale_x * float(scale_w.max()))
    case.update(scale_y=scale_y, zp_y=min(255, max(0, round(-lo / scale_y) + int(ri(-8, 9)))))
    return case


def mismatch_rate(conv: bool = False, rounding: str = "fbgemm", seed: int = 0,
                  trials: int = 20) -> float:
    """Fraction of output codes where ``int_linear`` / ``int_conv2d`` differ from fbgemm.

    mismatch = #{q_Y != q_Y^fbgemm} / #outputs over ``trials`` random layers (per-tensor and
    per-channel weights alternate); 0.0 means bit-exact.
    Paper: Jacob et al. 2018; reference: fbgemm via ``fbgemm_layer``.
    Used in: 01_linear_quantization
    """
    bad = total = 0
    for t in range(trials):
        case = random_layer(seed * 100_003 + t, conv, per_channel=bool(t % 2))
        ours = (int_conv2d if conv else int_linear)(**case, rounding=rounding)
        ref = fbgemm_layer(**case)
        bad, total = bad + int((ours != ref).sum()), total + ref.numel()
    return bad / total


def check_int_linear_against_fbgemm(seed: int = 0, trials: int = 20) -> bool:
    """True when ``int_linear(rounding="fbgemm")`` equals fbgemm's quantized linear bit for bit.

    int_linear_bitexact = all(q_Y == q_Y^fbgemm) over ``trials`` random layers (``random_layer``).
    Paper: Jacob et al. 2018; reference: ``torch.ops.quantized.linear`` (fbgemm).
    Used in: 01_linear_quantization
    """
    return mismatch_rate(False, "fbgemm", seed, trials) == 0.0


def check_int_conv2d_against_fbgemm(seed: int = 0, trials: int = 20) -> bool:
    """True when ``int_conv2d(rounding="fbgemm")`` equals fbgemm's quantized conv2d bit for bit.

    int_conv_bitexact = all(q_Y == q_Y^fbgemm) over ``trials`` random layers (``random_layer``).
    Paper: Jacob et al. 2018; reference: ``torch.ops.quantized.conv2d`` (fbgemm).
    Used in: 01_linear_quantization
    """
    return mismatch_rate(True, "fbgemm", seed, trials) == 0.0


# ----------------------------------------------------------------------------- int8 MLP
@dataclass(frozen=True)
class IntMLPResult:
    """Output of ``int_mlp_forward``."""

    q_logits: Tensor
    """int64 (N, classes): output codes."""
    logits: Tensor
    """float32 (N, classes): S_Y (q_logits - Z_Y)."""
    pred: Tensor
    """int64 (N,): argmax class."""


def mlp_ranges(x: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> list[tuple]:
    """Calibration: (min, max) of the input, the hidden ReLU(W1 x + b1) and the logits (float).

    ranges = [(min x, max x), (min h, max h), (min y, max y)],  h = ReLU(x W1^T + b1),
    y = h W2^T + b2. Paper: Jacob et al. 2018, sec. 3 (activation ranges from data).
    Used in: 01_linear_quantization
    """
    h = torch.relu(x @ W1.T + b1)
    return [(float(t.min()), float(t.max())) for t in (x, h, h @ W2.T + b2)]


def int_mlp_forward(x: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, ranges: list,
                    rounding: str = "gemmlowp") -> IntMLPResult:
    """Integer-only Linear -> ReLU -> Linear from float weights and calibration ranges.

    q_X = quantize(x) with (S, Z) from ranges[0] (uint8; the only float step per input)
    q_H = max(int_linear(q_X, W1, b1), Z_H)   ReLU in integers: clamp at Z_H, the code of real 0
    q_Y = int_linear(q_H, W2, b2)             weights: symmetric int8 per output channel
    Paper: Jacob et al. 2018 (sec. 2.4: fused ReLU as a clamp of the output codes).
    Used in: 01_linear_quantization
    """
    check_tensor(x)
    if len(ranges) != 3:
        raise ValueError(f"ranges must be 3 (min, max) pairs (input, hidden, logits), got {ranges}")
    qps = [qparams_with_range(x, lo, hi, 8, symmetric=False, signed=False) for lo, hi in ranges]
    sz = [(float(qp.scale.reshape(())), int(qp.zero_point.reshape(()))) for qp in qps]
    q = quantize(x, qps[0])  # (N, in_features) uint8 codes
    for i, (W, b) in enumerate([(W1, b1), (W2, b2)]):
        qp_w = choose_qparams(W, 8, symmetric=True, granularity=PerChannel(0))
        q = int_linear(q, sz[i][1], sz[i][0], quantize(W, qp_w), qp_w.scale.reshape(-1), b,
                       sz[i + 1][0], sz[i + 1][1], rounding=rounding)
        q = q.clamp(min=sz[1][1]) if i == 0 else q
    logits = (sz[2][0] * (q - sz[2][1])).float()
    return IntMLPResult(q, logits, q.argmax(-1))
