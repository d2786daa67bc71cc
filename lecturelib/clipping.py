"""Dynamic-range clipping: estimators that choose the range [lo, hi] an activation is quantized to.

Scope: range estimation only. Every estimator here returns a ``ClipRange(lo, hi)`` with
lo <= 0 <= hi; the one formula that turns a range into (scale, zero_point) stays in
``lecturelib.quantizers`` (``qparams_with_range``), exactly as an observer and
``choose_qparams`` are kept apart in ``torch.ao.quantization``.

    min-max           lo, hi = min(x), max(x)
    EMA               r_hat(t) = alpha * r(t) + (1 - alpha) * r_hat(t - 1)      (during training)
    mean min/max      lo, hi = mean over batches (or samples) of each batch's min, max
    percentile        lo, hi = the p-th lower and upper percentiles
    MSE grid search   argmin_t mean((x - Q_[t lo, t hi](x))^2)
    ACIQ              argmin_a clip(a) + c a^2   for a Laplace(0, b) or Gaussian(0, s) prior
    OCTAV             s <- E[|x| 1{|x|>s}] / (c E[1{0<|x|<=s}] + E[1{|x|>s}])  (Newton-Raphson)
    KL (TensorRT)     argmin_t KL(P || Q_t) on a 2048-bin histogram of |x|

``c`` is the rounding-noise coefficient: a grid of step D has noise D^2 / 12, and D is
proportional to the clip value a, so the rounding error is c a^2.

Papers: Jacob et al., CVPR 2018 (EMA); Banner, Nahshan & Soudry, "Post training 4-bit
quantization of convolutional networks for rapid-deployment", NeurIPS 2019 (ACIQ);
Sakr et al., "Optimal Clipping and Magnitude-aware Differentiation for Improved
Quantization-aware Training", ICML 2022 (OCTAV); Migacz, "8-bit Inference with TensorRT",
GTC 2017 (KL calibration). Lecture: "Dynamic Range Clipping" slides.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from .quantizers import (
    PerChannel,
    QParams,
    check_bits,
    check_tensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_with_mask,
    qparams_from_range,
    qparams_with_range,
    qrange,
)

Tensor = torch.Tensor
Prior = Literal["laplace", "gauss"]
Grid = Literal["paper", "affine"]
Simulation = Literal["paper", "noise"]

LECTURE_LAPLACE_ALPHA = {2: 2.83, 3: 3.89, 4: 5.03}
"""The slide's optimal clip |r|_max for a Laplace(0, b) input, in units of b, for 2, 3, 4 bits."""

PRIORS = ("laplace", "gauss")
GRIDS = ("paper", "affine")
SIMULATIONS = ("paper", "noise")


# ----------------------------------------------------------------------------- ranges
class ClipRange(NamedTuple):
    """A clip range [lo, hi] with lo <= 0 <= hi (0 must stay exactly representable).

    Used in: 03_clipping.
    """

    lo: float
    """Lower clip value r_min (<= 0)."""
    hi: float
    """Upper clip value r_max (>= 0)."""


def _flat(x: Tensor, name: str = "x") -> Tensor:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x.detach().flatten().double()


def _with_zero(lo: float, hi: float) -> ClipRange:
    """Widen [lo, hi] to contain 0, as qparams_from_range does, and return plain floats."""
    return ClipRange(min(float(lo), 0.0), max(float(hi), 0.0))


def _side(x: Tensor) -> str:
    """'pos' when x >= 0 everywhere (ReLU outputs), 'neg' when x <= 0, else 'two'."""
    if float(x.min()) >= 0.0:
        return "pos"
    if float(x.max()) <= 0.0:
        return "neg"
    return "two"


def _range_from_alpha(alpha: float, side: str) -> ClipRange:
    """A clip magnitude alpha as a range: [0, a] for one-sided data, [-a, a] otherwise."""
    if side == "pos":
        return ClipRange(0.0, float(alpha))
    if side == "neg":
        return ClipRange(-float(alpha), 0.0)
    return ClipRange(-float(alpha), float(alpha))


def _check_choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _check_int(value: Any, lo: int, name: str, hi: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def range_qparams(x: Tensor, rng: ClipRange, num_bits: int, symmetric: bool = False) -> QParams:
    """(scale, zero_point) for ``x`` clipped to ``rng``: qparams_with_range(x, lo, hi, num_bits).

    asymmetric: S = (hi - lo) / (q_max - q_min), Z = q_min - round(lo / S)  (see quantizers).
    Used in: 03_clipping.
    """
    lo, hi = rng
    if not lo <= 0.0 <= hi:
        raise ValueError(f"rng must satisfy lo <= 0 <= hi, got {tuple(rng)}")
    return qparams_with_range(x, lo, hi, num_bits, symmetric)


def quantize_with_range(
    x: Tensor, rng: ClipRange, num_bits: int, symmetric: bool = False
) -> Tensor:
    """Fake-quantize ``x`` to ``num_bits`` inside the clip range ``rng``.

    x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z) with S, Z from range_qparams.
    Used in: 03_clipping.
    """
    return fake_quantize(x, range_qparams(x, rng, num_bits, symmetric))


def mse_split(
    x: Tensor, rng: ClipRange, num_bits: int, symmetric: bool = False
) -> tuple[float, float]:
    """Mean-squared quantization error of ``x`` in the range ``rng``, split into its two causes.

    clipping = mean((x - x_fq)^2 * 1[x was clipped])
    rounding = mean((x - x_fq)^2 * 1[x was not clipped])
    so clipping + rounding = mean((x - x_fq)^2). "Clipped" is the quantizer's own clamp mask.
    Used in: 03_clipping.
    """
    x = x.detach().float()
    x_fq, inside = fake_quantize_with_mask(x, range_qparams(x, rng, num_bits, symmetric))
    err = (x.double() - x_fq.double()) ** 2
    n = err.numel()
    return float(err[~inside].sum()) / n, float(err[inside].sum()) / n


# ----------------------------------------------------------------------------- simple estimators
def minmax_range(x: Tensor) -> ClipRange:
    """lo, hi = min(x), max(x), widened to contain 0 (no clipping at all).

    Paper: Jacob et al. 2018.
    Used in: 03_clipping.
    """
    x = _flat(x)
    return _with_zero(x.min(), x.max())


def mean_minmax_range(x: Tensor, batch_size: int = 1) -> ClipRange:
    """Mean of per-batch minima and maxima over consecutive batches of ``x`` (dim 0 = samples).

    lo = mean_k min(x_k), hi = mean_k max(x_k);  batch_size=1 is the lecture's "mean of the
    min/max of each sample". A short last batch counts like the others.
    Paper: Jacob et al. 2018 (calibration).
    Used in: 03_clipping.
    """
    check_tensor(x)
    _check_int(batch_size, 1, "batch_size")
    if x.ndim < 1:
        raise ValueError("x must have a sample dimension (dim 0), got a 0-d tensor")
    xs = x.detach().double().reshape(x.shape[0], -1)
    los = [float(b.min()) for b in xs.split(batch_size)]
    his = [float(b.max()) for b in xs.split(batch_size)]
    return _with_zero(sum(los) / len(los), sum(his) / len(his))


def percentile_range(x: Tensor, percentile: float = 99.99) -> ClipRange:
    """lo, hi = the (100 - p)-th and p-th percentiles of x (linear interpolation), widened to 0.

    Paper: McKinstry et al., "Discovering low-precision networks close to full-precision
    networks for efficient embedded inference", 2018 (percentile calibration).
    Used in: 03_clipping.
    """
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not 50.0 < percentile <= 100.0
    ):
        raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
    x = _flat(x).numpy()
    lo, hi = np.percentile(x, [100.0 - percentile, percentile])
    return _with_zero(lo, hi)


class EMAObserver(nn.Module):
    """Tracks exponential moving averages of the batch min and max of what flows through it.

    r_hat(t) = alpha * r(t) + (1 - alpha) * r_hat(t - 1), r_hat(1) = r(1)   (the lecture's slide)
    written as r_hat += alpha * (r - r_hat), as in torch's MovingAverageMinMaxObserver
    (alpha = its ``averaging_constant``). One observer tracks several alphas at once and keeps
    the raw batch min/max of the first ``history`` steps. It updates only in training mode and
    returns its input unchanged, so inserting it does not change the network. Its state is a
    buffer, saved in the model's state_dict.
    Paper: Jacob et al. 2018, section 3.
    Used in: 03_clipping.
    """

    def __init__(self, alphas: Sequence[float] = (0.01,), history: int = 0):
        super().__init__()
        alphas = list(alphas)
        if not alphas or any(
            isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0
            for a in alphas
        ):
            raise ValueError(
                f"alphas must be a non-empty list of numbers in (0, 1], got {alphas!r}"
            )
        _check_int(history, 0, "history")
        self.register_buffer("alphas", torch.tensor(alphas, dtype=torch.float32))
        self.register_buffer("lo", torch.zeros(len(alphas)))
        self.register_buffer("hi", torch.zeros(len(alphas)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("batch_min", torch.zeros(history))
        self.register_buffer("batch_max", torch.zeros(history))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """One EMA step with the min and max of ``x``."""
        x = x.detach().float()
        b_lo, b_hi = x.min(), x.max()
        if int(self.steps) == 0:
            self.lo.fill_(float(b_lo))
            self.hi.fill_(float(b_hi))
        else:
            self.lo += self.alphas * (b_lo - self.lo)
            self.hi += self.alphas * (b_hi - self.hi)
        t = int(self.steps)
        if t < self.batch_min.numel():
            self.batch_min[t], self.batch_max[t] = b_lo, b_hi
        self.steps += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.update(x)
        return x

    def range(self, alpha: float) -> ClipRange:
        """The EMA range for one of this observer's alphas, widened to contain 0."""
        matches = (self.alphas == float(alpha)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"alpha must be one of {self.alphas.tolist()}, got {alpha!r}")
        if int(self.steps) == 0:
            raise ValueError(
                "the observer has seen no batch yet (it updates in training mode only)"
            )
        i = int(matches[0])
        return _with_zero(self.lo[i], self.hi[i])


def ema_range(batches: Iterable[Tensor], alpha: float = 0.01) -> ClipRange:
    """EMA of batch min and max over ``batches`` (see EMAObserver), widened to contain 0.

    r_hat(t) = alpha * r(t) + (1 - alpha) * r_hat(t - 1).
    Paper: Jacob et al. 2018.
    Used in: 03_clipping.
    """
    obs = EMAObserver([alpha])
    for b in batches:
        check_tensor(b, "batch")
        obs.update(b)
    if int(obs.steps) == 0:
        raise ValueError("batches must contain at least one tensor")
    return obs.range(alpha)


# ----------------------------------------------------------------------------- MSE grid search
def mse_range(x: Tensor, num_bits: int, n_grid: int = 100, symmetric: bool = False) -> ClipRange:
    """Grid search over shrunken min-max ranges for the smallest fake-quantization MSE.

    [lo, hi] = argmin over t in {1/n, 2/n, ..., 1} of mean((x - Q(x; t min(x), t max(x)))^2)
    with Q the real quantizer (qparams_from_range + fake_quantize, all candidates in one batch);
    t = 1 is min-max, so the result is never worse than min-max on ``x``.
    Paper: e.g. Nagel et al., "A White Paper on Neural Network Quantization", 2021, sec. 3.4.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    _check_int(n_grid, 1, "n_grid")
    x = x.detach().float().flatten()
    lo0, hi0 = minmax_range(x)
    if lo0 == hi0:  # all zeros: the empty range reconstructs them exactly
        return ClipRange(lo0, hi0)
    ts = np.linspace(1.0 / n_grid, 1.0, n_grid)
    errs = np.concatenate(
        [
            _mse_of_ranges(x, lo0 * ts[i : i + 64], hi0 * ts[i : i + 64], num_bits, symmetric)
            for i in range(0, n_grid, 64)
        ]
    )
    k = int(np.argmin(errs))  # the first of equal minima: the smallest such range
    return ClipRange(lo0 * float(ts[k]), hi0 * float(ts[k]))


def _mse_of_ranges(
    x: Tensor, los: np.ndarray, his: np.ndarray, num_bits: int, symmetric: bool
) -> np.ndarray:
    """mean((x - Q(x; lo_k, hi_k))^2) for every candidate k at once (x flat, float32).

    Row k of a (K, N) copy of x gets its own (scale, zero_point) from qparams_from_range, the
    same formula qparams_with_range applies to one range.
    """
    K, N = len(los), x.numel()
    scale, zero_point = qparams_from_range(
        torch.from_numpy(los).float().reshape(K, 1),
        torch.from_numpy(his).float().reshape(K, 1),
        num_bits,
        symmetric,
    )
    qmin, qmax = qrange(num_bits)
    qp = QParams(scale, zero_point, qmin, qmax, (1, N), (K, N))
    xs = x.reshape(1, N).expand(K, N).contiguous()
    return ((xs.double() - fake_quantize(xs, qp).double()) ** 2).mean(dim=1).numpy()


# ----------------------------------------------------------------------------- the MSE model
def rounding_noise_coef(num_bits: int, grid: Grid = "paper", one_sided: bool = False) -> float:
    """c in "rounding error = c * alpha^2" for a uniform grid clipped at alpha.

    A step D gives noise D^2 / 12. The span is 2 alpha ([-alpha, alpha]) or alpha ([0, alpha]);
    grid "paper" cuts it into 2^M intervals (the slide: D = 2 alpha / 2^M, so c = 1 / (3 * 4^M));
    grid "affine" is an M-bit code, 2^M levels with the ends on the range, so 2^M - 1 intervals.
    c = span^2 / (12 n^2), span in {2, 1}, n in {2^M, 2^M - 1}.
    Paper: Banner et al. 2019, eq. 4; Sakr et al. 2022, eq. 2.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    _check_choice(grid, GRIDS, "grid")
    span = 1.0 if one_sided else 2.0
    n = 2.0**num_bits if grid == "paper" else 2.0**num_bits - 1.0
    return span**2 / (12.0 * n**2)


def clipping_error(alpha: Any, prior: Prior = "laplace") -> np.ndarray:
    """Expected clipping error E[(|X| - a)^2 1{|X| > a}] for a unit-scale prior (b = 1, sigma = 1).

    Laplace(0, 1):  2 exp(-a)
    Gaussian(0, 1): (a^2 + 1) erfc(a / sqrt 2) - sqrt(2 / pi) a exp(-a^2 / 2)
    The same expressions hold for the one-sided exponential and half-normal (ReLU of the prior,
    zeros excluded). Scale with b^2 (or sigma^2) and a -> a / b.
    Paper: Banner et al. 2019, eq. 5 and 7.
    Used in: 03_clipping.
    """
    _check_choice(prior, PRIORS, "prior")
    from scipy import special

    a = np.asarray(alpha, dtype=np.float64)
    if prior == "laplace":
        return 2.0 * np.exp(-a)
    return (a * a + 1.0) * special.erfc(a / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * a * np.exp(
        -a * a / 2.0
    )


def aciq_expected_mse(
    alpha: Any,
    num_bits: int,
    prior: Prior = "laplace",
    grid: Grid = "paper",
    one_sided: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """ACIQ's expected MSE at clip ``alpha`` (unit scale), as (clipping, rounding).

    E[(X - Q(X))^2] ~ clipping_error(alpha) + c alpha^2, c = rounding_noise_coef(num_bits, grid).
    For Laplace, two-sided, grid "paper": 2 exp(-a) + a^2 / (3 * 4^M), the lecture's model.
    The rounding term assumes a flat density inside each step and ignores that clipped values
    are not rounded (Banner et al. make the same two approximations).
    Paper: Banner et al. 2019, eq. 6.
    Used in: 03_clipping.
    """
    c = rounding_noise_coef(num_bits, grid, one_sided)
    a = np.asarray(alpha, dtype=np.float64)
    return clipping_error(a, prior), c * a * a


def minimize_1d(
    f: Callable[[float], float], lo: float, hi: float, n_coarse: int = 60, xatol: float = 1e-6
) -> float:
    """argmin of f on [lo, hi]: a coarse grid, then bounded Brent inside the best grid cell.

    Used in: 03_clipping (ACIQ's numeric minimisation and the simulations).
    """
    from scipy import optimize

    if not lo < hi:
        raise ValueError(f"need lo < hi, got {lo} and {hi}")
    xs = np.linspace(lo, hi, n_coarse)
    k = int(np.argmin([f(float(v)) for v in xs]))
    a, b = xs[max(k - 1, 0)], xs[min(k + 1, n_coarse - 1)]
    res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": xatol})
    return float(res.x)


@functools.lru_cache(maxsize=256)
def aciq_alpha(
    num_bits: int, prior: Prior = "laplace", grid: Grid = "paper", one_sided: bool = False
) -> float:
    """The clip value that minimises ACIQ's expected MSE, in units of b (Laplace) or sigma.

    alpha* = argmin_a clipping_error(a) + c a^2, found numerically. For Laplace, two-sided,
    grid "paper" this solves a e^a = 3 * 4^M: 2.83, 3.90, 5.03 for M = 2, 3, 4.
    Paper: Banner et al. 2019, sec. 3.
    Used in: 03_clipping.
    """

    def f(a: float) -> float:
        clip, rnd = aciq_expected_mse(a, num_bits, prior, grid, one_sided)
        return float(clip + rnd)

    return minimize_1d(f, 1e-3, 30.0, xatol=1e-9)


def aciq_range(
    x: Tensor, num_bits: int, prior: Prior = "laplace", grid: Grid = "affine"
) -> ClipRange:
    """ACIQ on data: fit the prior's scale to x, then clip at aciq_alpha * scale.

    two-sided data: b = mean|x| (Laplace), sigma = sqrt(mean x^2) (Gaussian); range [-a, a].
    one-sided data (x >= 0, e.g. ReLU): the non-zero values are fitted by an exponential
    (b = their mean) or a half-normal (sigma = their RMS); range [0, a]. Zeros are exact.
    grid "affine" (default) is the model of the real M-bit quantizer used here; "paper" the slide's.
    Paper: Banner et al. 2019.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    _check_choice(prior, PRIORS, "prior")
    _check_choice(grid, GRIDS, "grid")
    x = _flat(x)
    side = _side(x)
    mags = x.abs() if side == "two" else x.abs()[x != 0]
    if mags.numel() == 0 or float(mags.max()) == 0.0:
        return ClipRange(0.0, 0.0)
    scale = float(mags.mean()) if prior == "laplace" else float(mags.pow(2).mean().sqrt())
    return _range_from_alpha(aciq_alpha(num_bits, prior, grid, side != "two") * scale, side)


# ----------------------------------------------------------------------------- OCTAV
@dataclass(frozen=True)
class OctavResult:
    """The OCTAV iteration's answer and its path.

    Used in: 03_clipping.
    """

    alpha: float
    """The clip magnitude s* it converged to."""
    history: list[float]
    """s_1, s_2, ... (s_0 = 0)."""
    converged: bool
    """Whether |s_{n+1} - s_n| <= tol * s_{n+1} happened within max_iter steps."""
    range: ClipRange
    """alpha as a range: [0, s] for one-sided data, [-s, s] otherwise."""


def octav_objective(x: Tensor, s: float, num_bits: int, grid: Grid = "affine") -> float:
    """The MSE model OCTAV minimises, on the samples x:

    J(s) = c s^2 mean(1{0 < |x| <= s}) + mean((|x| - s)^2 1{|x| > s})
    (rounding noise on the non-zero values inside, clipping error outside; exact zeros cost
    nothing because the quantizer represents 0 exactly).
    Paper: Sakr et al. 2022, eq. 2.
    Used in: 03_clipping.
    """
    x = _flat(x)
    c = rounding_noise_coef(num_bits, grid, _side(x) != "two")
    a = x.abs()
    out = a > s
    inside = (~out) & (a > 0)
    return float((c * s * s * inside.double() + (a - s).pow(2) * out.double()).mean())


def octav(
    x: Tensor, num_bits: int, grid: Grid = "affine", max_iter: int = 100, tol: float = 1e-7
) -> OctavResult:
    """OCTAV: the Newton-Raphson fixed point for the MSE-optimal clip s.

    s_{n+1} = E[|x| 1{|x| > s_n}] / (c E[1{0 < |x| <= s_n}] + E[1{|x| > s_n}]),  s_0 = 0
    (a Newton step on J(s) = c s^2 P(0<|x|<=s) + E[(|x|-s)^2 1{|x|>s}] with the indicators held
    fixed; c = rounding_noise_coef, so for signed B-bit codes and grid "paper" c = 4^-B / 3 as
    in the paper). s_1 = mean|x|.
    Paper: Sakr et al., ICML 2022, eq. 4.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    _check_choice(grid, GRIDS, "grid")
    _check_int(max_iter, 1, "max_iter")
    x = _flat(x)
    side = _side(x)
    a = x.abs()
    a = a[a > 0]
    if a.numel() == 0:
        return OctavResult(0.0, [0.0], True, ClipRange(0.0, 0.0))
    c = rounding_noise_coef(num_bits, grid, side != "two")
    s, history, converged = 0.0, [], False
    for _ in range(max_iter):
        out = a > s
        n_out = int(out.sum())
        s_new = float(a[out].sum()) / (c * (a.numel() - n_out) + n_out)
        history.append(s_new)
        if abs(s_new - s) <= tol * s_new:
            converged = True
            s = s_new
            break
        s = s_new
    return OctavResult(s, history, converged, _range_from_alpha(s, side))


def octav_range(x: Tensor, num_bits: int, grid: Grid = "affine") -> ClipRange:
    """OCTAV's clip as a range (see ``octav``).

    Used in: 03_clipping.
    """
    return octav(x, num_bits, grid).range


# ----------------------------------------------------------------------------- KL (TensorRT)
def kl_reference_distribution(hist: np.ndarray, i: int) -> np.ndarray:
    """TensorRT's reference P for candidate i: the first i bins, the outliers added to bin i-1.

    P = [h_0, ..., h_{i-2}, h_{i-1} + sum_{j >= i} h_j] / sum(h)
    Paper: Migacz, "8-bit Inference with TensorRT", GTC 2017.
    Used in: 03_clipping.
    """
    hist = np.asarray(hist, dtype=np.float64)
    _check_int(i, 1, "i", len(hist))
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()
    total = p.sum()
    if total <= 0:
        raise ValueError("hist must have a positive total count")
    return p / total


def kl_candidate_distribution(hist: np.ndarray, i: int, num_levels: int) -> np.ndarray:
    """TensorRT's candidate Q: bins 0..i-1 merged into num_levels groups, then expanded back.

    Group g holds i // num_levels consecutive bins (the last group also the remainder); its total
    is spread evenly over the bins of the group that are non-zero in P, and Q is normalised.
    The outliers are not in Q (they are what quantization with threshold i loses).
    Paper: Migacz 2017.
    Used in: 03_clipping.
    """
    hist = np.asarray(hist, dtype=np.float64)
    _check_int(i, 1, "i", len(hist))
    _check_int(num_levels, 1, "num_levels", i)
    nonzero = kl_reference_distribution(hist, i) > 0
    merged = i // num_levels
    starts = np.arange(num_levels) * merged
    sums = np.add.reduceat(hist[:i], starts)
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    lengths = np.diff(np.append(starts, i))
    per_bin = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    q = np.repeat(per_bin, lengths) * nonzero
    total = q.sum()
    return q / total if total > 0 else q


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-10) -> float:
    """KL(P || Q) = sum_{P_i > 0} P_i log(P_i / Q_i); a Q_i = 0 where P_i > 0 is replaced by eps.

    Used in: 03_clipping.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], eps))))


def kl_divergences(
    hist: np.ndarray, num_levels: int, eps: float = 1e-10, start_bin: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P_i || Q_i) for every candidate i = start_bin .. len(hist) at once (start_bin defaults
    to num_levels and may not be smaller).

    The same numbers as kl_divergence(kl_reference_distribution(hist, i),
    kl_candidate_distribution(hist, i, num_levels), eps) for each i, computed from prefix sums:
    Q is constant on the non-zero bins of a group, so
    KL = sum_j P_j log P_j - sum_g P(group g) log Q_g, and both sums need only O(num_levels)
    work per candidate. Returns (candidates i, divergences).
    Paper: Migacz 2017.
    Used in: 03_clipping.
    """
    h = np.asarray(hist, dtype=np.float64)
    n = len(h)
    _check_int(num_levels, 1, "num_levels", n)
    start = num_levels if start_bin is None else _check_int(start_bin, num_levels, "start_bin", n)
    if h.ndim != 1 or np.any(h < 0) or h.sum() <= 0:
        raise ValueError("hist must be a 1-D array of non-negative counts with a positive total")
    cand = np.arange(start, n + 1)
    S = np.concatenate([[0.0], np.cumsum(h)])  # S[k] = sum(h[:k])
    nz = (h > 0).astype(np.float64)
    N = np.concatenate([[0.0], np.cumsum(nz)])

    def xlogx(v: np.ndarray) -> np.ndarray:
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)

    H = np.concatenate([[0.0], np.cumsum(xlogx(h))])
    T = S[-1]
    outliers = T - S[cand]
    last = h[cand - 1] + outliers  # bin i-1 of P, with the outliers folded in
    merged = cand // num_levels
    g = np.arange(num_levels)
    starts = merged[:, None] * g[None, :]  # (candidates, levels)
    ends = np.where(g[None, :] == num_levels - 1, cand[:, None], starts + merged[:, None])
    gsum = S[ends] - S[starts]  # Q's mass per group (no outliers)
    gcnt = N[ends] - N[starts]
    gcnt[:, -1] += (last > 0) - nz[cand - 1]  # bin i-1 is non-zero in P when it holds outliers
    pmass = gsum.copy()
    pmass[:, -1] += outliers
    sum_plogp = (H[cand - 1] + xlogx(last)) / T - np.log(T)
    Sq = S[cand][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        qbin = np.where((gcnt > 0) & (Sq > 0), gsum / (gcnt * Sq), 0.0)
    cross = np.sum(np.where(pmass > 0, pmass / T * np.log(np.maximum(qbin, eps)), 0.0), axis=1)
    return cand, sum_plogp - cross


@dataclass(frozen=True)
class KLResult:
    """The KL search over thresholds.

    Used in: 03_clipping.
    """

    threshold: float
    """The chosen clip |r|_max = i* * bin_width."""
    thresholds: np.ndarray
    """Every candidate threshold i * bin_width."""
    divergences: np.ndarray
    """KL(P || Q) for each candidate."""
    num_levels: int
    """Quantization levels per side used to build Q."""
    range: ClipRange
    """threshold as a range: [0, t] for one-sided data, [-t, t] otherwise."""


def kl_search(
    x: Tensor,
    num_bits: int = 8,
    bins: int = 2048,
    num_levels: int | None = None,
    skip_zeros: bool = True,
    start_bin: int = 128,
) -> KLResult:
    """TensorRT's entropy calibration: the threshold t with minimal KL(P || Q_t).

    1. histogram |x| into ``bins`` bins on [0, max|x|];
    2. for i = max(start_bin, num_levels) .. bins: P = first i bins with the outliers folded into
       the last one, Q = those i bins quantized to num_levels levels and expanded back;
    3. t = i* bin_width with i* = argmin KL(P || Q) (ties: the largest t).
    num_levels defaults to 2^(M-1) for two-sided data (128 for int8, TensorRT's choice: one
    sign's codes) and 2^M for one-sided data (all codes on [0, t]). TensorRT starts at i = 128
    whatever the bit width; starting lower lets a sparse histogram collapse: when every value
    but the smallest is folded into the bin of the smallest, P = Q is a single spike and
    KL = 0. Differences from TensorRT's pseudo-code: the candidate i = bins (no clipping) is
    included, and t = i * bin_width (the edge where outliers are folded), not
    (i + 0.5) * bin_width, so t never exceeds max|x|.
    skip_zeros=True leaves exact zeros out of the histogram, as ncnn's implementation does: the
    quantizer represents 0 exactly, and the ReLU spike at 0 would otherwise dominate bin 0.
    Degenerate data is handled exactly: all zeros gives t = 0, a single magnitude t = max|x|.
    Paper: Migacz, "8-bit Inference with TensorRT", GTC 2017.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    _check_int(bins, 2, "bins")
    x = _flat(x)
    side = _side(x)
    levels = num_levels if num_levels is not None else 2 ** (num_bits - (1 if side == "two" else 0))
    _check_int(levels, 1, "num_levels", bins)
    _check_int(start_bin, 1, "start_bin")
    a = x.abs().numpy()
    if skip_zeros and np.any(a > 0):
        a = a[a > 0]
    amax, amin = float(a.max()), float(a.min())
    if amax == 0.0 or amax == amin:  # degenerate: one magnitude, represented exactly at t = max|x|
        return KLResult(
            amax, np.array([amax]), np.array([0.0]), levels, _range_from_alpha(amax, side)
        )
    hist, _ = np.histogram(a, bins=bins, range=(0.0, amax))
    width = amax / bins
    cand, div = kl_divergences(hist, levels, start_bin=min(max(start_bin, levels), bins))
    best = int(np.flatnonzero(div == div.min())[-1])
    t = float(cand[best]) * width
    return KLResult(t, cand * width, div, levels, _range_from_alpha(t, side))


def kl_range(x: Tensor, num_bits: int = 8, bins: int = 2048) -> ClipRange:
    """TensorRT's KL threshold as a range (see ``kl_search``).

    Used in: 03_clipping.
    """
    return kl_search(x, num_bits, bins).range


# ----------------------------------------------------------------------------- PyTorch's observer
def histogram_observer_range(x: Tensor, num_bits: int = 8, bins: int = 2048) -> ClipRange:
    """The range PyTorch's HistogramObserver (quint8, per-tensor affine) searches for on x.

    Its search (``_non_linear_param_search``, from caffe2's norm_minimization.cc) greedily moves
    the histogram's lower or upper quantile bound inward by 1e-5 and stops at the first
    increase of an L2 error estimate, density * (end^3 - begin^3) / 3 per bin: an MSE search,
    not KL. It assumes dst_nbins = 2^8 = 256 levels whatever quant_min / quant_max say.
    Uses torch's private ``_non_linear_param_search`` (torch is pinned). num_bits in 2..8 sets
    quant_max = 2^num_bits - 1.
    Source: torch/ao/quantization/observer.py.
    Used in: 03_clipping.
    """
    from torch.ao.quantization.observer import HistogramObserver

    check_bits(num_bits, 2, 8)
    _check_int(bins, 2, "bins")
    x = _flat(x).float()
    if float(x.min()) == float(x.max()):
        return _with_zero(x.min(), x.max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = HistogramObserver(
            bins=bins,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
            quant_min=0,
            quant_max=2**num_bits - 1,
        )
        obs(x)
        lo, hi = obs._non_linear_param_search()
    return _with_zero(lo, hi)


# ----------------------------------------------------------------------------- the Laplace check
def model_grid_levels(alpha: float, num_bits: int) -> Tensor:
    """The slide's grid: [-alpha, alpha] cut into 2^M equal intervals, levels on every edge.

    levels = k * D for k = -2^(M-1) .. 2^(M-1), D = 2 alpha / 2^M: 2^M + 1 levels, one more than
    an M-bit code has. This is the grid ACIQ's formula describes; it is used only to check the
    formula, never to quantize a network (that goes through qparams_with_range).
    Paper: Banner et al. 2019, fig. 1.
    Used in: 03_clipping.
    """
    check_bits(num_bits)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    half = 2 ** (num_bits - 1)
    return torch.arange(-half, half + 1, dtype=torch.float64) * (2.0 * alpha / 2**num_bits)


def affine_levels(rng: ClipRange, num_bits: int) -> Tensor:
    """Every value an M-bit code can take in the range rng: S (q - Z) for q = q_min .. q_max.

    S, Z from qparams_with_range (asymmetric), so these are exactly the real quantizer's levels.
    Used in: 03_clipping.
    """
    qmin, qmax = qrange(num_bits)
    codes = torch.arange(qmin, qmax + 1, dtype=torch.int32)
    qp = range_qparams(codes.float(), rng, num_bits)
    return dequantize(codes, qp).double()


def quantize_to_levels(x: Tensor, levels: Tensor) -> Tensor:
    """Round every x to its nearest level (a sorted 1-D tensor): x_hat = argmin_l |x - l|.

    Used in: 03_clipping (simulating the slide's grid).
    """
    levels = torch.as_tensor(levels, dtype=torch.float64)
    if levels.ndim != 1 or levels.numel() < 2 or bool((levels[1:] <= levels[:-1]).any()):
        raise ValueError("levels must be a strictly increasing 1-D tensor with at least 2 entries")
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x.double(), mids)]


def _partial_moments(
    a: np.ndarray, b: np.ndarray, prior: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int_a^b x^k f(x) dx, k = 0, 1, 2, for the unit-scale prior density f (+-inf allowed)."""
    from scipy import special

    if prior == "gauss":

        def pdf(t: np.ndarray) -> np.ndarray:  # phi(t), 0 at +-inf
            fin = np.isfinite(t)
            return np.where(
                fin, np.exp(-np.square(np.where(fin, t, 0.0)) / 2) / math.sqrt(2 * math.pi), 0.0
            )

        def tpdf(t: np.ndarray) -> np.ndarray:  # t phi(t), 0 at +-inf
            fin = np.isfinite(t)
            return np.where(fin, np.where(fin, t, 0.0) * pdf(t), 0.0)

        m0 = special.ndtr(b) - special.ndtr(a)
        m1 = pdf(a) - pdf(b)
        m2 = m0 + tpdf(a) - tpdf(b)
        return m0, m1, m2

    # Laplace(0, 1): f = exp(-|x|) / 2; split at 0 and use the antiderivatives on [0, inf)
    def upper(t: np.ndarray) -> tuple[np.ndarray, ...]:  # int_t^inf x^k e^-x / 2 dx for t >= 0
        fin = np.isfinite(t)
        tt = np.where(fin, t, 0.0)
        e = np.where(fin, np.exp(-tt), 0.0)
        return e / 2, (tt + 1) * e / 2, (tt * tt + 2 * tt + 2) * e / 2

    def on_pos(lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:  # 0 <= lo <= hi
        u_lo, u_hi = upper(lo), upper(hi)
        return [ul - uh for ul, uh in zip(u_lo, u_hi)]

    pos = on_pos(np.clip(a, 0, None), np.clip(b, 0, None))
    neg = on_pos(
        np.clip(-b, 0, None), np.clip(-a, 0, None)
    )  # reflect x -> -x: odd moment changes sign
    return pos[0] + neg[0], pos[1] - neg[1], pos[2] + neg[2]


def expected_mse_of_levels(levels: Tensor, prior: Prior = "laplace") -> tuple[float, float]:
    """Exact E[(X - Q(X))^2] for nearest-level rounding onto ``levels``, X from a unit-scale prior.

    Sum over the cells between midpoints of int (x - l)^2 f(x) dx, as (clipping, rounding):
    clipping is the part beyond the outermost levels, rounding the rest. No approximation.
    Used in: 03_clipping.
    """
    _check_choice(prior, PRIORS, "prior")
    lv = torch.as_tensor(levels, dtype=torch.float64).numpy()
    if lv.ndim != 1 or lv.size < 2 or np.any(np.diff(lv) <= 0):
        raise ValueError("levels must be a strictly increasing 1-D tensor with at least 2 entries")
    edges = np.concatenate([[lv[0]], (lv[1:] + lv[:-1]) / 2, [lv[-1]]])
    m0, m1, m2 = _partial_moments(edges[:-1], edges[1:], prior)
    rounding = float(np.sum(m2 - 2 * lv * m1 + lv * lv * m0))
    clip = 0.0
    for lo, hi, level in (
        (np.array([-np.inf]), np.array([lv[0]]), lv[0]),
        (np.array([lv[-1]]), np.array([np.inf]), lv[-1]),
    ):
        c0, c1, c2 = _partial_moments(lo, hi, prior)
        clip += float(c2[0] - 2 * level * c1[0] + level * level * c0[0])
    return clip, rounding


def sample_prior(prior: Prior, n: int, seed: int = 0, stratified: bool = True) -> Tensor:
    """n samples of a unit-scale Laplace(0, 1) or Gaussian(0, 1), float64, reproducible by seed.

    Inverse-CDF sampling x = F^-1(u). With stratified=True, u_i = (i + U_i) / n, one uniform draw
    in each of n equal strata (stratified Monte Carlo: still random, far less variance in the
    tails than i.i.d. u); otherwise u_i ~ U(0, 1) i.i.d.
    Laplace: F^-1(u) = -sign(u - 1/2) log(1 - 2 |u - 1/2|);  Gaussian: F^-1 = ndtri.
    Used in: 03_clipping.
    """
    from scipy import special

    _check_choice(prior, PRIORS, "prior")
    _check_int(n, 1, "n")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if stratified:
        u = (torch.arange(n, dtype=torch.float64) + u) / n
    u = u.clamp(1e-300, 1 - 1e-16)
    if prior == "gauss":
        return torch.from_numpy(special.ndtri(u.numpy()))
    c = u - 0.5
    return -torch.sign(c) * torch.log1p(-2 * c.abs())


@functools.lru_cache(maxsize=4)
def _antithetic_uniform(n: int, seed: int) -> Tensor:
    """n uniforms in (0, 1): stratified, shuffled, and in antithetic pairs (u, 1 - u) on
    neighbouring positions, so that neighbouring (nearly equal) stratified x get opposite noise."""
    g = torch.Generator().manual_seed(seed)
    m = (n + 1) // 2
    u = (torch.arange(m, dtype=torch.float64) + torch.rand(m, generator=g, dtype=torch.float64)) / m
    u = u[torch.randperm(m, generator=g)]
    return torch.stack([u, 1.0 - u], dim=1).flatten()[:n]


def simulated_mse(
    x: Tensor, alpha: float, num_bits: int, kind: Simulation = "paper", seed: int = 0
) -> tuple[float, float]:
    """Measured (clipping, rounding) MSE of quantizing the samples x with clip alpha.

    kind "paper": round every x to the nearest level of model_grid_levels(alpha) (the slide's grid);
         a value beyond +-alpha counts as clipped.
    kind "noise": ACIQ's own model instead of rounding:
         x_hat = clamp(x, -alpha, alpha) + D (U - 1/2),
         D = 2 alpha / 2^M, U ~ U(0, 1) independent of x (stratified, shuffled, in antithetic
         pairs, from ``seed``; the same U for every alpha). Its expectation is exactly the
         formula of aciq_expected_mse.
    Used in: 03_clipping.
    """
    _check_choice(kind, SIMULATIONS, "kind")
    x = x.double().flatten()
    if kind == "paper":
        levels = model_grid_levels(alpha, num_bits)
        x_hat = quantize_to_levels(x, levels)
        clipped = (x < levels[0]) | (x > levels[-1])
        err = (x - x_hat) ** 2
        total, clip = float(err.sum()), float((err * clipped).sum())
        return clip / x.numel(), (total - clip) / x.numel()
    n = x.numel()
    u = _antithetic_uniform(n, seed)
    step = 2.0 * alpha / 2**num_bits
    x_c = x.clamp(-alpha, alpha)
    x_hat = x_c + step * (u - 0.5)
    clip = float(((x - x_c) ** 2).sum()) / n
    return clip, float(((x - x_hat) ** 2).sum()) / n - clip


def simulated_alpha(x: Tensor, num_bits: int, kind: Simulation = "paper") -> float:
    """argmin over alpha of the simulated MSE on the samples x (coarse grid + Brent).

    Used in: 03_clipping.
    """
    return minimize_1d(
        lambda a: sum(simulated_mse(x, a, num_bits, kind)), 0.5, 12.0, n_coarse=16, xatol=1e-4
    )


def exact_alpha(num_bits: int, prior: Prior = "laplace") -> float:
    """argmin over alpha of the exact expected MSE of rounding onto the slide's grid
    (expected_mse_of_levels of model_grid_levels(alpha)): no Monte Carlo, no approximation.

    Used in: 03_clipping.
    """
    return minimize_1d(
        lambda a: sum(expected_mse_of_levels(model_grid_levels(a, num_bits), prior)),
        0.3,
        20.0,
        n_coarse=80,
        xatol=1e-7,
    )


# ----------------------------------------------------------------------------- a network
ESTIMATORS: dict[str, Callable[[Tensor, int], ClipRange]] = {
    "minmax": lambda x, bits: minmax_range(x),
    "mean_minmax": lambda x, bits: mean_minmax_range(x, batch_size=1),
    "percentile_99.9": lambda x, bits: percentile_range(x, 99.9),
    "mse": lambda x, bits: mse_range(x, bits),
    "aciq_laplace": lambda x, bits: aciq_range(x, bits, "laplace"),
    "aciq_gauss": lambda x, bits: aciq_range(x, bits, "gauss"),
    "octav": lambda x, bits: octav_range(x, bits),
    "kl": lambda x, bits: kl_range(x, bits),
    "torch_histogram": lambda x, bits: histogram_observer_range(x, min(bits, 8)),
}
"""Post-training estimators by name: f(activations (N, features), num_bits) -> ClipRange.
mean_minmax averages per-sample min/max (dim 0 = samples).

Used in: 03_clipping.
"""


def insert_ema_observers(
    model: nn.Sequential, alphas: Sequence[float] = (0.01,), history: int = 0
) -> nn.Sequential:
    """A Sequential with an EMAObserver after every ReLU of ``model`` (the modules are shared).

    The observers are identities in the forward pass, so the network computes the same thing;
    they record the EMA of each ReLU output's batch min/max whenever the model trains.
    Used in: 03_clipping.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"model must be an nn.Sequential (e.g. ll.MLP), got {type(model).__name__}"
        )
    layers: list[nn.Module] = []
    for m in model:
        layers.append(m)
        if isinstance(m, nn.ReLU):
            layers.append(EMAObserver(alphas, history))
    return nn.Sequential(*layers)


def ema_observers(model: nn.Sequential) -> list[EMAObserver]:
    """The EMAObservers of ``model`` in order (one per hidden activation).

    Used in: 03_clipping.
    """
    return [m for m in model if isinstance(m, EMAObserver)]


def _check_sequential(model: nn.Module) -> None:
    if not isinstance(model, nn.Sequential) or not all(
        isinstance(m, (nn.Linear, nn.ReLU, EMAObserver)) for m in model
    ):
        raise ValueError(
            "model must be an nn.Sequential of Linear, ReLU and EMAObserver modules (e.g. ll.MLP)"
        )


@torch.no_grad()
def hidden_activations(model: nn.Sequential, X: Tensor) -> list[Tensor]:
    """The output of every ReLU of a float MLP on X, each of shape (N, width).

    Used in: 03_clipping.
    """
    _check_sequential(model)
    acts, h = [], X
    for m in model:
        if isinstance(m, EMAObserver):
            continue
        h = m(h)
        if isinstance(m, nn.ReLU):
            acts.append(h.clone())
    return acts


@torch.no_grad()
def fake_quant_forward(
    model: nn.Sequential,
    X: Tensor,
    act_ranges: Sequence[ClipRange],
    num_bits: int,
    weight_bits: int = 8,
) -> Tensor:
    """Logits of the MLP with weights and hidden activations fake-quantized.

    W_fq: symmetric, per output channel, weight_bits (choose_qparams); every ReLU output h_k is
    replaced by quantize_with_range(h_k, act_ranges[k], num_bits) (asymmetric, per tensor).
    The input pixels and the logits stay in float.
    Used in: 03_clipping.
    """
    _check_sequential(model)
    check_bits(num_bits)
    check_bits(weight_bits, name="weight_bits")
    n_relu = sum(isinstance(m, nn.ReLU) for m in model)
    if len(act_ranges) != n_relu:
        raise ValueError(
            f"act_ranges must have one range per ReLU ({n_relu}), got {len(act_ranges)}"
        )
    h, k = X, 0
    for m in model:
        if isinstance(m, nn.Linear):
            W = m.weight.detach()
            W_fq = fake_quantize(
                W, choose_qparams(W, weight_bits, symmetric=True, granularity=PerChannel(0))
            )
            h = nn.functional.linear(h, W_fq, m.bias)
        elif isinstance(m, nn.ReLU):
            h = quantize_with_range(torch.relu(h), ClipRange(*act_ranges[k]), num_bits)
            k += 1
    return h


def calibrate(acts: Sequence[Tensor], estimator: str, num_bits: int) -> list[ClipRange]:
    """One range per activation: ESTIMATORS[estimator](acts[k], num_bits).

    Used in: 03_clipping.
    """
    _check_choice(estimator, list(ESTIMATORS), "estimator")
    return [ESTIMATORS[estimator](a, num_bits) for a in acts]


@dataclass(frozen=True)
class Evaluation:
    """How well a set of activation ranges does on a test set.

    Used in: 03_clipping.
    """

    act_mse: float
    """Mean over hidden layers of mean((h - Q(h))^2), h the float model's test activations."""
    accuracy: float
    """Test accuracy with 8-bit weights and every hidden activation quantized."""


def evaluate_ranges(
    model: nn.Sequential,
    X: Tensor,
    y: Tensor,
    act_ranges: Sequence[ClipRange],
    num_bits: int,
    acts: Sequence[Tensor] | None = None,
) -> Evaluation:
    """Activation MSE and accuracy of the quantized MLP with the given activation ranges.

    act_mse = mean_k mean((h_k - Q(h_k; range_k))^2) on the float model's activations of X
    (pass ``acts`` = hidden_activations(model, X) to reuse them); accuracy from
    fake_quant_forward.
    Used in: 03_clipping.
    """
    acts = hidden_activations(model, X) if acts is None else acts
    if len(acts) != len(act_ranges):
        raise ValueError(
            f"act_ranges must have one range per activation ({len(acts)}), got {len(act_ranges)}"
        )
    mse = [
        float(((h - quantize_with_range(h, r, num_bits)) ** 2).mean())
        for h, r in zip(acts, act_ranges)
    ]
    logits = fake_quant_forward(model, X, act_ranges, num_bits)
    acc = float((logits.argmax(1) == y).float().mean())
    return Evaluation(sum(mse) / len(mse), acc)


# ----------------------------------------------------------------------------- widget
def plot_clip(
    x: Tensor,
    num_bits: int,
    hi: float,
    axes: Sequence[Any] | None = None,
    marks: dict[str, float] | None = None,
    n_curve: int = 80,
) -> dict[str, float]:
    """Two panels for a one-sided x clipped to [0, hi] (or [-hi, hi] for two-sided x):
    left, the histogram with the clipped mass and the 2^M levels; right, MSE against the clip
    value split into clipping and rounding error, with ``marks`` (name -> clip) drawn on it.

    Returns {"hi", "clipped_fraction", "clip_mse", "round_mse"}.
    Used in: 03_clipping.
    """
    import matplotlib.pyplot as plt

    x = x.detach().float().flatten()
    side = _side(x)
    amax = float(x.abs().max())
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    ax_h, ax_c = axes
    rng = _range_from_alpha(hi, side)
    clip_e, round_e = mse_split(x, rng, num_bits)
    levels = affine_levels(rng, num_bits)
    clipped = float(((x < levels[0]) | (x > levels[-1])).float().mean())
    ax_h.hist(x.numpy(), bins=100, color="0.6", log=True)
    for lv in levels.tolist():
        ax_h.axvline(lv, color="tab:blue", lw=0.8 if num_bits <= 5 else 0.2)
    for a, b in ((float(x.min()), float(levels[0])), (float(levels[-1]), float(x.max()))):
        if b > a:
            ax_h.axvspan(a, b, color="tab:red", alpha=0.2)
    ax_h.set_title(
        f"{num_bits}-bit, clip at {hi:.3f}: {100 * clipped:.2f}% of values clipped (red)",
        fontsize=9,
    )
    ax_h.set_xlabel("value (blue: quantization levels)")
    ax_h.set_ylabel("count (log)")
    top = max([amax, float(hi)] + list((marks or {}).values()))
    grid = np.linspace(top / n_curve, top, n_curve)
    parts = np.array([mse_split(x, _range_from_alpha(float(a), side), num_bits) for a in grid])
    ax_c.plot(grid, parts[:, 0], label="clipping error", color="tab:red")
    ax_c.plot(grid, parts[:, 1], label="rounding error", color="tab:blue")
    ax_c.plot(grid, parts.sum(1), label="total MSE", color="k")
    ax_c.axvline(hi, color="k", ls=":", lw=1)
    y_top = float(parts.sum(1).max())
    for k, (name, v) in enumerate(sorted((marks or {}).items(), key=lambda kv: kv[1])):
        ax_c.axvline(v, lw=0.8, ls="--", color="tab:green")
        ax_c.text(
            v,
            y_top * 0.1 ** (1.2 * (k % 3)),
            f" {name}",
            rotation=90,
            fontsize=7,
            va="top",
            color="tab:green",
        )
    ax_c.set_yscale("log")
    ax_c.set_xlabel("clip value |r|_max")
    ax_c.set_ylabel("MSE")
    ax_c.set_title(
        f"clipping {clip_e:.2e} + rounding {round_e:.2e} = {clip_e + round_e:.2e}", fontsize=9
    )
    ax_c.legend(fontsize=7)
    return {"hi": float(hi), "clipped_fraction": clipped, "clip_mse": clip_e, "round_mse": round_e}


def clip_explorer(x: Tensor, num_bits: int = 4, marks: dict[str, float] | None = None) -> Any:
    """An ipywidgets explorer: a clip slider and a bit-width slider over ``plot_clip``.

    Used in: 03_clipping.
    """
    from .explorers import explorer, float_slider, int_slider

    check_bits(num_bits)
    x = x.detach().float().flatten()
    amax = float(x.abs().max())
    if amax == 0.0:
        raise ValueError("x must have a non-zero value to clip")

    def draw(num_bits: int, clip: float) -> None:
        plot_clip(x, num_bits, clip, marks=marks)

    return explorer(draw, title="Clipping trades clipping error against rounding error",
                    num_bits=int_slider(num_bits, 2, 8, description="num_bits"),
                    clip=float_slider(amax / 2, amax / 100, amax, amax / 200, description="clip",
                                      readout_format=".3f", width="500px"))
