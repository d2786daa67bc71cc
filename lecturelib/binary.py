"""Binary and ternary quantization: sign and stochastic binarization, BWN, TWN, TTQ, and the
straight-through-estimator (STE) layers that train BinaryConnect, BWN, TWN, TTQ, BNN and XNOR-Net.

The quantizers, on a weight tensor W with n entries:

    sign:        q = +1 if r >= 0, -1 if r < 0
    stochastic:  q = +1 with probability p = hard_sigmoid(r) = clamp((r + 1) / 2, 0, 1), else -1
    BWN:         W ~ alpha * sign(W),  alpha = ||W||_1 / n
    TWN:         q = r_t (r > Delta), 0 (|r| <= Delta), -r_t (r < -Delta),
                 Delta = 0.7 * E|r|,  r_t = E_{|r| > Delta} |r|
    TTQ:         q = w_p (r > Delta), 0 (|r| <= Delta), -w_n (r < -Delta), w_p and w_n trained

A ``QuantLinear`` layer applies one weight quantizer and, optionally, binarizes its input
(BNN: sign(x); XNOR-Net: sign(x) with the per-sample scale beta = mean |x|). In the forward pass
the quantized values are used; in the backward pass the STE lets the gradient through
(cancelled where |x| > 1 for sign, as in the BNN paper). ``BinaryMLP`` stacks three of them
with BatchNorm for the digits experiments, and ``packed_forward`` runs a binary-activation
network's +-1 x +-1 layers through the bit-packed XNOR kernel of ``lecturelib.xnor_gemm``.

Papers: Courbariaux, Bengio & David, "BinaryConnect", NeurIPS 2015; Courbariaux, Hubara, Soudry,
El-Yaniv & Bengio, "Binarized neural networks" (BNN), arXiv:1602.02830, 2016; Rastegari, Ordonez,
Redmon & Farhadi, "XNOR-Net", ECCV 2016 (BWN and XNOR-Net); Li, Zhang & Liu, "Ternary weight
networks" (TWN), arXiv:1605.04711, 2016; Zhu, Han, Mao & Dally, "Trained ternary quantization"
(TTQ), ICLR 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

WEIGHT_MODES = ("float", "bc", "sign", "bwn", "twn", "ttq")
"""Weight quantizers of QuantLinear: float, BinaryConnect (stochastic in training), sign (BNN),
BWN (alpha * sign), TWN (r_t * ternary), TTQ (trained w_p / w_n)."""
INPUT_MODES = ("float", "sign", "sign_scaled")
"""Input binarization of QuantLinear: none, sign(x) (BNN), beta * sign(x) (XNOR-Net)."""
DIGITS_SIZES = [64, 256, 256, 10]
"""Layer widths of the digits BinaryMLP (8x8 pixels in, 10 classes out). Used in: 06_binary_xnor,
bench/xnor_gemm.py."""


def _check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    return x


# ----------------------------------------------------------------------------- binarization
def binarize_sign(r: Tensor) -> Tensor:
    """Deterministic binarization: q = +1 if r >= 0, q = -1 if r < 0 (same dtype as r).

    Zero goes to +1, so every entry becomes +-1 (torch.sign(0) is 0, which is not a binary
    value). Paper: Courbariaux et al. 2015 (BinaryConnect), eq. 1.
    Used in: 06_binary_xnor.
    """
    r = _check_tensor(r, "r")
    return torch.where(r >= 0, torch.ones_like(r), -torch.ones_like(r))


def hard_sigmoid(r: Tensor) -> Tensor:
    """sigma(r) = clamp((r + 1) / 2, 0, 1): the probability of +1 in stochastic binarization.

    Paper: Courbariaux et al. 2015 (BinaryConnect), eq. 3. Used in: 06_binary_xnor.
    """
    r = _check_tensor(r, "r")
    return ((r + 1) / 2).clamp(0.0, 1.0)


def binarize_stochastic(r: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stochastic binarization: q = +1 with probability hard_sigmoid(r), else -1.

    E[q] = 2 sigma(r) - 1 = clamp(r, -1, 1): unbiased inside [-1, 1].
    Paper: Courbariaux et al. 2015 (BinaryConnect), eq. 2. Used in: 06_binary_xnor.
    """
    p = hard_sigmoid(r)
    u = torch.rand(r.shape, generator=generator, dtype=r.dtype, device=r.device)
    return torch.where(u < p, torch.ones_like(r), -torch.ones_like(r))


def squared_error(W: Tensor, W_q: Tensor) -> float:
    """Squared Frobenius error ||W - W_q||_F^2, as a Python float.

    Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    if not isinstance(W_q, torch.Tensor) or W_q.shape != W.shape:
        raise ValueError(
            f"W_q must be a tensor of W's shape {tuple(W.shape)}, got "
            f"{tuple(W_q.shape) if isinstance(W_q, torch.Tensor) else type(W_q).__name__}"
        )
    return float(((W.double() - W_q.double()) ** 2).sum())


def bwn_alpha(W: Tensor, per_channel: bool = False) -> Tensor:
    """BWN scale alpha = ||W||_1 / n = mean |W| (per tensor, or per output row if per_channel).

    It is the alpha that minimises ||W - alpha sign(W)||_F^2 (set the derivative to 0:
    alpha = <W, sign(W)> / n = ||W||_1 / n). Paper: Rastegari et al. 2016 (XNOR-Net), eq. 4.
    Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    if per_channel:
        if W.ndim < 2:
            raise ValueError(
                f"per_channel needs W with an output dimension (ndim >= 2), "
                f"got shape {tuple(W.shape)}"
            )
        return W.abs().flatten(1).mean(dim=1)
    return W.abs().mean()


def bwn_quantize(W: Tensor, per_channel: bool = False) -> Tensor:
    """BWN weights: alpha * sign(W) with alpha = mean |W| (per tensor or per output row).

    Paper: Rastegari et al. 2016 (XNOR-Net, "binary-weight networks"). Used in: 06_binary_xnor.
    """
    alpha = bwn_alpha(W, per_channel)
    if per_channel:
        alpha = alpha.view(-1, *([1] * (W.ndim - 1)))
    return alpha * binarize_sign(W)


# ----------------------------------------------------------------------------- ternary
@dataclass(frozen=True)
class TernaryResult:
    """A ternary quantization W ~ W_t with codes in {-1, 0, +1} (TWN or TTQ).

    Used in: 06_binary_xnor.
    """

    W_t: Tensor
    """The ternary weights: scale_pos where codes = +1, -scale_neg where codes = -1, else 0."""
    codes: Tensor
    """int8 codes in {-1, 0, +1}."""
    delta: float
    """Threshold: |r| <= delta becomes 0."""
    scale_pos: float
    """Value of the +1 code (TWN: r_t; TTQ: w_p)."""
    scale_neg: float
    """Magnitude of the -1 code (TWN: r_t; TTQ: w_n)."""

    @property
    def sparsity(self) -> float:
        """Fraction of zero codes."""
        return float((self.codes == 0).float().mean())


def ternary_codes(W: Tensor, delta: float | Tensor) -> Tensor:
    """codes = +1 (W > delta), 0 (|W| <= delta), -1 (W < -delta), as int8.

    Paper: Li, Zhang & Liu 2016 (TWN). Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    delta = float(delta)
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    return (W > delta).to(torch.int8) - (W < -delta).to(torch.int8)


def twn_delta(W: Tensor, factor: float = 0.7) -> float:
    """TWN threshold Delta = factor * E|W| (factor 0.7 in the paper).

    Paper: Li, Zhang & Liu 2016 (TWN), eq. 9. Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    if not factor >= 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    return float(factor * W.abs().mean())


def twn_quantize(W: Tensor, factor: float = 0.7, delta: float | None = None) -> TernaryResult:
    """TWN: W_t = r_t * codes, Delta = factor * E|W| (unless given), r_t = E_{|W| > Delta} |W|.

    r_t is the mean magnitude of the weights that survive the threshold: the scale that
    minimises ||W - r_t codes||_F^2 for these codes (0 when none survive).
    Paper: Li, Zhang & Liu 2016 (TWN), eqs. 8-9. Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    d = twn_delta(W, factor) if delta is None else float(delta)
    codes = ternary_codes(W, d)
    kept = codes != 0
    r_t = float(W.abs()[kept].mean()) if bool(kept.any()) else 0.0
    return TernaryResult(r_t * codes.to(W.dtype), codes, d, r_t, r_t)


def ttq_delta(W: Tensor, t: float = 0.05) -> float:
    """TTQ threshold Delta = t * max|W| (t = 0.05 in the paper).

    Paper: Zhu, Han, Mao & Dally 2017 (TTQ), eq. 1. Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W")
    if not 0 <= t < 1:
        raise ValueError(f"t must be in [0, 1), got {t}")
    return float(t * W.abs().max())


def ttq_quantize(
    W: Tensor, w_p: Tensor | float, w_n: Tensor | float, delta: float
) -> TernaryResult:
    """TTQ: W_t = w_p (W > Delta), 0 (|W| <= Delta), -w_n (W < -Delta).

    w_p and w_n are trained (see fit_ttq_scales, or the ``ttq`` mode of QuantLinear).
    Paper: Zhu et al. 2017 (TTQ), eq. 1. Used in: 06_binary_xnor.
    """
    codes = ternary_codes(W, delta)
    wp, wn = float(torch.as_tensor(w_p).detach()), float(torch.as_tensor(w_n).detach())
    W_t = torch.where(codes > 0, wp, torch.where(codes < 0, -wn, 0.0)).to(W.dtype)
    return TernaryResult(W_t, codes, float(delta), wp, wn)


@dataclass(frozen=True)
class TTQFit:
    """Scales learned by gradient descent on ||W - W_t||^2 (fit_ttq_scales).

    Used in: 06_binary_xnor.
    """

    w_p: float
    """Learned positive scale."""
    w_n: float
    """Learned negative scale (magnitude)."""
    history: list[tuple[float, float, float]]
    """(w_p, w_n, loss) after every step."""


def fit_ttq_scales(
    W: Tensor, delta: float, init: float, steps: int = 200, lr: float = 0.1
) -> TTQFit:
    """Learn TTQ's w_p and w_n by gradient descent on L = ||W - W_t(w_p, w_n)||_F^2 / n.

    dL/dw_p = -2/n sum_{W > Delta} (W - w_p),  dL/dw_n = 2/n sum_{W < -Delta} (W + w_n):
    the fixed point is w_p = mean of the weights above Delta, w_n = mean magnitude of those
    below -Delta. (In a network, the task loss replaces L.) Paper: Zhu et al. 2017 (TTQ).
    Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W").detach()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    codes = ternary_codes(W, delta)
    w_p = torch.tensor(float(init), dtype=W.dtype, requires_grad=True)
    w_n = torch.tensor(float(init), dtype=W.dtype, requires_grad=True)
    opt = torch.optim.SGD([w_p, w_n], lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        W_t = w_p * (codes > 0) - w_n * (codes < 0)
        loss = ((W - W_t) ** 2).mean()
        loss.backward()
        opt.step()
        history.append((w_p.item(), w_n.item(), loss.item()))
    return TTQFit(w_p.item(), w_n.item(), history)


def twn_sweep(W: Tensor, factors: Any) -> dict[str, np.ndarray]:
    """TWN at several thresholds Delta = factor * E|W|: sparsity and ||W - W_t||_F^2 for each.

    Returns {"factor", "delta", "sparsity", "error", "r_t"} as numpy arrays.
    Used in: 06_binary_xnor (the threshold slider).
    """
    W = _check_tensor(W, "W").detach()
    factors = np.asarray(factors, dtype=float)
    if factors.ndim != 1 or factors.size == 0 or (factors < 0).any():
        raise ValueError(f"factors must be a non-empty 1-D list of numbers >= 0, got {factors!r}")
    rows = [twn_quantize(W, float(f)) for f in factors]
    return {
        "factor": factors,
        "delta": np.array([r.delta for r in rows]),
        "sparsity": np.array([r.sparsity for r in rows]),
        "error": np.array([squared_error(W, r.W_t) for r in rows]),
        "r_t": np.array([r.scale_pos for r in rows]),
    }


def plot_twn_threshold(
    W: Tensor, factor: float, ax: Any = None, max_factor: float = 2.0
) -> dict[str, float]:
    """Error and sparsity of TWN against the threshold factor, with ``factor`` marked.

    Left axis: ||W - W_t||_F^2 / ||W||_F^2; right axis: fraction of zeros. Returns the marked
    point's {"delta", "sparsity", "error", "r_t"}. Used in: 06_binary_xnor.
    """
    W = _check_tensor(W, "W").detach()
    if not 0 <= factor <= max_factor:
        raise ValueError(f"factor must be in [0, {max_factor}], got {factor}")
    sweep = twn_sweep(W, np.linspace(0.0, max_factor, 81))
    norm = float((W.double() ** 2).sum())
    point = twn_quantize(W, factor)
    err = squared_error(W, point.W_t)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3))
    ax.plot(
        sweep["factor"],
        sweep["error"] / norm,
        color="tab:blue",
        label="relative error ||W − W_t||² / ||W||²",
    )
    ax.plot([factor], [err / norm], "o", color="tab:blue")
    ax.set_xlabel("threshold factor  (Δ = factor · E|W|)")
    ax.set_ylabel("relative squared error", color="tab:blue")
    ax.axvline(0.7, color="0.5", ls=":", lw=1)
    ax2 = ax.twinx()
    ax2.plot(
        sweep["factor"], sweep["sparsity"], color="tab:orange", label="sparsity (fraction of 0)"
    )
    ax2.plot([factor], [point.sparsity], "o", color="tab:orange")
    ax2.set_ylabel("fraction of zeros", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title(
        f"factor {factor:.2f}: Δ = {point.delta:.3f}, r_t = {point.scale_pos:.3f}, "
        f"sparsity {100 * point.sparsity:.0f}%, rel. error {err / norm:.3f}",
        fontsize=9,
    )
    return {"delta": point.delta, "sparsity": point.sparsity, "error": err, "r_t": point.scale_pos}


def twn_explorer(W: Tensor) -> Any:
    """An ipywidgets explorer: a TWN threshold slider showing sparsity and error.

    Used in: 06_binary_xnor.
    """
    from .explorers import explorer, float_slider

    W = _check_tensor(W, "W").detach()

    def draw(delta_ratio: float) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 3))
        plot_twn_threshold(W, delta_ratio, ax=ax)
        fig.tight_layout()

    return explorer(draw, title="Ternary weights: the threshold Δ decides sparsity and error",
                    delta_ratio=float_slider(0.7, 0.0, 2.0, 0.05, description="Δ / E|W|", width="450px"))


# ----------------------------------------------------------------------------- STE layers
class _SignSTE(torch.autograd.Function):
    """sign in the forward pass; gradient 1[|x| <= 1] in the backward pass (hardtanh STE)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """Differentiable sign: forward q = +1 (x >= 0) / -1 (x < 0), backward dq/dx = 1[|x| <= 1].

    Paper: Courbariaux et al. 2016 (BNN), section 1.3 (the "straight-through estimator" with
    gradient cancelling). Used in: 06_binary_xnor.
    """
    return _SignSTE.apply(x)


def _ste(x: Tensor, q: Tensor) -> Tensor:
    """Forward q, backward identity: x + (q - x).detach()."""
    return x + (q - x).detach()


class _TTQFunction(torch.autograd.Function):
    """TTQ forward and its gradients (Zhu et al. 2017, eqs. 7-8)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, W: Tensor, w_p: Tensor, w_n: Tensor, delta: float
    ) -> Tensor:
        pos, neg = W > delta, W < -delta
        ctx.save_for_backward(pos, neg, w_p, w_n)
        return torch.where(pos, w_p, torch.where(neg, -w_n, torch.zeros_like(W)))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        pos, neg, w_p, w_n = ctx.saved_tensors
        # scaled gradients for the latent weights: w_p on I_p, 1 in the zero band, w_n on I_n
        scale = torch.where(pos, w_p, torch.where(neg, w_n, torch.ones_like(w_p)))
        return (
            grad * scale,
            (grad * pos).sum().reshape(w_p.shape),
            -(grad * neg).sum().reshape(w_n.shape),
            None,
        )


class QuantLinear(nn.Linear):
    """Linear layer y = s * (Q_x(x) @ Q_w(W)^T) + b: a weight quantizer and an input binarizer.

    weight_mode (see WEIGHT_MODES):
      float  W as is;
      bc     BinaryConnect: stochastic binarization while training, sign(W) in eval (no scale);
      sign   sign(W), no scale (BNN);
      bwn    sign(W) with alpha = mean |W_i| per output row, applied as the output scale s;
      twn    r_t * ternary(W), Delta = 0.7 E|W| (per layer);
      ttq    w_p / 0 / -w_n, Delta = 0.05 max|W|, with w_p and w_n trainable parameters.
    input_mode (see INPUT_MODES): float (x as is), sign (sign(x), BNN), sign_scaled (sign(x) and
    beta = mean |x| per sample multiplied into s, XNOR-Net).
    Gradients: STE (identity for W, 1[|W| <= 1] for sign-based weights and for sign(x)).
    Papers: BinaryConnect 2015, BNN 2016, XNOR-Net 2016, TWN 2016, TTQ 2017.
    Used in: 06_binary_xnor.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_mode: str = "float",
        input_mode: str = "float",
        bias: bool = True,
    ):
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        self.weight_mode = weight_mode
        self.input_mode = input_mode
        super().__init__(in_features, out_features, bias=bias)
        if weight_mode == "ttq":
            self.w_p = nn.Parameter(torch.ones(()))
            self.w_n = nn.Parameter(torch.ones(()))
            self._init_ttq()

    def _init_ttq(self) -> None:
        with torch.no_grad():
            W = self.weight
            d = ttq_delta(W)
            self.w_p.fill_(float(W[W > d].mean()) if bool((W > d).any()) else 1.0)
            self.w_n.fill_(float(-W[W < -d].mean()) if bool((W < -d).any()) else 1.0)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, except: BinaryConnect's latent weights start uniform in
        [-1, 1] (the range where hard_sigmoid is informative; nn.Linear's +-1/sqrt(in) would make
        every sign a coin flip), and TTQ's scales start at the mean weight above/below Delta."""
        super().reset_parameters()
        if getattr(self, "weight_mode", None) == "bc":
            with torch.no_grad():
                self.weight.uniform_(-1.0, 1.0)
        if hasattr(self, "w_p"):
            self._init_ttq()

    @property
    def binary_input(self) -> bool:
        """True when the layer multiplies +-1 inputs (BNN, XNOR-Net)."""
        return self.input_mode != "float"

    @property
    def binary_weight(self) -> bool:
        """True when the quantized weights are +-1 times an output scale (bc, sign, bwn)."""
        return self.weight_mode in ("bc", "sign", "bwn")

    def quantized_weight(self) -> tuple[Tensor, Tensor | None]:
        """(W_q, alpha): the weights the matrix product uses and the per-output scale (or None)."""
        W = self.weight
        m = self.weight_mode
        if m == "float":
            return W, None
        if m == "sign":
            return sign_ste(W), None
        if m == "bc":
            if self.training:
                # stochastic binarization; the gradient passes as identity inside [-1, 1]
                q = binarize_stochastic(W.detach())
                return q + (W - W.detach()) * (W.detach().abs() <= 1), None
            return sign_ste(W), None
        if m == "bwn":
            return sign_ste(W), W.abs().mean(dim=1)
        if m == "twn":
            return _ste(W, twn_quantize(W.detach()).W_t), None
        return _TTQFunction.apply(W, self.w_p, self.w_n, ttq_delta(W.detach())), None

    def binarize_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x_q, beta): the inputs the matrix product uses and the per-sample scale (or None)."""
        if self.input_mode == "float":
            return x, None
        x_b = sign_ste(x)
        if self.input_mode == "sign":
            return x_b, None
        return x_b, x.abs().mean(dim=1, keepdim=True)

    def finish(self, z: Tensor, alpha: Tensor | None, beta: Tensor | None) -> Tensor:
        """y = z * alpha * beta + b: the scales and the bias after the matrix product z."""
        if alpha is not None:
            z = z * alpha
        if beta is not None:
            z = z * beta
        if self.bias is not None:
            z = z + self.bias
        return z

    def forward(self, x: Tensor) -> Tensor:  # (B, in) -> (B, out)
        x_q, beta = self.binarize_input(x)
        W_q, alpha = self.quantized_weight()
        return self.finish(F.linear(x_q, W_q), alpha, beta)


@dataclass(frozen=True)
class BinaryMethod:
    """One row of the lecture's table: how weights and activations are quantized.

    Used in: 06_binary_xnor.
    """

    name: str
    """Display name (float, BinaryConnect, BWN, TWN, TTQ, BNN, XNOR-Net)."""
    weight_mode: str
    """QuantLinear weight_mode."""
    input_mode: str
    """QuantLinear input_mode of the layers after the first (the first sees real pixels)."""
    w_bits: int
    """Bits per weight (ternary: 2)."""
    a_bits: int
    """Bits per activation."""


METHODS: tuple[BinaryMethod, ...] = (
    BinaryMethod("float", "float", "float", 32, 32),
    BinaryMethod("BinaryConnect", "bc", "float", 1, 32),
    BinaryMethod("BWN", "bwn", "float", 1, 32),
    BinaryMethod("TWN", "twn", "float", 2, 32),
    BinaryMethod("TTQ", "ttq", "float", 2, 32),
    BinaryMethod("BNN", "sign", "sign", 1, 1),
    BinaryMethod("XNOR-Net", "bwn", "sign_scaled", 1, 1),
)
"""The methods the digits experiment trains, in the lecture's order. Used in: 06_binary_xnor."""


def get_method(name: str) -> BinaryMethod:
    """The BinaryMethod called ``name``. Used in: 06_binary_xnor."""
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"method must be one of {[m.name for m in METHODS]}, got {name!r}")


class BinaryMLP(nn.Module):
    """QuantLinear -> BatchNorm -> act -> QuantLinear -> BatchNorm -> act -> QuantLinear.

    The first layer sees real pixels (as in BNN and XNOR-Net, the input image is not
    binarized); with a binary-activation method the later layers binarize their inputs and
    ``act`` is the identity (the sign is in the next layer), otherwise ``act`` is ReLU.
    Used in: 06_binary_xnor.
    """

    def __init__(self, sizes: list[int], method: BinaryMethod | str):
        super().__init__()
        if isinstance(method, str):
            method = get_method(method)
        if len(sizes) != 4 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
        ):
            raise ValueError(
                f"sizes must be four positive ints [in, hidden, hidden, out], got {sizes!r}"
            )
        self.method = method
        act = nn.Identity if method.input_mode != "float" else nn.ReLU
        self.fc1 = QuantLinear(sizes[0], sizes[1], method.weight_mode, "float")
        self.bn1 = nn.BatchNorm1d(sizes[1])
        self.act1 = act()
        self.fc2 = QuantLinear(sizes[1], sizes[2], method.weight_mode, method.input_mode)
        self.bn2 = nn.BatchNorm1d(sizes[2])
        self.act2 = act()
        self.fc3 = QuantLinear(sizes[2], sizes[3], method.weight_mode, method.input_mode)

    def forward(self, x: Tensor) -> Tensor:  # (B, 64) -> (B, 10)
        h = self.act1(self.bn1(self.fc1(x)))
        h = self.act2(self.bn2(self.fc2(h)))
        return self.fc3(h)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, X: Tensor) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on X with deterministic weights.

    BinaryConnect trains with stochastic weights, so the running statistics collected in
    training describe random networks; at test time the weights are sign(W). This recomputes
    mean and variance in one pass over X (QuantLinear layers in eval mode, BatchNorm in train
    mode with a cumulative average), then puts the model in eval mode and returns it.
    Paper: Courbariaux et al. 2015 (BinaryConnect); Ioffe & Szegedy 2015 (BatchNorm).
    Used in: 06_binary_xnor.
    """
    X = _check_tensor(X, "X")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("model must contain at least one BatchNorm layer")
    model.train()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: exactly the statistics of X
    model(X)
    for bn, mom in zip(bns, saved, strict=True):
        bn.momentum = mom
    return model.eval()


@torch.no_grad()
def packed_forward(model: BinaryMLP, X: Tensor) -> Tensor:
    """The model's eval-mode logits with every +-1 x +-1 layer computed by the XNOR kernel.

    For a layer with binary inputs and binary weights: z = xnor_gemm_packed(pack_rows(sign(h)),
    pack_cols(sign(W)^T), K) (integers), then the same ``finish`` (scales, bias) as the float
    simulation. The first layer (real pixels) runs in float as in the simulation.
    Papers: Rastegari et al. 2016; Courbariaux et al. 2016. Used in: 06_binary_xnor.
    """
    from . import xnor_gemm

    if not isinstance(model, BinaryMLP):
        raise ValueError(f"model must be a BinaryMLP, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "model must be in eval mode (model.eval()): BatchNorm uses running statistics"
        )
    if not (model.fc2.binary_input and model.fc2.binary_weight):
        raise ValueError(
            "packed_forward needs binary weights and activations (BNN, XNOR-Net), "
            f"got {model.method.name}"
        )

    def layer(fc: QuantLinear, h: Tensor) -> Tensor:
        x_b, beta = fc.binarize_input(h)
        W_b, alpha = fc.quantized_weight()
        z = xnor_gemm.xnor_gemm_packed(
            xnor_gemm.pack_rows(x_b), xnor_gemm.pack_cols(W_b.T), W_b.shape[1]
        )
        return fc.finish(torch.from_numpy(z).to(h.dtype), alpha, beta)

    h = model.act1(model.bn1(model.fc1(X)))
    h = model.act2(model.bn2(layer(model.fc2, h)))
    return layer(model.fc3, h)


def binary_layer_shapes(model: BinaryMLP, batch: int) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K) of the +-1 x +-1 matrix products of ``model`` for a batch of ``batch``.

    Used in: 06_binary_xnor, bench/xnor_gemm.py.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return [
        (name, batch, fc.out_features, fc.in_features)
        for name, fc in (("fc2", model.fc2), ("fc3", model.fc3))
    ]
