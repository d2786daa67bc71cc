"""Linear (affine) quantization: integer ranges, (scale, zero_point), quantize / dequantize / fake-quantize.

Scope: the three roles kept apart, as in ``torch.ao.quantization`` and torchao:
range estimation (min/max per block) -> ``qparams_from_range`` (the one place the
scale/zero-point formula lives) -> quantize, dequantize, fake_quantize.

One argument, ``granularity``, selects per-tensor, per-channel (any axis) or
per-group (a group size along an axis). Internally every granularity becomes a
``block_size``: the shape of the block of elements that share one scale.

    r = S (q - Z)                                  (affine mapping)
    q = clamp(round(r / S) + Z, qmin, qmax)

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018. Lecture: "Neural Network Quantization
(cont'd)", linear quantization and PTQ granularity slides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

MIN_BITS = 2
"""Fewest bits a linear quantizer here supports (1-bit is binarization: notebook 06)."""
MAX_BITS = 16
"""Most bits a fake-quantizer here supports (float32 holds every 16-bit integer exactly)."""
MAX_RANGE_BITS = 32
"""``qrange`` also answers for int32 (bias, accumulators), up to 32 bits."""


# ----------------------------------------------------------------------------- checks
def check_bits(num_bits: int, lo: int = MIN_BITS, hi: int = MAX_BITS, name: str = "num_bits") -> int:
    """Return ``num_bits`` if it is an int in ``lo..hi``; raise ValueError otherwise."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not lo <= num_bits <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {num_bits!r}")
    return num_bits


def check_tensor(x: Tensor, name: str = "x") -> Tensor:
    """Raise ValueError unless ``x`` is a non-empty floating tensor with only finite values."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must contain only finite values, found {n_bad} NaN/inf")
    return x


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Map a possibly negative axis into ``0..ndim-1``; raise ValueError when out of range."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be an integer in {-ndim}..{ndim - 1} for a {ndim}-D tensor, got {axis!r}")
    return axis % ndim


# ----------------------------------------------------------------------------- ranges
def qrange(num_bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range of an N-bit integer.

    signed:   qmin = -2^(N-1),  qmax = 2^(N-1) - 1     (two's complement)
    unsigned: qmin = 0,         qmax = 2^N - 1

    N = 2 gives [-2, 1], N = 8 gives [-128, 127]; N may be 1..32 here.
    Source: the lecture's bit-width table (q_min, q_max for N = 2, 3, 4, N).
    Used in: 01_linear_quantization and every later notebook.
    """
    check_bits(num_bits, 1, MAX_RANGE_BITS)
    if signed:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


# ----------------------------------------------------------------------------- granularity
@dataclass(frozen=True)
class PerTensor:
    """One (scale, zero_point) for the whole tensor."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class PerChannel:
    """One (scale, zero_point) per index along ``axis`` (e.g. axis=0: per output channel)."""

    axis: int = 0
    """The axis whose every index gets its own scale."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = normalize_axis(self.axis, len(shape))
        return tuple(1 if d == axis else s for d, s in enumerate(shape))


@dataclass(frozen=True)
class PerGroup:
    """One (scale, zero_point) per run of ``group_size`` consecutive elements along ``axis``.

    Every other axis is kept apart, so a (out, in) weight with axis=1, group_size=16
    gets out * in/16 scales: the group quantization of the lecture (and of GPTQ/AWQ).
    """

    axis: int = -1
    """The axis that is cut into groups."""
    group_size: int = 32
    """Elements per group; must divide the axis length."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = normalize_axis(self.axis, len(shape))
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or shape[axis] % g != 0:
            divisors = [d for d in range(1, shape[axis] + 1) if shape[axis] % d == 0]
            raise ValueError(
                f"group_size must divide the length {shape[axis]} of axis {self.axis} "
                f"(allowed: {divisors}), got {g!r}"
            )
        return tuple(g if d == axis else 1 for d in range(len(shape)))


Granularity = PerTensor | PerChannel | PerGroup


# ----------------------------------------------------------------------------- qparams
@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    ``scale`` and ``zero_point`` have one entry per block: their shape is
    ``shape[i] // block_size[i]`` on every axis (same ndim as the tensor).
    """

    scale: Tensor
    """float32, one per block; S in r = S (q - Z)."""
    zero_point: Tensor
    """int32, one per block; Z in r = S (q - Z). Always 0 for symmetric."""
    qmin: int
    """Smallest integer code."""
    qmax: int
    """Largest integer code."""
    block_size: tuple[int, ...]
    """Shape of the block of elements sharing one (scale, zero_point)."""
    shape: tuple[int, ...]
    """Shape of the tensor these parameters were chosen for."""

    @property
    def num_bits(self) -> int:
        """Bits per code: log2(qmax - qmin + 1)."""
        return int(round(math.log2(self.qmax - self.qmin + 1)))

    def expand(self, t: Tensor) -> Tensor:
        """Broadcast a per-block tensor (scale or zero_point) to the full tensor shape."""
        for dim, b in enumerate(self.block_size):
            if b > 1:
                t = t.repeat_interleave(b, dim=dim)
        return t


def _block_view(x: Tensor, block_size: tuple[int, ...]) -> Tensor:
    """Reshape (s0, s1, ...) to (s0/b0, b0, s1/b1, b1, ...) so blocks can be reduced over odd dims."""
    new_shape: list[int] = []
    for s, b in zip(x.shape, block_size):
        new_shape += [s // b, b]
    return x.reshape(new_shape)


def block_minmax(x: Tensor, block_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` over each block; both of shape ``shape // block_size``."""
    xb = _block_view(x, block_size)
    dims = tuple(range(1, xb.ndim, 2))
    return xb.amin(dim=dims), xb.amax(dim=dims)


def qparams_from_range(
    min_val: Tensor,
    max_val: Tensor,
    num_bits: int = 8,
    symmetric: bool = False,
    signed: bool = True,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point from a real range [min_val, max_val] (elementwise, any shape).

    The range is first widened to contain 0, so that r = 0 is exactly representable.
    asymmetric: S = (r_max - r_min) / (q_max - q_min),  Z = clamp(q_min - round(r_min / S), q_min, q_max)
    symmetric:  S = |r|_max / q_max,                    Z = 0          (signed integers only)

    A degenerate range (r_min == r_max, a constant block) gets S = |c| (or 1 when c = 0) and a
    zero point one code away from c, so that c reconstructs exactly instead of dividing by zero
    (exactly for every normal float32 c; a subnormal c comes back within 1.18e-38).
    The symmetric rule follows the lecture (S = |r|_max / q_max); PyTorch instead divides by
    (q_max - q_min) / 2, which is 127.5 rather than 127 for int8.
    Paper: Jacob et al. 2018 (eq. 1-2); Krishnamoorthi, "Quantizing deep convolutional networks
    for efficient inference: A whitepaper", 2018.
    Used in: 01_linear_quantization, 02_granularity, 03_clipping.
    """
    check_bits(num_bits)
    min_val = torch.as_tensor(min_val, dtype=torch.float32).detach()
    max_val = torch.as_tensor(max_val, dtype=torch.float32).detach()
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}"
        )
    check_tensor(min_val, "min_val")
    check_tensor(max_val, "max_val")
    if bool((min_val > max_val).any()):
        raise ValueError("min_val must be <= max_val everywhere")
    if symmetric and not signed:
        raise ValueError("symmetric quantization needs signed=True (Z = 0 in a signed range); use symmetric=False for unsigned")
    qmin, qmax = qrange(num_bits, signed)
    constant = min_val == max_val
    const_mag = min_val.abs()
    const_scale = torch.where(const_mag > 0, const_mag, torch.ones_like(const_mag))
    # A subnormal constant (|c| < 1.18e-38) would make 1 / S overflow: floor S at the smallest
    # normal float32, so such a c comes back within that floor instead of as inf/NaN.
    const_scale = const_scale.clamp(min=torch.finfo(torch.float32).tiny)

    # float64 for the division so that huge ranges do not overflow; the floor at the smallest
    # normal float32 keeps 1 / S finite for tiny (but non-zero) ranges.
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs()).double()
        scale = (amax / qmax).clamp(min=tiny).float()
        scale = torch.where(constant, const_scale, scale)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point

    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    scale = ((hi.double() - lo.double()) / float(qmax - qmin)).clamp(min=tiny).float()
    scale = torch.where(constant, const_scale, scale)
    # For a constant c < 0 this gives Z = qmin + 1, so c itself is the code Z - 1 = qmin.
    zp = qmin - torch.round(lo / scale)
    zero_point = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return scale, zero_point


def choose_qparams(
    x: Tensor,
    num_bits: int = 8,
    symmetric: bool = False,
    granularity: Granularity = PerTensor(),
    signed: bool = True,
) -> QParams:
    """Choose (scale, zero_point) from the min/max of ``x`` at the given granularity.

    r_min, r_max = min(x), max(x) over each block, then ``qparams_from_range``.
    Paper: Jacob et al. 2018; per-channel: Krishnamoorthi 2018; group: the lecture's
    group-quantization slides.
    Used in: 01_linear_quantization, 02_granularity and later notebooks.
    """
    check_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        raise ValueError(f"granularity must be PerTensor(), PerChannel(axis) or PerGroup(axis, group_size), got {granularity!r}")
    block = granularity.block_size(tuple(x.shape))
    min_val, max_val = block_minmax(x.detach().float(), block)
    scale, zero_point = qparams_from_range(min_val, max_val, num_bits, symmetric, signed)
    qmin, qmax = qrange(num_bits, signed)
    return QParams(scale, zero_point, qmin, qmax, block, tuple(x.shape))


def qparams_with_range(
    x: Tensor,
    min_val: float,
    max_val: float,
    num_bits: int = 8,
    symmetric: bool = False,
    signed: bool = True,
) -> QParams:
    """Per-tensor QParams for ``x`` from a given range [min_val, max_val] instead of x's own min/max.

    This is how a clipping range (from calibration, EMA, ACIQ, KL, ...) is turned into
    (scale, zero_point): values outside the range saturate at q_min / q_max.
    S, Z = qparams_from_range(min_val, max_val)   (see there for the formula)
    Used in: 01_linear_quantization, 03_clipping.
    """
    check_tensor(x)
    scale, zero_point = qparams_from_range(
        torch.tensor(float(min_val)).reshape([1] * x.ndim),
        torch.tensor(float(max_val)).reshape([1] * x.ndim),
        num_bits, symmetric, signed,
    )
    qmin, qmax = qrange(num_bits, signed)
    return QParams(scale, zero_point, qmin, qmax, tuple(x.shape), tuple(x.shape))


def _check_against(x: Tensor, qp: QParams, name: str) -> None:
    if tuple(x.shape) != qp.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the qparams were chosen for shape {qp.shape}")


# ----------------------------------------------------------------------------- (de)quantize
def _unclamped_codes(x: Tensor, qp: QParams) -> Tensor:
    """round(x * (1 / S)) + Z in float32, before clamping: the one place the rounding happens."""
    check_tensor(x)
    _check_against(x, qp, "x")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    inv_scale = qp.expand(1.0 / qp.scale)
    return torch.round(x.float() * inv_scale) + qp.expand(qp.zero_point).to(torch.float32)


def quantize(x: Tensor, qp: QParams) -> Tensor:
    """Real -> integer codes (int32 container).

    q = clamp(round(x * (1 / S)) + Z, q_min, q_max)

    Rounding is half-to-even, and x / S is computed as x * (1 / S) in float32, exactly as
    PyTorch's fake-quantize kernels do, so the two agree bit for bit.
    Paper: Jacob et al. 2018, eq. 1.
    Used in: 01_linear_quantization and later notebooks.
    """
    return torch.clamp(_unclamped_codes(x, qp), qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """Integer codes -> reals:  r = S (q - Z).

    Paper: Jacob et al. 2018, eq. 1.
    Used in: 01_linear_quantization and later notebooks.
    """
    check_tensor(q, "q")
    _check_against(q, qp, "q")
    if q.is_floating_point():
        raise ValueError(f"q must be an integer tensor of codes, got dtype {q.dtype}")
    if int(q.min()) < qp.qmin or int(q.max()) > qp.qmax:
        raise ValueError(f"q must lie in {qp.qmin}..{qp.qmax}, got values in {int(q.min())}..{int(q.max())}")
    return (q.to(torch.float32) - qp.expand(qp.zero_point).to(torch.float32)) * qp.expand(qp.scale)


def fake_quantize_with_mask(x: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
    """Fake-quantize ``x`` and also return the clip mask (True where qmin <= round(x / S) + Z <= qmax).

    The mask is where a straight-through estimator lets the gradient through; it is the same
    mask PyTorch's ``fake_quantize_per_tensor_affine`` uses in its backward pass.
    Used in: 05_qat_ste (through ``lecturelib.ste``).
    """
    q = _unclamped_codes(x, qp)
    mask = (q >= qp.qmin) & (q <= qp.qmax)
    x_fq = dequantize(torch.clamp(q, qp.qmin, qp.qmax).to(torch.int32), qp)
    return x_fq, mask


def fake_quantize(x: Tensor, qp: QParams) -> Tensor:
    """Quantize then dequantize, staying in float:  x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z).

    Matches ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` bit for bit.
    No gradient flows through ``round``; use ``lecturelib.ste.ste_fake_quantize`` to train.
    Paper: Jacob et al. 2018 (simulated quantization).
    Used in: 01_linear_quantization and later notebooks.
    """
    return fake_quantize_with_mask(x, qp)[0]


def quantization_error(x: Tensor, qp: QParams) -> Tensor:
    """Frobenius norm of the reconstruction error:  ||x - x_fq||_F = sqrt(sum (x - x_fq)^2).

    Used in: 01_linear_quantization, 02_granularity.
    """
    return torch.linalg.vector_norm(x.float() - fake_quantize(x, qp))
