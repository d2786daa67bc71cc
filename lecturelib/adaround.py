"""Rounding weights: nearest, floor, ceil, stochastic, best-of-K stochastic and AdaRound.

Scope: once a scale S (and zero point Z) is fixed, every weight w still has two candidate
codes, floor(w / S) and floor(w / S) + 1. Round-to-nearest picks the closer one for each weight
on its own; AdaRound picks them jointly so that the layer's *output* changes least.

    w_tilde = S (clamp(floor(w / S) + Z + r, q_min, q_max) - Z),   r in {0, 1}

The pieces, kept apart so each can be tested on its own (as in AIMET / Brevitas):

* ``round_weight``: nearest (the same as ``quantizers.fake_quantize``), floor, ceil, stochastic.
* ``rectified_sigmoid``  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
* ``round_reg``          f_reg(h) = sum(1 - |2h - 1|^beta)
* ``beta_schedule``      beta: none during the warm start, then annealed from 20 to 2
* ``recon_moments`` / ``recon_loss``: the layer-output error E ||W x - W_tilde x_hat||^2
  (summed over outputs, averaged over samples) from second moments of the inputs, so one
  optimisation step costs the same for 64 or 64,000 calibration images.
* ``adaround_layer(layer, x_calib, cfg) -> AdaRoundResult``: the driver for one layer;
  ``quantize_weights(model, x_calib, method, cfg)``: layer by layer through a network, each
  layer seeing inputs from the already-quantized layers before it.

Nothing is written to disk and no layer passed in is modified: quantized copies are returned.

Paper: Nagel, Amjad, van Baalen, Louizos & Blankevoort, "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020. Lecture: "Neural Network Quantization (cont'd)",
rounding slides.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .harness import progress
from .quantizers import (
    PerChannel,
    QParams,
    block_minmax,
    check_bits,
    check_tensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
)

Tensor = torch.Tensor

ROUNDING_MODES = ("nearest", "floor", "ceil", "stochastic")
"""Modes of ``round_weight``."""
METHODS = ("nearest", "floor", "ceil", "stochastic", "best_of_k", "adaround")
"""Methods of ``quantize_weights``."""
SCALE_METHODS = ("max", "mse")
"""How ``weight_qparams`` picks the per-channel scale."""
ZETA = 1.1
"""Stretch of the rectified sigmoid (the paper's zeta)."""
GAMMA = -0.1
"""Offset of the rectified sigmoid (the paper's gamma)."""


# ----------------------------------------------------------------------------- config
@dataclass
class AdaRoundConfig:
    """How AdaRound optimises one layer (defaults: the paper's, scaled to a CPU)."""

    num_bits: int = 4
    """Bits per weight code, 2..8."""
    scale_method: str = "max"
    """Per-channel scale: "max" (S = max|w| / q_max) or "mse" (clipped to minimise ||w - Q(w)||^2)."""
    iters: int = 1000
    """Adam steps on V."""
    lr: float = 3e-2
    """Adam learning rate (on the digits CNN 1e-2 left a few h(V) undecided after 1000 steps)."""
    lam: float = 1.0
    """lambda, weight of the rounding regulariser f_reg against the reconstruction loss."""
    beta_start: float = 20.0
    """beta when the regulariser switches on (a high beta only pushes h values near 0 or 1)."""
    beta_end: float = 2.0
    """beta at the last step (a low beta pushes every h value towards 0 or 1)."""
    warm_start: float = 0.2
    """Fraction of the steps with the reconstruction loss alone (no regulariser)."""
    zeta: float = ZETA
    """Stretch of the rectified sigmoid."""
    gamma: float = GAMMA
    """Offset of the rectified sigmoid."""
    record_every: int = 10
    """Log beta and both loss terms every this many steps (0: never)."""
    snapshot_iters: tuple[int, ...] = ()
    """Steps at which to keep a copy of h(V) (for plots); the last step is always kept."""

    def __post_init__(self) -> None:
        check_bits(self.num_bits, 2, 8, "num_bits")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {self.scale_method!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be a positive integer, got {self.iters!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not (math.isfinite(self.beta_end) and self.beta_end > 0 and math.isfinite(self.beta_start)):
            raise ValueError(f"beta_end must be > 0 and beta_start finite, got {self.beta_end!r}, {self.beta_start!r}")
        if self.beta_start < self.beta_end:
            raise ValueError(
                f"beta_start must be >= beta_end (beta is annealed from high to low), "
                f"got beta_start={self.beta_start!r} < beta_end={self.beta_end!r}"
            )
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(f"warm_start must be in [0, 1), got {self.warm_start!r}")
        if not (self.zeta > 1.0 and self.gamma < 0.0):
            raise ValueError(f"zeta must be > 1 and gamma < 0 (so h reaches 0 and 1), got {self.zeta!r}, {self.gamma!r}")
        if isinstance(self.record_every, bool) or not isinstance(self.record_every, int) or self.record_every < 0:
            raise ValueError(f"record_every must be an integer >= 0, got {self.record_every!r}")
        for it in self.snapshot_iters:
            if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= self.iters:
                raise ValueError(f"snapshot_iters must hold integers in 0..iters={self.iters}, got {it!r}")


# ----------------------------------------------------------------------------- scales
def weight_qparams(W: Tensor, num_bits: int, scale_method: str = "max", grid: int = 100) -> QParams:
    """Symmetric per-output-channel qparams for a weight (axis 0), from its max or an MSE search.

    max: S_c = max|W_c| / q_max                       (choose_qparams, PerChannel(0))
    mse: S_c = qparams_from_range(-a max|W_c|, a max|W_c|) with a in {1/grid, 2/grid, ..., 1}
         chosen per channel to minimise ||W_c - Q(W_c)||^2 with round-to-nearest.
    The MSE search clips the largest weights to put the levels where most weights are.
    Papers: Krishnamoorthi 2018 (per-channel); Banner et al. 2019 / Nagel et al. 2021 (MSE ranges).
    Used in: 04_adaround.
    """
    check_tensor(W, "W")
    check_bits(num_bits, 2, 8, "num_bits")
    if scale_method not in SCALE_METHODS:
        raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {scale_method!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    W = W.detach().float()
    qp = choose_qparams(W, num_bits, symmetric=True, granularity=PerChannel(0))
    if scale_method == "max":
        return qp
    # all grid points at once: a leading axis of length `grid`, one scale per (a, channel)
    lo, hi = block_minmax(W, qp.block_size)  # (C_out, 1, ...)
    a = torch.arange(1, grid + 1, dtype=torch.float32).reshape(-1, *[1] * W.ndim) / grid
    scale, zp = qparams_from_range(a * lo, a * hi, num_bits, symmetric=True)  # (grid, C_out, 1, ...)
    shape = (grid, *W.shape)
    cand = QParams(scale, zp, qp.qmin, qp.qmax, (1, *qp.block_size), shape)
    W_rep = W.unsqueeze(0).expand(shape).contiguous()
    err = ((W_rep - fake_quantize(W_rep, cand)) ** 2).reshape(grid, W.shape[0], -1).sum(2)  # (grid, C_out)
    best = grid - 1 - err.flip(0).argmin(0)  # among ties, the widest range
    best_scale = scale.reshape(grid, -1)[best, torch.arange(W.shape[0])].reshape(qp.scale.shape)
    return QParams(best_scale, qp.zero_point, qp.qmin, qp.qmax, qp.block_size, qp.shape)


# ----------------------------------------------------------------------------- rounding
def _scaled(W: Tensor, qp: QParams) -> Tensor:
    """W / S + Z in float32, computed as W * (1 / S) like ``quantizers.quantize`` does."""
    check_tensor(W, "W")
    if tuple(W.shape) != qp.shape:
        raise ValueError(f"W has shape {tuple(W.shape)} but the qparams were chosen for shape {qp.shape}")
    return W.float() * qp.expand(1.0 / qp.scale) + qp.expand(qp.zero_point).float()


def _from_codes(codes: Tensor, qp: QParams) -> Tensor:
    """S (clamp(codes, q_min, q_max) - Z): float codes to dequantized weights."""
    return dequantize(torch.clamp(codes, qp.qmin, qp.qmax).to(torch.int32), qp)


def round_weight(W: Tensor, qp: QParams, mode: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
    """Fake-quantize W with a chosen rounding; returns S (clamp(code, q_min, q_max) - Z).

    nearest:    code = round(W / S) + Z        (half to even; identical to quantizers.fake_quantize)
    floor:      code = floor(W / S) + Z
    ceil:       code = ceil(W / S) + Z
    stochastic: code = floor(W / S) + Z + Bernoulli(W / S - floor(W / S))   (unbiased: E[code] = W / S + Z)
    Papers: Gupta et al., "Deep learning with limited numerical precision", ICML 2015 (stochastic
    rounding); Nagel et al. 2020, Table 1 (all four compared).
    Used in: 04_adaround.
    """
    if mode not in ROUNDING_MODES:
        raise ValueError(f"mode must be one of {ROUNDING_MODES}, got {mode!r}")
    if mode == "nearest":
        return fake_quantize(W, qp)
    x = _scaled(W, qp)
    if mode == "floor":
        return _from_codes(torch.floor(x), qp)
    if mode == "ceil":
        return _from_codes(torch.ceil(x), qp)
    lo = torch.floor(x)
    u = torch.rand(x.shape, generator=generator)
    return _from_codes(lo + (u < x - lo).float(), qp)


# ----------------------------------------------------------------------------- AdaRound loss terms
def rectified_sigmoid(V: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1): a sigmoid stretched past [0, 1] and clipped.

    The stretch lets h reach exactly 0 and 1 at finite V, where its gradient is 0, so a
    weight that has decided stays decided. zeta = 1.1, gamma = -0.1 as in the paper.
    Paper: Nagel et al. 2020, eq. 23 (from Louizos et al., "Learning sparse neural networks
    through L0 regularization", 2018).
    Used in: 04_adaround.
    """
    if not isinstance(V, Tensor) or not V.is_floating_point():
        raise ValueError(f"V must be a floating-point torch.Tensor, got {type(V).__name__}")
    if not (zeta > 1.0 and gamma < 0.0):
        raise ValueError(f"zeta must be > 1 and gamma < 0, got zeta={zeta!r}, gamma={gamma!r}")
    return torch.clamp(torch.sigmoid(V) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """V with h(V) = h for h in [0, 1):  V = log(p / (1 - p)), p = (h - gamma) / (zeta - gamma).

    AdaRound starts from V = h^-1(W / S - floor(W / S)), so the first soft weight equals W.
    Paper: Nagel et al. 2020, sec. 5 (initialisation); AIMET's AdaRound does the same.
    Used in: 04_adaround.
    """
    if not (zeta > 1.0 and gamma < 0.0):
        raise ValueError(f"zeta must be > 1 and gamma < 0, got zeta={zeta!r}, gamma={gamma!r}")
    if bool((h < 0).any()) or bool((h > 1).any()):
        raise ValueError("h must lie in [0, 1]")
    p = (h - gamma) / (zeta - gamma)
    return torch.log(p) - torch.log1p(-p)


def round_reg(h: Tensor, beta: float) -> Tensor:
    """f_reg(h) = sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1, largest (1 each) at h = 1/2.

    A large beta gives a flat-topped bump: only h already near 0 or 1 feel a pull. A small
    beta pulls every h. Annealing beta from high to low lets h first follow the
    reconstruction loss and then forces every h to 0 or 1.
    Paper: Nagel et al. 2020, eq. 24.
    Used in: 04_adaround.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if not isinstance(h, Tensor):
        raise ValueError(f"h must be a torch.Tensor, got {type(h).__name__}")
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_schedule(step: int, cfg: AdaRoundConfig) -> float | None:
    """beta at a step: None in the warm start (no regulariser), then cosine from beta_start to beta_end.

    t = (step - warm) / (iters - warm),  beta = beta_end + (beta_start - beta_end) (1 + cos(pi t)) / 2
    with warm = warm_start * iters (cosine annealing as in AIMET's AdaRound; the paper anneals
    beta from 20 to 2 without naming a shape).
    Paper: Nagel et al. 2020, sec. 5 (warm start, then beta from 20 to 2).
    Used in: 04_adaround.
    """
    if not isinstance(cfg, AdaRoundConfig):
        raise ValueError(f"cfg must be an AdaRoundConfig, got {type(cfg).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.iters:
        raise ValueError(f"step must be an integer in 0..iters={cfg.iters}, got {step!r}")
    warm = int(cfg.warm_start * cfg.iters)
    if step < warm:
        return None
    t = (step - warm) / max(cfg.iters - warm, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * 0.5 * (1.0 + math.cos(math.pi * t))


def soft_weight(W: Tensor, qp: QParams, V: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """AdaRound's soft-quantized weight:  W_tilde = S (clamp(floor(W / S) + Z + h(V), q_min, q_max) - Z).

    Differentiable in V. With h(V) in {0, 1} it is an ordinary fake-quantized weight.
    Paper: Nagel et al. 2020, eq. 22.
    Used in: 04_adaround.
    """
    if tuple(V.shape) != tuple(W.shape):
        raise ValueError(f"V must have W's shape {tuple(W.shape)}, got {tuple(V.shape)}")
    return _SoftQuant(W, qp)(rectified_sigmoid(V, zeta, gamma))


class _SoftQuant:
    """floor(W / S) + Z, S and Z expanded to W's shape, computed once; call with h for W_tilde."""

    def __init__(self, W: Tensor, qp: QParams):
        x = _scaled(W.detach(), qp)
        self.floor, self.rest = torch.floor(x), x - torch.floor(x)
        self.scale, self.zp = qp.expand(qp.scale), qp.expand(qp.zero_point).float()
        self.qmin, self.qmax = qp.qmin, qp.qmax

    def __call__(self, h: Tensor) -> Tensor:
        return (torch.clamp(self.floor + h, self.qmin, self.qmax) - self.zp) * self.scale


# ----------------------------------------------------------------------------- reconstruction loss
def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(
                "layer must be an nn.Conv2d with groups=1, padding_mode='zeros' and numeric padding, "
                f"got groups={layer.groups}, padding_mode={layer.padding_mode!r}, padding={layer.padding!r}"
            )
    elif not isinstance(layer, nn.Linear):
        raise ValueError(f"layer must be an nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def layer_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows the flattened weight multiplies: (N, in) for Linear, im2col for Conv2d.

    Linear: x (N, in) -> (N, in).  Conv2d: x (N, C, H, W) -> (N * L, C * kh * kw), L output positions,
    so that conv(x, W) at every position is W.reshape(C_out, -1) @ column.
    Paper: Chellapilla, Puri & Simard, "High performance convolutional neural networks for document
    processing", 2006 (convolution as a matrix product).
    Used in: 04_adaround.
    """
    _check_layer(layer)
    check_tensor(x, "x")
    if isinstance(layer, nn.Linear):
        if x.ndim != 2 or x.shape[1] != layer.in_features:
            raise ValueError(f"x must have shape (N, {layer.in_features}), got {tuple(x.shape)}")
        return x.float()
    if x.ndim != 4 or x.shape[1] != layer.in_channels:
        raise ValueError(f"x must have shape (N, {layer.in_channels}, H, W), got {tuple(x.shape)}")
    cols = F.unfold(x.float(), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass(frozen=True)
class ReconMoments:
    """Second moments that give the layer-output error of any candidate weight in O(out * in^2)."""

    C: Tensor
    """(D, D) E[x_hat x_hat^T], summed over output positions, averaged over samples."""
    G: Tensor
    """(D, out) E[x_hat (x - x_hat)^T] W^T: the cross term with the float network's input x."""
    const: float
    """E ||W (x - x_hat)||^2: the error already present in the input (no weight can remove it)."""
    target_energy: float
    """E ||W x||^2, to turn the loss into a relative error."""
    n_samples: int
    """Number of calibration samples (images) the moments average over."""


def recon_moments(layer: nn.Module, x_calib: Tensor, x_float: Tensor | None = None) -> ReconMoments:
    """Moments for the reconstruction loss E ||W x - W_tilde x_hat||^2 of a Linear or Conv2d layer.

    x_hat = x_calib (the input in the network whose earlier layers are already quantized),
    x = x_float (the float network's input; defaults to x_calib). With dW = W - W_tilde and
    d = x - x_hat, the error is W d + dW x_hat, so
        E||.||^2 = tr(dW C dW^T) + 2 tr(dW G) + const,
        C = E[x_hat x_hat^T],  G = E[x_hat d^T] W^T,  const = E||W d||^2,
    E = sum over output positions (conv) / number of samples. Computed in float64.
    Paper: Nagel et al. 2020, sec. 4 and 5 (layer-wise loss; x_hat from the quantized network).
    Used in: 04_adaround.
    """
    _check_layer(layer)
    if x_float is None:
        x_float = x_calib
    if tuple(x_float.shape) != tuple(x_calib.shape):
        raise ValueError(f"x_float must have x_calib's shape {tuple(x_calib.shape)}, got {tuple(x_float.shape)}")
    n = x_calib.shape[0]
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()  # (out, D)
    xq = layer_columns(layer, x_calib).double()  # (N*L, D)
    xf = layer_columns(layer, x_float).double()
    d = xf - xq
    C = xq.T @ xq / n
    G = (xq.T @ d / n) @ W.T
    const = float(((d @ W.T) ** 2).sum() / n)
    energy = float(((xf @ W.T) ** 2).sum() / n)
    return ReconMoments(C.float(), G.float(), const, energy, n)


def recon_loss(W_tilde: Tensor, W: Tensor, m: ReconMoments) -> Tensor:
    """E ||W x - W_tilde x_hat||^2 = tr(dW C dW^T) + 2 tr(dW G) + const, dW = W - W_tilde.

    The error of the layer output, summed over outputs and averaged over samples, from the
    moments of ``recon_moments``: its cost does not grow with the calibration set.
    Differentiable in W_tilde.
    Paper: Nagel et al. 2020, eq. 20-21.
    Used in: 04_adaround.
    """
    if tuple(W_tilde.shape) != tuple(W.shape):
        raise ValueError(f"W_tilde must have W's shape {tuple(W.shape)}, got {tuple(W_tilde.shape)}")
    dW = (W.detach().float() - W_tilde).reshape(W.shape[0], -1)  # (out, D)
    if dW.shape[1] != m.C.shape[0]:
        raise ValueError(f"the moments are for {m.C.shape[0]} inputs per output, W has {dW.shape[1]}")
    return ((dW @ m.C) * dW).sum() + 2.0 * (dW * m.G.T).sum() + m.const


def recon_loss_direct(layer: nn.Module, W_tilde: Tensor, x_calib: Tensor, x_float: Tensor | None = None) -> Tensor:
    """The same loss computed the slow way, from the layer outputs themselves (a reference for tests).

    mean over samples of sum over outputs of (layer_W(x_float) - layer_W_tilde(x_calib))^2; the bias cancels.
    Paper: Nagel et al. 2020, eq. 20.
    Used in: 04_adaround (exercise check), tests.
    """
    _check_layer(layer)
    check_tensor(x_calib, "x_calib")
    if x_float is None:
        x_float = x_calib
    if tuple(x_float.shape) != tuple(x_calib.shape):
        raise ValueError(f"x_float must have x_calib's shape {tuple(x_calib.shape)}, got {tuple(x_float.shape)}")
    if tuple(W_tilde.shape) != tuple(layer.weight.shape):
        raise ValueError(f"W_tilde must have the layer weight's shape {tuple(layer.weight.shape)}, got {tuple(W_tilde.shape)}")
    fn = F.linear if isinstance(layer, nn.Linear) else (
        lambda x, w: F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation))
    diff = fn(x_float.float(), layer.weight.detach().float()) - fn(x_calib.float(), W_tilde)
    return (diff**2).sum() / x_calib.shape[0]


# ----------------------------------------------------------------------------- the driver
@dataclass
class AdaRoundResult:
    """What ``adaround_layer`` found for one layer."""

    W_q: Tensor
    """The fake-quantized weight S (q - Z), same shape as the layer's weight."""
    qp: QParams
    """Scale and zero point used (per output channel)."""
    h: Tensor
    """h(V) after the last step, before it is rounded to 0/1 (should be binary)."""
    flipped: float
    """Fraction of weights whose code differs from round-to-nearest."""
    loss_nearest: float
    """Reconstruction loss of round-to-nearest on the calibration data."""
    loss_soft: float
    """Reconstruction loss of the soft weight W_tilde(V) after the last step (before rounding h)."""
    loss_adaround: float
    """Reconstruction loss of the final (hard) AdaRound weight on the calibration data."""
    target_energy: float
    """E ||W x||^2 on the calibration data (divide a loss by it for a relative error)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Every ``record_every`` steps: step, beta (0 in the warm start), recon and reg."""
    h_snapshots: dict[int, Tensor] = field(default_factory=dict)
    """Copies of h(V) at ``cfg.snapshot_iters`` and at the last step."""


def adaround_layer(layer: nn.Module, x_calib: Tensor, cfg: AdaRoundConfig, x_float: Tensor | None = None,
                   qp: QParams | None = None) -> AdaRoundResult:
    """AdaRound one Linear or Conv2d layer; the layer itself is not modified.

    minimise over V:  E ||W x - W_tilde(V) x_hat||^2 + lam * f_reg(h(V), beta)
    W_tilde(V) = S (clamp(floor(W / S) + Z + h(V), q_min, q_max) - Z), V initialised so that
    W_tilde = W (before clamping); Adam with cfg.lr for cfg.iters steps; the regulariser is off
    for the first warm_start * iters steps, then beta goes from beta_start to beta_end. At the
    end each code is floor(W / S) + Z + [h(V) >= 1/2].
    x_calib: the layer's inputs x_hat (from the network with earlier layers quantized);
    x_float: the float network's inputs x (default: x_calib); qp: the scales (default:
    ``weight_qparams(W, cfg.num_bits, cfg.scale_method)``).
    Paper: Nagel et al. 2020, Algorithm: eq. 21-25.
    Used in: 04_adaround.
    """
    if not isinstance(cfg, AdaRoundConfig):
        raise ValueError(f"cfg must be an AdaRoundConfig, got {type(cfg).__name__}")
    _check_layer(layer)
    W = layer.weight.detach().float()
    if qp is None:
        qp = weight_qparams(W, cfg.num_bits, cfg.scale_method)
    m = recon_moments(layer, x_calib, x_float)
    sq = _SoftQuant(W, qp)
    V = inverse_rectified_sigmoid(sq.rest.clamp(0.0, 1.0 - 1e-6), cfg.zeta, cfg.gamma).requires_grad_(True)
    opt = torch.optim.Adam([V], lr=cfg.lr)
    history: list[dict[str, float]] = []
    snaps: dict[int, Tensor] = {}
    keep = set(cfg.snapshot_iters)
    zero = torch.zeros(())
    for step in progress(range(cfg.iters), desc="AdaRound steps"):
        if step in keep:
            snaps[step] = rectified_sigmoid(V.detach(), cfg.zeta, cfg.gamma)
        beta = beta_schedule(step, cfg)
        h = rectified_sigmoid(V, cfg.zeta, cfg.gamma)
        rec = recon_loss(sq(h), W, m)
        reg = round_reg(h, beta) if beta is not None and cfg.lam > 0 else zero
        loss = rec + cfg.lam * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.record_every and step % cfg.record_every == 0:
            history.append({"step": step, "beta": beta or 0.0, "recon": rec.item(), "reg": reg.item()})
    h = rectified_sigmoid(V.detach(), cfg.zeta, cfg.gamma)
    snaps[cfg.iters] = h
    W_q = _from_codes(sq.floor + (h >= 0.5).float(), qp)
    W_n = fake_quantize(W, qp)
    with torch.no_grad():
        loss_n = recon_loss(W_n, W, m).item()
        loss_s = recon_loss(sq(h), W, m).item()
        loss_a = recon_loss(W_q, W, m).item()
    flipped = float((W_q != W_n).float().mean())
    return AdaRoundResult(W_q, qp, h, flipped, loss_n, loss_s, loss_a, m.target_energy, history, snaps)


def all_roundings(W: Tensor, qp: QParams, m: ReconMoments, max_weights: int = 20) -> tuple[Tensor, Tensor]:
    """Brute force: the reconstruction loss of every floor/ceil choice, 2^n of them for n weights.

    Returns (up, losses): up (2^n, n) bool, True where the weight is rounded up (code floor + 1),
    in the flattened order of W; losses (2^n,) the ``recon_loss`` of each choice.
    Paper: Nagel et al. 2020, sec. 2 (rounding-to-nearest is not optimal).
    Used in: 04_adaround (proof that nearest is not optimal), tests (AdaRound vs the optimum).
    """
    check_tensor(W, "W")
    if isinstance(max_weights, bool) or not isinstance(max_weights, int) or max_weights < 1:
        raise ValueError(f"max_weights must be a positive integer, got {max_weights!r}")
    n = W.numel()
    if n > max_weights:
        raise ValueError(f"W has {n} weights; enumerating 2^{n} roundings is allowed up to max_weights={max_weights}")
    x = _scaled(W, qp).flatten()
    up = torch.tensor(list(itertools.product([False, True], repeat=n)), dtype=torch.bool).reshape(-1, n)
    codes = torch.clamp(torch.floor(x) + up.float(), qp.qmin, qp.qmax)  # (2^n, n)
    W_all = (codes - qp.expand(qp.zero_point).float().flatten()) * qp.expand(qp.scale).flatten()
    dW = (W.detach().float().flatten() - W_all).reshape(len(up), W.shape[0], -1)  # (2^n, out, D)
    if dW.shape[2] != m.C.shape[0]:
        raise ValueError(f"the moments are for {m.C.shape[0]} inputs per output, W has {dW.shape[2]}")
    losses = ((dW @ m.C) * dW).sum((1, 2)) + 2.0 * (dW * m.G.T).sum((1, 2)) + m.const
    return up, losses


# ----------------------------------------------------------------------------- whole networks
@dataclass
class QuantizedNetwork:
    """A copy of a network with quantized weights, and what each layer's rounding did."""

    model: nn.Module
    """The copy, weights replaced by their fake-quantized values (activations stay float)."""
    layer_names: list[str]
    """Names (in the Sequential) of the quantized layers, in order."""
    calib_rel_error: list[float]
    """Per layer: E ||W x - W_tilde x_hat||^2 / E ||W x||^2 on the calibration data."""
    results: list[AdaRoundResult | None]
    """Per layer: AdaRound's result (None for the other methods)."""


def quantize_weights(model: nn.Sequential, x_calib: Tensor, method: str, cfg: AdaRoundConfig,
                     k: int = 20, seed: int = 0, quantized_inputs: bool = True) -> QuantizedNetwork:
    """Quantize every Linear/Conv2d weight of a Sequential, layer by layer, with one rounding method.

    Layer l sees x_hat, its input in the copy whose layers 1..l-1 are already quantized, and
    the float model's input x; best_of_k keeps, per layer, the one of k stochastic roundings
    with the least E ||W x - W_tilde x_hat||^2, adaround minimises it (``adaround_layer``).
    method: nearest, floor, ceil, stochastic, best_of_k, adaround. Scales: cfg.num_bits and
    cfg.scale_method (symmetric, per output channel). k: samples for best_of_k; seed: seeds the
    stochastic methods. quantized_inputs=False feeds every layer the float model's input instead
    (x_hat = x: each layer on its own, blind to the error of the layers before it), for comparison.
    The model passed in is not modified.
    Paper: Nagel et al. 2020, sec. 5 and Table 1.
    Used in: 04_adaround.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if not isinstance(cfg, AdaRoundConfig):
        raise ValueError(f"cfg must be an AdaRoundConfig, got {type(cfg).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    check_tensor(x_calib, "x_calib")
    gen = torch.Generator().manual_seed(seed)
    qmodel = copy.deepcopy(model).eval()
    names, rel, results = [], [], []
    x_f, x_q = x_calib.detach().float(), x_calib.detach().float()
    with torch.no_grad():
        for (name, mod), qmod in zip(model.named_children(), qmodel.children()):
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                W = mod.weight.detach().float()
                qp = weight_qparams(W, cfg.num_bits, cfg.scale_method)
                x_in = x_q if quantized_inputs else x_f
                res = None
                if method in ROUNDING_MODES:  # no moments needed
                    W_q = round_weight(W, qp, method, gen)
                elif method == "best_of_k":
                    m = recon_moments(mod, x_in, x_f)
                    cands = [round_weight(W, qp, "stochastic", gen) for _ in range(k)]
                    W_q = min(cands, key=lambda c: float(recon_loss(c, W, m)))
                else:
                    with torch.enable_grad():
                        res = adaround_layer(mod, x_in, cfg, x_float=x_f, qp=qp)
                    W_q = res.W_q
                qmod.weight.copy_(W_q)
                names.append(name)
                # the error in the quantized network (input x_q), computed from the outputs themselves
                energy = recon_loss_direct(mod, torch.zeros_like(W), x_f)
                rel.append(float(recon_loss_direct(mod, W_q, x_q, x_f) / energy))
                results.append(res)
            x_f, x_q = mod(x_f), qmod(x_q)
    return QuantizedNetwork(qmodel, names, rel, results)


def _check_pair(model: nn.Module, qmodel: nn.Module) -> None:
    if not isinstance(model, nn.Sequential) or not isinstance(qmodel, nn.Sequential):
        raise ValueError(f"model and qmodel must be nn.Sequential, got {type(model).__name__}, {type(qmodel).__name__}")
    if [n for n, _ in model.named_children()] != [n for n, _ in qmodel.named_children()]:
        raise ValueError("model and qmodel must have the same layers (qmodel: a quantized copy of model)")


def _paired_outputs(model: nn.Sequential, qmodel: nn.Sequential, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(y, y_hat) of each Linear/Conv2d layer: float layer in the float model, quantized in the copy."""
    _check_pair(model, qmodel)
    check_tensor(x, "x")
    pairs = []
    x_f, x_q = x.float(), x.float()
    with torch.no_grad():
        for mod, qmod in zip(model.children(), qmodel.children()):
            y_f, y_q = mod(x_f), qmod(x_q)
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                pairs.append((y_f, y_q))
            x_f, x_q = y_f, y_q
    return pairs


def layer_output_errors(model: nn.Sequential, qmodel: nn.Sequential, x: Tensor) -> list[float]:
    """Relative output error of each Linear/Conv2d layer: ||y - y_hat||^2 / ||y||^2 over a batch.

    y = the float layer's output in the float model, y_hat = the quantized layer's output in the
    quantized model (so the error includes what earlier layers passed on). Bias included in both.
    Paper: Nagel et al. 2020, sec. 5 (the error the layer-wise loss targets).
    Used in: 04_adaround.
    """
    return [float(((y - y_q) ** 2).sum() / (y**2).sum()) for y, y_q in _paired_outputs(model, qmodel, x)]


def layer_output_norm_ratios(model: nn.Sequential, qmodel: nn.Sequential, x: Tensor) -> list[float]:
    """||y_hat|| / ||y|| for each Linear/Conv2d layer (y, y_hat as in ``layer_output_errors``).

    Below 1: the quantized network's signal shrinks there (e.g. many weights rounded to zero).
    Used in: 04_adaround.
    """
    return [float(y_q.norm() / y.norm()) for y, y_q in _paired_outputs(model, qmodel, x)]


def digits_cnn() -> nn.Sequential:
    """A 38k-parameter CNN for 8x8 digits: conv3x3(16) ReLU conv3x3(32) ReLU maxpool2 fc(64) ReLU fc(10).

    Input (N, 1, 8, 8) -> (N, 10) logits. The weight layers are named conv1, conv2, fc1, fc2.
    (Could move to lecturelib.models if another notebook needs it.)
    Paper: LeCun et al., "Gradient-based learning applied to document recognition", 1998 (the
    conv-pool-fc pattern).
    Used in: 04_adaround.
    """
    from collections import OrderedDict

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(512, 64)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(64, 10)),
    ]))


@torch.no_grad()
def layer_inputs(model: nn.Sequential, qmodel: nn.Sequential, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """The inputs of layer ``name``: (x_hat from the quantized copy, x from the float model).

    Paper: Nagel et al. 2020, sec. 5 (x_hat: the input with the earlier layers quantized).
    Used in: 04_adaround (the explorer works on one layer).
    """
    _check_pair(model, qmodel)
    check_tensor(x, "x")
    names = [n for n, _ in model.named_children()]
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}")
    x_f, x_q = x.float(), x.float()
    for (n, mod), qmod in zip(model.named_children(), qmodel.children()):
        if n == name:
            return x_q, x_f
        x_f, x_q = mod(x_f), qmod(x_q)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- figures
def plot_h_evolution(res: AdaRoundResult, title: str = "") -> Any:
    """Histograms of h(V) at the kept steps (soft -> binary) above two panels: the relative
    reconstruction error per step, and f_reg per weight with beta per step.

    Paper: Nagel et al. 2020 (the h(V) of eq. 23 driven to {0, 1} by eq. 24).
    Used in: 04_adaround.
    """
    import matplotlib.pyplot as plt

    if not res.h_snapshots or not res.history:
        raise ValueError("res needs h_snapshots and history (set cfg.snapshot_iters and cfg.record_every)")
    steps = sorted(res.h_snapshots)
    n = len(steps)
    fig = plt.figure(figsize=(2.3 * n, 5.4))
    gs = fig.add_gridspec(2, 2 * n, height_ratios=[1, 1.1])
    first = None
    for i, st in enumerate(steps):
        ax = fig.add_subplot(gs[0, 2 * i: 2 * i + 2], sharey=first)
        first = first or ax
        h = res.h_snapshots[st].flatten().numpy()
        ax.hist(h, bins=40, range=(0, 1), color="tab:purple")
        ax.set_yscale("log")
        ax.set_ylim(0.8, 2.0 * h.size)
        soft = float(((h > 1e-3) & (h < 1 - 1e-3)).mean())
        ax.set_title(f"step {st}: {100 * soft:.0f}% undecided", fontsize=9)
        ax.set_xlabel("h(V)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("count (log)", fontsize=8)
    hs = [r["step"] for r in res.history]
    ax = fig.add_subplot(gs[1, :n])
    ax.plot(hs, [r["recon"] / res.target_energy for r in res.history], color="tab:blue")
    ax.axhline(res.loss_nearest / res.target_energy, color="tab:red", ls=":", label="round to nearest")
    ax.axhline(res.loss_adaround / res.target_energy, color="tab:green", ls=":", label="AdaRound, final (hard)")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_title("reconstruction loss of the soft weight / E||Wx||^2", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(gs[1, n:])
    n_w = res.h.numel()
    ax.plot(hs, [r["reg"] / n_w for r in res.history], color="tab:orange", label="f_reg / #weights (0: warm start)")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("f_reg / #weights")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax2 = ax.twinx()
    ax2.plot(hs, [r["beta"] if r["beta"] else float("nan") for r in res.history], color="k", ls="--")
    ax2.set_ylabel("beta (dashed)")
    ax.set_title("regulariser per weight, and beta", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def adaround_explorer(layer: nn.Module, x_calib: Tensor, cfg: AdaRoundConfig, x_float: Tensor | None = None,
                      iters: int = 300) -> Any:
    """An ipywidgets explorer: beta range and lambda sliders; AdaRound re-runs on one layer per change.

    Shows f_reg(h) for beta_start and beta_end, the histogram of the final h(V), and the relative
    reconstruction error of nearest, the soft W_tilde(V) and the final hard rounding.
    Keep the layer small (each change runs ``iters`` Adam steps).
    Paper: Nagel et al. 2020 (eq. 24 and the beta annealing of sec. 5).
    Used in: 04_adaround.
    """
    if not isinstance(cfg, AdaRoundConfig):
        raise ValueError(f"cfg must be an AdaRoundConfig, got {type(cfg).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    _check_layer(layer)
    import dataclasses

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .explorers import explorer, range_slider

    qp = weight_qparams(layer.weight.detach(), cfg.num_bits, cfg.scale_method)

    def draw(beta: tuple[float, float], lam: float) -> None:
        c = dataclasses.replace(cfg, iters=iters, lam=lam, beta_end=beta[0], beta_start=beta[1],
                                record_every=0, snapshot_iters=())
        res = adaround_layer(layer, x_calib, c, x_float=x_float, qp=qp)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        h = torch.linspace(0, 1, 201)
        for b, ls in ((c.beta_start, "-"), (c.beta_end, "--")):
            axes[0].plot(h, 1 - (2 * h - 1).abs() ** b, ls=ls, label=f"beta = {b:g}")
        axes[0].set_xlabel("h")
        axes[0].set_ylabel("regularizer term")
        axes[0].set_title("one term of f_reg: 1 - |2h - 1|^beta", fontsize=9)
        axes[0].legend(fontsize=8)
        axes[1].hist(res.h.flatten().numpy(), bins=40, range=(0, 1), color="tab:purple")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("h(V)")
        axes[1].set_ylabel("weights")
        soft = float(((res.h > 1e-3) & (res.h < 1 - 1e-3)).float().mean())
        axes[1].set_title(f"final h(V): {100 * soft:.1f}% not yet 0 or 1", fontsize=9)
        vals = [res.loss_nearest, res.loss_soft, res.loss_adaround]
        vals = [v / res.target_energy for v in vals]
        axes[2].bar(["nearest", "soft W(V)", "AdaRound (hard)"], vals,
                    color=["tab:red", "tab:gray", "tab:green"])
        for i, v in enumerate(vals):
            axes[2].text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        axes[2].set_ylabel("‖W̃x − Wx‖² / ‖Wx‖²")
        axes[2].set_title(f"relative output error (lambda = {c.lam:.3g}, {100 * res.flipped:.0f}% flipped)",
                          fontsize=9)
        fig.tight_layout()

    return explorer(
        draw,
        title=f"AdaRound on one layer ({iters} Adam steps per change)",
        beta=range_slider((cfg.beta_end, cfg.beta_start), 1.0, 40.0, 0.5, description="beta end, start",
                          readout_format=".1f", width="420px"),
        lam=widgets.FloatLogSlider(value=cfg.lam, base=10, min=-3, max=2, step=0.25, description="lambda",
                                   continuous_update=False),
    )
