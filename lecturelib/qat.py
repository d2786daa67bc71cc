"""Quantization-aware training (QAT): fake-quantized layers, STE variants, LSQ, oscillations,
BatchNorm folding, PTQ vs QAT drivers, and conversion to integer-only layers.

Scope, in the order of notebook 05:

1. ``qat_fake_quantize``: fake quantization with a choice of backward pass
   ("round": the true gradient, zero almost everywhere; "ste": identity; "clipped_ste":
   identity inside the clip range, ``lecturelib.ste``).
2. ``QuantLinear`` / ``QuantMLP``: a full-precision weight copy W is trained; the forward pass
   uses Q(W) and Q(x). Weights: min/max of the current W, per tensor (asymmetric) or per
   output channel (symmetric); activations: per tensor, asymmetric, unsigned, their range
   calibrated (PTQ) then tracked with an EMA during QAT (Jacob et al. 2018).
3. ``ptq`` / ``qat`` / ``ptq_vs_qat``: drivers that return result objects.
4. LSQ (Esser et al. 2020): a learned step size s with gradient scale g = 1 / sqrt(N q_max).
5. Weight oscillations (Nagel et al. 2022): integer codes that flip back and forth.
6. BatchNorm folding, and QAT with the BN folded into the weights (Krishnamoorthi 2018, sec. 3.2).
7. ``convert``: the QAT model as integer-only layers (``lecturelib.intops``).

PyTorch's own QAT toolchains on the same model are in ``lecturelib.qat_toolchains``.

The qparams formula lives in ``lecturelib.quantizers`` only; this module calls it.
Papers: Jacob et al., CVPR 2018; Krishnamoorthi, arXiv:1806.08342 (2018); Bengio, Leonard &
Courville, arXiv:1308.3432 (2013); Esser et al., "Learned Step Size Quantization", ICLR 2020;
Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .harness import progress
from .models import MLP, DigitsSplit, TrainConfig, accuracy
from .quantizers import (
    PerChannel,
    PerTensor,
    QParams,
    check_bits,
    check_tensor,
    choose_qparams,
    qparams_with_range,
    qrange,
    quantize,
)
from .ste import ste_fake_quantize

Tensor = torch.Tensor

ESTIMATORS = ("round", "ste", "clipped_ste")
"""Backward passes of fake quantization: the true gradient of round (0), identity, clipped identity."""
WEIGHT_SCHEMES = ("per_tensor_asym", "per_channel_sym", "per_channel_asym")
"""How weights are quantized: one asymmetric range per tensor, or one range per output channel."""
TABLE_SCHEMES = ("per_tensor_asym", "per_channel_sym")
"""The two columns of the lecture's INT8 QAT table (Krishnamoorthi 2018)."""

# ----------------------------------------------------------------------------- the lecture's table
LECTURE_INT8_TABLE = (
    {"network": "MobileNetV1", "fp32": 70.9, "ptq_per_tensor_asym": 0.1, "ptq_per_channel_sym": 59.1,
     "qat_per_tensor_asym": 70.0, "qat_per_channel_sym": 70.7},
    {"network": "MobileNetV2", "fp32": 71.9, "ptq_per_tensor_asym": 0.1, "ptq_per_channel_sym": 69.8,
     "qat_per_tensor_asym": 70.9, "qat_per_channel_sym": 71.1},
    {"network": "NASNet-Mobile", "fp32": 74.9, "ptq_per_tensor_asym": 72.2, "ptq_per_channel_sym": 72.1,
     "qat_per_tensor_asym": 73.0, "qat_per_channel_sym": 73.0},
)
"""The lecture's "INT8 Linear Quantization-Aware Training" slide (top-1 %, ImageNet), after
Krishnamoorthi 2018. Used in: 05_qat_ste."""
LECTURE_PTQ_DROPS = {"MobileNetV1": -11.8, "MobileNetV2": -2.1}
"""The lecture's PTQ slide: drops (points) for symmetric per-channel weights, asymmetric per-tensor
EMA activations. Used in: 05_qat_ste."""
WHITEPAPER_PTQ_PER_CHANNEL_ASYM = {"MobileNetV1": 70.3}
"""Krishnamoorthi 2018: 8-bit PTQ with asymmetric per-channel weights (a column the slide leaves
out). Used in: 05_qat_ste."""


# ----------------------------------------------------------------------------- checks
def _check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_data(data: Any) -> DigitsSplit:
    if not isinstance(data, DigitsSplit):
        raise ValueError(f"data must be a DigitsSplit (ll.load_digits_split()), got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- fake quant + STE
def qat_fake_quantize(x: Tensor, qp: QParams, estimator: str = "clipped_ste") -> Tensor:
    """Fake quantization x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z) with a chosen backward.

    estimator="round":       autograd through round itself: d round(u)/du = 0, so dL/dx = 0
                             almost everywhere (the lecture's "the network learns nothing").
    estimator="ste":         dL/dx = dL/dx_fq everywhere (Hinton 2012; Bengio et al. 2013).
    estimator="clipped_ste": dL/dx = dL/dx_fq * 1[q_min <= round(x / S) + Z <= q_max]
                             (zero where the clamp is active; ``lecturelib.ste``).
    The forward value is the same for all three.
    Used in: 05_qat_ste.
    """
    _check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "clipped_ste":
        return ste_fake_quantize(x, qp)
    if estimator == "ste":
        x_fq = ste_fake_quantize(x.detach(), qp)
        return x_fq + (x - x.detach())  # value x_fq exactly, gradient 1 everywhere
    check_tensor(x)
    inv_scale, zp = qp.expand(1.0 / qp.scale), qp.expand(qp.zero_point).float()
    q = torch.clamp(torch.round(x * inv_scale) + zp, qp.qmin, qp.qmax)
    return (q - zp) * qp.expand(qp.scale)


def weight_qparams(W: Tensor, num_bits: int, weights: str) -> QParams:
    """QParams of a weight matrix (out, in) from its own min/max.

    per_tensor_asym:  one (S, Z) from [min W, max W];
    per_channel_sym:  S_o = max_k |W[o, k]| / q_max, Z = 0, one per output channel o;
    per_channel_asym: one (S_o, Z_o) per output channel.
    Paper: Krishnamoorthi 2018, sec. 2. Used in: 05_qat_ste.
    """
    _check_choice(weights, "weights", WEIGHT_SCHEMES)
    check_bits(num_bits)
    if weights == "per_tensor_asym":
        return choose_qparams(W, num_bits, symmetric=False, granularity=PerTensor())
    return choose_qparams(W, num_bits, symmetric=weights == "per_channel_sym", granularity=PerChannel(0))


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class QuantScheme:
    """How a fake-quantized model quantizes its weights and activations. Used in: 05_qat_ste."""

    num_bits: int = 8
    """Bits of the weights and of the activations (2..8)."""
    weights: str = "per_channel_sym"
    """One of WEIGHT_SCHEMES; activations are always per tensor, asymmetric, unsigned."""
    estimator: str = "clipped_ste"
    """Backward pass of round, one of ESTIMATORS."""
    ema_alpha: float = 0.02
    """EMA factor of the activation ranges during QAT: r <- alpha r_batch + (1 - alpha) r."""
    fold_bn: bool = True
    """With BatchNorm: fake-quantize the folded weights W gamma / sigma (True) or W itself (False)."""

    def __post_init__(self) -> None:
        check_bits(self.num_bits, 2, 8)
        _check_choice(self.weights, "weights", WEIGHT_SCHEMES)
        _check_choice(self.estimator, "estimator", ESTIMATORS)
        _check_unit(self.ema_alpha, "ema_alpha")
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"fold_bn must be True or False, got {self.fold_bn!r}")


class ActQuant(nn.Module):
    """Per-tensor asymmetric unsigned fake quantization of activations with a tracked range.

    calibrating: r_min = min over batches of min x, r_max likewise (PTQ calibration; no quantization);
    training:    r <- alpha r_batch + (1 - alpha) r (the lecture's EMA), then fake-quantize;
    eval:        fake-quantize with the frozen range.
    Paper: Jacob et al. 2018, sec. 3. Used in: 05_qat_ste.
    """

    def __init__(self, num_bits: int, estimator: str = "clipped_ste", ema_alpha: float = 0.02):
        super().__init__()
        self.num_bits = check_bits(num_bits, 2, 8)
        self.estimator = _check_choice(estimator, "estimator", ESTIMATORS)
        self.ema_alpha = _check_unit(ema_alpha, "ema_alpha")
        self.calibrating = False
        self.register_buffer("r_min", torch.tensor(math.inf))
        self.register_buffer("r_max", torch.tensor(-math.inf))

    def qparams(self, x: Tensor) -> QParams:
        """(S, Z) of the current range, unsigned codes 0..2^N - 1."""
        if not bool(torch.isfinite(self.r_min) & torch.isfinite(self.r_max)):
            raise ValueError("this ActQuant has no range yet: calibrate it first (QuantMLP.calibrate)")
        return qparams_with_range(x, float(self.r_min), float(self.r_max), self.num_bits, symmetric=False,
                                  signed=False)

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = x.detach().min(), x.detach().max()
        if self.calibrating:
            self.r_min.copy_(torch.minimum(self.r_min, lo))
            self.r_max.copy_(torch.maximum(self.r_max, hi))
            return x
        if self.training and self.ema_alpha > 0:
            a = self.ema_alpha
            self.r_min.copy_(a * lo + (1 - a) * self.r_min)
            self.r_max.copy_(a * hi + (1 - a) * self.r_max)
        return qat_fake_quantize(x, self.qparams(x), self.estimator)


class QuantLinear(nn.Module):
    """A linear layer for QAT: full-precision W, b (and BN gamma, beta) are trained; the forward
    pass uses the fake-quantized input and weights.

    without BN:             y = Q(x) Q(W)^T + b
    BN folded (fold_bn):    W' = W gamma / sigma,  b' = (b - mu) gamma / sigma + beta,  y = Q(x) Q(W')^T + b'
    BN unfolded:            y = gamma (Q(x) Q(W)^T + b - mu) / sigma + beta   (BN stays in float)
    with sigma = sqrt(running_var + eps); the BN statistics are frozen (Krishnamoorthi 2018, sec. 3.2).
    Paper: Jacob et al. 2018. Used in: 05_qat_ste.
    """

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, bn: nn.BatchNorm1d | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.scheme = scheme
        self.weight = nn.Parameter(linear.weight.detach().clone())  # the full-precision copy
        b = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features)
        self.bias = nn.Parameter(b)
        self.act = ActQuant(scheme.num_bits, scheme.estimator, scheme.ema_alpha)
        self.has_bn = bn is not None
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != linear.out_features:
                raise ValueError(f"bn must be an nn.BatchNorm1d({linear.out_features}), got {bn!r}")
            self.bn_weight = nn.Parameter(bn.weight.detach().clone())
            self.bn_bias = nn.Parameter(bn.bias.detach().clone())
            self.register_buffer("bn_mean", bn.running_mean.detach().clone())
            self.register_buffer("bn_var", bn.running_var.detach().clone())
            self.bn_eps = bn.eps

    def folded(self) -> tuple[Tensor, Tensor]:
        """(W', b'): the weights and bias with the BN folded in (W, b without BN); differentiable."""
        if not self.has_bn:
            return self.weight, self.bias
        k = self.bn_weight / torch.sqrt(self.bn_var + self.bn_eps)
        return self.weight * k[:, None], (self.bias - self.bn_mean) * k + self.bn_bias

    def quantized_weight(self) -> tuple[Tensor, QParams]:
        """The weight the forward pass multiplies with, fake-quantized (differentiable), and its qparams."""
        W = self.folded()[0] if (self.has_bn and self.scheme.fold_bn) else self.weight
        qp = weight_qparams(W.detach(), self.scheme.num_bits, self.scheme.weights)
        return qat_fake_quantize(W, qp, self.scheme.estimator), qp

    def forward(self, x: Tensor) -> Tensor:  # x: (B, in_features)
        x_fq = self.act(x)
        W_fq, _ = self.quantized_weight()
        if self.has_bn and self.scheme.fold_bn:
            return F.linear(x_fq, W_fq, self.folded()[1])
        y = F.linear(x_fq, W_fq, self.bias)  # (B, out_features)
        if self.has_bn:  # unfolded: BN in float after the quantized linear
            y = (y - self.bn_mean) * (self.bn_weight / torch.sqrt(self.bn_var + self.bn_eps)) + self.bn_bias
        return y


class QuantMLP(nn.Sequential):
    """QuantLinear -> ReLU -> ... -> QuantLinear: the fake-quantized twin of an ``MLP`` or ``MLPBN``.

    Used in: 05_qat_ste.
    """

    def quant_layers(self) -> list[QuantLinear]:
        """The QuantLinear layers in order."""
        return [m for m in self if isinstance(m, QuantLinear)]

    @torch.no_grad()
    def calibrate(self, X: Tensor, batch_size: int = 256) -> "QuantMLP":
        """PTQ calibration: r_min, r_max of every activation = min / max over the batches of X.

        Activations are not quantized while calibrating (the weights are, as they will be deployed).
        Used in: 05_qat_ste.
        """
        check_tensor(X, "X")
        for layer in self.quant_layers():
            layer.act.r_min.fill_(math.inf)
            layer.act.r_max.fill_(-math.inf)
            layer.act.calibrating = True
        was_training = self.training
        self.eval()
        try:
            for i in range(0, len(X), batch_size):
                self(X[i: i + batch_size])
        finally:
            for layer in self.quant_layers():
                layer.act.calibrating = False
            self.train(was_training)
        return self


class MLPBN(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> ... -> Linear: the digits MLP with BatchNorm, for folding.

    Used in: 05_qat_ste.
    """

    def __init__(self, sizes: list[int]):
        if len(sizes) < 3 or any((not isinstance(s, int)) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be a list of at least three positive ints, got {sizes!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU()]
        super().__init__(*layers)


def mlp_blocks(model: nn.Module) -> list[tuple[nn.Linear, nn.BatchNorm1d | None, bool]]:
    """The blocks of an MLP / MLPBN as (linear, bn or None, relu follows); anything else is a ValueError.

    Used in: 05_qat_ste (through prepare, fold_mlp and the toolchains).
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an ll.MLP or ll.qat.MLPBN (nn.Sequential), got {type(model).__name__}")
    mods, out, i = list(model), [], 0
    while i < len(mods):
        if not isinstance(mods[i], nn.Linear):
            raise ValueError("model must be Linear [BatchNorm1d] [ReLU] blocks; "
                             f"module {i} is {type(mods[i]).__name__}")
        lin, bn, relu = mods[i], None, False
        i += 1
        if i < len(mods) and isinstance(mods[i], nn.BatchNorm1d):
            bn, i = mods[i], i + 1
        if i < len(mods) and isinstance(mods[i], nn.ReLU):
            relu, i = True, i + 1
        out.append((lin, bn, relu))
    return out


def fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """A new Linear equal to bn(linear(x)) in eval mode: the BN folded into the weights.

    W' = diag(gamma / sqrt(var + eps)) W,   b' = gamma (b - mean) / sqrt(var + eps) + beta
    Paper: Jacob et al. 2018, sec. 3.2; Krishnamoorthi 2018, sec. 3.2. Used in: 05_qat_ste.
    """
    if not isinstance(linear, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
        raise ValueError(f"linear must be an nn.Linear and bn an nn.BatchNorm1d, got {type(linear).__name__} "
                         f"and {type(bn).__name__}")
    if bn.num_features != linear.out_features or bn.running_mean is None:
        raise ValueError(f"bn must track running stats over the {linear.out_features} outputs, got {bn!r}")
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(linear.weight.detach() * k[:, None])
        out.bias.copy_((b - bn.running_mean) * k + bn.bias.detach())
    return out


def fold_mlp(model: MLPBN) -> MLP:
    """The float ``MLP`` equal to an ``MLPBN`` in eval mode (every BN folded into its Linear).

    Used in: 05_qat_ste.
    """
    blocks = mlp_blocks(model)
    folded = MLP([blocks[0][0].in_features] + [lin.out_features for lin, _, _ in blocks])
    linears = [m for m in folded if isinstance(m, nn.Linear)]
    for dst, (lin, bn, _) in zip(linears, blocks):
        src = fold_batchnorm(lin, bn) if bn is not None else lin
        dst.load_state_dict(src.state_dict())
    return folded.eval()


def prepare(model: nn.Module, scheme: QuantScheme, X_calib: Tensor) -> QuantMLP:
    """Swap every Linear [+ BatchNorm1d] of an MLP / MLPBN for a QuantLinear, then calibrate.

    The original model is not changed (weights are copied). Activation ranges come from min/max
    over X_calib (PTQ calibration); QAT starts from there.
    Paper: Krishnamoorthi 2018, sec. 3. Used in: 05_qat_ste.
    """
    if not isinstance(scheme, QuantScheme):
        raise ValueError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
    layers: list[nn.Module] = []
    for lin, bn, relu in mlp_blocks(model):
        layers.append(QuantLinear(lin, scheme, bn))
        if relu:
            layers.append(nn.ReLU())
    return QuantMLP(*layers).calibrate(X_calib).eval()


def deploy(qmodel: QuantMLP) -> QuantMLP:
    """The model as it will be deployed: every BN folded into W, b and the folded W quantized.

    For a model trained with fold_bn=True this is the same function; with fold_bn=False the
    weights seen in training (Q(W), BN in float) differ from the deployed ones (Q(W gamma / sigma)).
    Used in: 05_qat_ste.
    """
    if not isinstance(qmodel, QuantMLP):
        raise ValueError(f"qmodel must be a QuantMLP (from prepare), got {type(qmodel).__name__}")
    layers: list[nn.Module] = []
    for m in qmodel:
        if isinstance(m, QuantLinear):
            W, b = (t.detach() for t in m.folded())
            lin = nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(W)
                lin.bias.copy_(b)
            new = QuantLinear(lin, m.scheme)
            new.act.load_state_dict(m.act.state_dict())
            layers.append(new)
        else:
            layers.append(copy.deepcopy(m))
    return QuantMLP(*layers).eval()


# ----------------------------------------------------------------------------- training loop
def fit(model: nn.Module, X: Tensor, y: Tensor, cfg: TrainConfig,
        on_step: Callable[[int], None] | None = None) -> list[float]:
    """Adam on shuffled minibatches with cross-entropy; returns the loss of every step.

    The same loop as ``ll.train_classifier`` with a hook: ``on_step(step)`` runs after each
    optimizer step (oscillation tracking). Deterministic for a given cfg.seed.
    Used in: 05_qat_ste.
    """
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {cfg.epochs} and {cfg.batch_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, step = [], 0
    model.train()
    for _ in progress(range(cfg.epochs), desc="QAT epochs"):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), cfg.batch_size):
            idx = perm[i: i + cfg.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step)
    model.eval()
    return losses


# ----------------------------------------------------------------------------- PTQ / QAT drivers
@dataclass
class QATResult:
    """What a PTQ or QAT run returns. Used in: 05_qat_ste."""

    model: nn.Module
    """The fake-quantized model (eval mode)."""
    accuracy: float
    """Test accuracy of the fake-quantized model after training (PTQ: no training)."""
    start_accuracy: float
    """Test accuracy before any QAT step (the PTQ accuracy when starting from a trained model)."""
    losses: list[float] = field(default_factory=list)
    """Training loss of every QAT step (empty for PTQ)."""
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    """(step, test accuracy) at the end of each epoch (and step 0)."""


def ptq(model: nn.Module, data: DigitsSplit, scheme: QuantScheme) -> QATResult:
    """Post-training quantization: prepare (min/max calibration on the training set), evaluate.

    Used in: 05_qat_ste.
    """
    data = _check_data(data)
    qm = prepare(model, scheme, data.X_train)
    acc = accuracy(qm, data.X_test, data.y_test)
    return QATResult(qm, acc, acc)


def qat(model: nn.Module, data: DigitsSplit, scheme: QuantScheme, cfg: TrainConfig,
        on_step: Callable[[QuantMLP, int], None] | None = None) -> QATResult:
    """Quantization-aware training: prepare (calibrate), then train the full-precision copy through
    the fake-quantized forward pass with the scheme's estimator.

    W <- W - lr * Adam(dL/dQ(W) * dQ(W)/dW),  dQ(W)/dW given by the estimator (STE: 1).
    Paper: Jacob et al. 2018; Krishnamoorthi 2018, sec. 3. Used in: 05_qat_ste.
    """
    data = _check_data(data)
    qm = prepare(model, scheme, data.X_train)
    start = accuracy(qm, data.X_test, data.y_test)
    history = [(0, start)]
    steps_per_epoch = math.ceil(len(data.X_train) / cfg.batch_size)

    def hook(step: int) -> None:
        if on_step is not None:
            on_step(qm, step)
        if step % steps_per_epoch == 0:
            history.append((step, accuracy(qm.eval(), data.X_test, data.y_test)))
            qm.train()

    losses = fit(qm, data.X_train, data.y_train, cfg, hook)
    return QATResult(qm, accuracy(qm, data.X_test, data.y_test), start, losses, history)


def ptq_vs_qat(model: nn.Module, data: DigitsSplit, bits: tuple[int, ...] = (8, 4, 3, 2),
               schemes: tuple[str, ...] = TABLE_SCHEMES, cfg: TrainConfig | None = None) -> list[dict]:
    """The PTQ vs QAT table: rows {method, granularity, bits, accuracy} for every scheme and bit width.

    PTQ = min/max calibration; QAT = ``qat`` from the same float model with cfg.
    Paper: Krishnamoorthi 2018, table 4 (8 bits); here also 4, 3, 2 bits. Used in: 05_qat_ste.
    """
    cfg = cfg or TrainConfig(epochs=10, lr=1e-3)
    for s in schemes:
        _check_choice(s, "schemes[i]", WEIGHT_SCHEMES)
    rows = []
    for s in schemes:
        for b in bits:
            scheme = QuantScheme(num_bits=b, weights=s)
            rows.append({"method": "PTQ", "granularity": s, "bits": b, "accuracy": ptq(model, data, scheme).accuracy})
            rows.append({"method": "QAT", "granularity": s, "bits": b,
                         "accuracy": qat(model, data, scheme, cfg).accuracy})
    return rows


# ----------------------------------------------------------------------------- LSQ
class LSQFakeQuantize(torch.autograd.Function):
    """LSQ forward and backward (Esser et al. 2020, eq. 1-3); see ``lsq_fake_quantize``. Used in: 05_qat_ste."""

    @staticmethod
    def forward(ctx, v: Tensor, s: Tensor, qmin: int, qmax: int, g: float) -> Tensor:  # type: ignore[override]
        u = v / s
        ctx.save_for_backward(u)
        ctx.qmin, ctx.qmax, ctx.g = qmin, qmax, g
        return torch.round(torch.clamp(u, qmin, qmax)) * s

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None, None]:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        below, above = u < ctx.qmin, u > ctx.qmax
        inside = ~(below | above)
        grad_v = grad_out * inside.to(grad_out.dtype)
        d_s = torch.where(below, float(ctx.qmin), torch.where(above, float(ctx.qmax), torch.round(u) - u))
        grad_s = (grad_out * d_s).sum().reshape(1) * ctx.g
        return grad_v, grad_s, None, None, None


def lsq_grad_scale(num_elements: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N q_max), N = weights in the layer (or features per sample).

    Paper: Esser et al. 2020, sec. 2.2. Used in: 05_qat_ste.
    """
    if isinstance(num_elements, bool) or not isinstance(num_elements, int) or num_elements < 1:
        raise ValueError(f"num_elements must be a positive int, got {num_elements!r}")
    if isinstance(qmax, bool) or not isinstance(qmax, int) or qmax < 1:
        raise ValueError(f"qmax must be a positive int, got {qmax!r}")
    return 1.0 / math.sqrt(num_elements * qmax)


def lsq_fake_quantize(v: Tensor, s: Tensor, qmin: int, qmax: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ fake quantization with a learnable step size s (Z = 0):

    forward:   v_hat = round(clamp(v / s, q_min, q_max)) s
    backward:  dv_hat/dv = 1 if q_min <= v / s <= q_max else 0                       (clipped STE)
               dv_hat/ds = round(v / s) - v / s   if q_min <= v / s <= q_max
                           q_min or q_max         if v / s is below / above the range
               and dL/ds is multiplied by grad_scale (g = 1 / sqrt(N q_max), ``lsq_grad_scale``).
    Only q_min, q_max are piecewise-exact derivatives; round(v/s) - v/s is the STE's contribution
    (the true derivative there is round(v/s)), which makes s feel each value's distance to the
    next rounding threshold. Paper: Esser et al., ICLR 2020, eq. 3. Used in: 05_qat_ste.
    """
    check_tensor(v, "v")
    if not isinstance(s, Tensor) or s.numel() != 1 or not bool(s.detach().reshape(()) > 0):
        raise ValueError(f"s must be a one-element tensor > 0, got {s!r}")
    if not (isinstance(qmin, int) and isinstance(qmax, int) and qmin < qmax and qmin <= 0 <= qmax):
        raise ValueError(f"qmin, qmax must be ints with qmin <= 0 <= qmax and qmin < qmax, got {qmin}, {qmax}")
    if not isinstance(grad_scale, (int, float)) or not grad_scale > 0:
        raise ValueError(f"grad_scale must be a number > 0, got {grad_scale!r}")
    return LSQFakeQuantize.apply(v, s.reshape(1), qmin, qmax, float(grad_scale))


class LSQQuantizer(nn.Module):
    """A per-tensor LSQ quantizer: learnable step s, signed (weights) or unsigned (ReLU outputs).

    Initialised on the first tensor it sees: s = 2 mean|v| / sqrt(q_max) (Esser et al. 2020).
    Used in: 05_qat_ste.
    """

    def __init__(self, num_bits: int, signed: bool):
        super().__init__()
        self.num_bits = check_bits(num_bits, 2, 8)
        self.qmin, self.qmax = qrange(num_bits, signed)
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("initialized", torch.tensor(False))

    def codes(self, v: Tensor) -> Tensor:
        """Integer codes clamp(round(v / s), q_min, q_max) (int64, no gradient)."""
        return torch.clamp(torch.round(v.detach() / self.step.detach()), self.qmin, self.qmax).long()

    def forward(self, v: Tensor, num_elements: int) -> Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.fill_(max(2 * float(v.detach().abs().mean()) / math.sqrt(self.qmax), 1e-8))
            self.initialized.fill_(True)
        g = lsq_grad_scale(num_elements, self.qmax)
        return lsq_fake_quantize(v, self.step, self.qmin, self.qmax, g)


class LSQLinear(nn.Module):
    """y = LSQ_a(x) LSQ_w(W)^T + b: signed weight codes, unsigned input codes (inputs are >= 0).

    Gradient scales: g_w = 1 / sqrt(numel(W) q_max), g_a = 1 / sqrt(in_features q_max).
    Paper: Esser et al. 2020. Used in: 05_qat_ste.
    """

    def __init__(self, linear: nn.Linear, num_bits: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.w_quant = LSQQuantizer(num_bits, signed=True)
        self.a_quant = LSQQuantizer(num_bits, signed=False)

    def forward(self, x: Tensor) -> Tensor:
        x_q = self.a_quant(x, x.shape[-1])
        return F.linear(x_q, self.w_quant(self.weight, self.weight.numel()), self.bias)


def prepare_lsq(model: MLP, num_bits: int, X_init: Tensor) -> nn.Sequential:
    """LSQLinear -> ReLU -> ... copies of an MLP, step sizes initialised on one forward pass of X_init.

    Used in: 05_qat_ste.
    """
    layers: list[nn.Module] = []
    for lin, bn, relu in mlp_blocks(model):
        if bn is not None:
            raise ValueError("prepare_lsq takes an MLP without BatchNorm; fold it first (fold_mlp)")
        layers.append(LSQLinear(lin, num_bits))
        if relu:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    with torch.no_grad():
        net(X_init)
    return net.eval()


class OscillationTracker:
    """Integer weight codes step by step: how many flip, and how many flip back (Nagel et al. 2022).

    flip at step t:        q_t != q_{t-1}
    oscillation at step t: a flip whose direction is opposite to the same weight's previous flip
    The latent values W / s of one layer are also kept (for the trajectory plot).
    Used in: 05_qat_ste.
    """

    def __init__(self, layers: list[LSQLinear], latent_layer: int = -1):
        self.layers = layers
        self.latent_layer = latent_layer
        self.prev = self._codes()
        self.last_dir = torch.zeros_like(self.prev)
        self.flip_fraction: list[float] = []
        self.oscillation_fraction: list[float] = []
        self.oscillations = torch.zeros_like(self.prev)
        self.latent: list[Tensor] = [self._latent()]

    def _codes(self) -> Tensor:
        return torch.cat([m.w_quant.codes(m.weight).flatten() for m in self.layers])

    def _latent(self) -> Tensor:
        m = self.layers[self.latent_layer]
        return (m.weight.detach() / m.w_quant.step.detach()).flatten().clone()

    def update(self) -> None:
        """Record one optimizer step."""
        q = self._codes()
        d = torch.sign(q - self.prev)
        flipped = d != 0
        osc = flipped & (d == -self.last_dir)
        self.last_dir = torch.where(flipped, d, self.last_dir)
        self.oscillations += osc.long()
        self.flip_fraction.append(float(flipped.float().mean()))
        self.oscillation_fraction.append(float(osc.float().mean()))
        self.latent.append(self._latent())
        self.prev = q

    def most_oscillating_latent(self) -> Tensor:
        """(steps + 1,) trajectory of W / s for the latent-layer weight that oscillated most."""
        n = self.latent[0].numel()
        counts = self.oscillations[-n:] if self.latent_layer == -1 else self._layer_slice(self.oscillations)
        return torch.stack(self.latent)[:, int(counts.argmax())]

    def _layer_slice(self, t: Tensor) -> Tensor:
        sizes = [m.weight.numel() for m in self.layers]
        i = self.latent_layer % len(self.layers)
        start = sum(sizes[:i])
        return t[start: start + sizes[i]]


@dataclass
class LSQResult:
    """What ``lsq_qat`` returns. Used in: 05_qat_ste."""

    model: nn.Module
    """The LSQ model (eval mode)."""
    accuracy: float
    """Test accuracy after training."""
    start_accuracy: float
    """Test accuracy with the initial step sizes, before training."""
    losses: list[float]
    """Training loss of every step."""
    tracker: OscillationTracker
    """Flip and oscillation fractions per step, and the latent trajectory of the last layer."""


def lsq_qat(model: MLP, data: DigitsSplit, num_bits: int, cfg: TrainConfig) -> LSQResult:
    """QAT with learned step sizes (weights and activations), tracking weight oscillations.

    Paper: Esser et al. 2020; oscillations: Nagel et al. 2022. Used in: 05_qat_ste.
    """
    data = _check_data(data)
    net = prepare_lsq(model, num_bits, data.X_train)
    start = accuracy(net, data.X_test, data.y_test)
    tracker = OscillationTracker([m for m in net if isinstance(m, LSQLinear)])
    losses = fit(net, data.X_train, data.y_train, cfg, lambda step: tracker.update())
    return LSQResult(net, accuracy(net, data.X_test, data.y_test), start, losses, tracker)


# ----------------------------------------------------------------------------- convert
class IntegerMLP(nn.Module):
    """A QAT model converted to integer-only layers (``lecturelib.intops``).

    q_x = quantize(x) (unsigned codes of the first ActQuant, the only float step per input);
    hidden: q_h = max(int_linear(q_x, q_W, ...), Z_h), requantized with M0 2^-n onto the next
            ActQuant's (S, Z) and clamped to 0..2^N - 1 (ReLU = clamp at Z_h);
    last:   logits = S_x S_W (q_x q_W^T - Z_x sum_k q_W) + b (int32 accumulator read out as float).
    Weights are symmetric per output channel (Z_W = 0), stored as int8 codes.
    Paper: Jacob et al. 2018, sec. 2. Used in: 05_qat_ste.
    """

    def __init__(self, qmodel: QuantMLP):
        super().__init__()
        model = deploy(qmodel)
        layers = model.quant_layers()
        for layer in layers:
            if layer.scheme.weights != "per_channel_sym":
                raise ValueError("convert needs weights='per_channel_sym' (Z_W = 0, as fbgemm), "
                                 f"got {layer.scheme.weights!r}")
        self.num_layers = len(layers)
        for i, layer in enumerate(layers):
            W = layer.weight.detach()
            qp = weight_qparams(W, layer.scheme.num_bits, "per_channel_sym")
            self.register_buffer(f"q_w{i}", quantize(W, qp).to(torch.int8))
            self.register_buffer(f"s_w{i}", qp.scale.reshape(-1).clone())
            self.register_buffer(f"b{i}", layer.bias.detach().clone())
            aqp = layer.act.qparams(W[:1, :1])
            self.register_buffer(f"s_x{i}", aqp.scale.reshape(()).clone())
            self.register_buffer(f"z_x{i}", aqp.zero_point.reshape(()).clone())
        self.num_bits = layers[0].scheme.num_bits

    def hidden_codes(self, x: Tensor) -> list[Tensor]:
        """The integer codes entering every layer (int64), computed with integers after the first."""
        from .intops import int_linear

        check_tensor(x, "x")
        qmax = 2**self.num_bits - 1
        s0, z0 = float(self.s_x0), int(self.z_x0)
        q = torch.clamp(torch.round(x.float() * (1.0 / self.s_x0)) + z0, 0, qmax).long()
        codes = [q]
        for i in range(self.num_layers - 1):
            s_x, z_x = (s0, z0) if i == 0 else (float(getattr(self, f"s_x{i}")), int(getattr(self, f"z_x{i}")))
            s_y, z_y = float(getattr(self, f"s_x{i + 1}")), int(getattr(self, f"z_x{i + 1}"))
            q = int_linear(q, z_x, s_x, getattr(self, f"q_w{i}").long(), getattr(self, f"s_w{i}"),
                           getattr(self, f"b{i}"), s_y, z_y, qmin_y=0, qmax_y=qmax)
            q = q.clamp(min=z_y)  # ReLU in integers
            codes.append(q)
        return codes

    def forward(self, x: Tensor) -> Tensor:
        q = self.hidden_codes(x)[-1]
        i = self.num_layers - 1
        q_w = getattr(self, f"q_w{i}").long()
        acc = q @ q_w.T - int(getattr(self, f"z_x{i}")) * q_w.sum(1)  # int64 accumulator
        return acc.float() * (getattr(self, f"s_x{i}") * getattr(self, f"s_w{i}")) + getattr(self, f"b{i}")


def convert(qmodel: QuantMLP) -> IntegerMLP:
    """The QAT model as integer-only inference (per-channel symmetric weights only).

    Used in: 05_qat_ste.
    """
    return IntegerMLP(qmodel)


def fake_quant_codes(qmodel: QuantMLP, x: Tensor) -> list[Tensor]:
    """The unsigned codes entering every layer of the fake-quant forward (to compare with ``convert``).

    code = round(x_fq / S) + Z, read off the ActQuant of each layer. Used in: 05_qat_ste.
    """
    model = deploy(qmodel)
    codes, h = [], x
    with torch.no_grad():
        for m in model:
            if isinstance(m, QuantLinear):
                qp = m.act.qparams(h)
                codes.append(quantize(h, qp).long())
            h = m(h)
    return codes


# ----------------------------------------------------------------------------- figures + widget
def plot_ste_mask(x: Tensor, num_bits: int, r_min: float, r_max: float, axes: Any = None) -> dict[str, float]:
    """Left: the fake-quant transfer curve Q(x) and the clipped-STE gradient mask over [r_min, r_max];
    right: a histogram of x, split into the values that pass a gradient and those that do not.

    mask = 1[q_min <= round(x / S) + Z <= q_max]; returns {"scale", "zero_point", "pass_fraction"}.
    Used in: 05_qat_ste (the STE explorer).
    """
    import matplotlib.pyplot as plt

    check_tensor(x)
    check_bits(num_bits, 2, 8)
    if not r_min < r_max:
        raise ValueError(f"r_min must be < r_max, got {r_min} and {r_max}")
    x = x.detach().flatten().float()
    qp = qparams_with_range(x, r_min, r_max, num_bits, symmetric=False)
    lo, hi = min(float(x.min()), r_min) - 0.1 * (r_max - r_min), max(float(x.max()), r_max) + 0.1 * (r_max - r_min)
    grid = torch.linspace(lo, hi, 801, requires_grad=True)
    gqp = qparams_with_range(grid.detach(), r_min, r_max, num_bits, symmetric=False)
    y = ste_fake_quantize(grid, gqp)
    y.sum().backward()
    xg = x.clone().requires_grad_(True)
    ste_fake_quantize(xg, qp).sum().backward()
    passes = xg.grad > 0
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    ax = axes[0]
    ax.plot(grid.detach(), grid.detach(), color="0.7", lw=1, label="identity")
    ax.plot(grid.detach(), y.detach(), color="tab:blue", label=f"Q(x), {num_bits}-bit")
    ax2 = ax.twinx()
    ax2.fill_between(grid.detach(), 0, grid.grad, color="tab:green", alpha=0.15, step="mid")
    ax2.set_ylim(0, 3)
    ax2.set_yticks([0, 1])
    ax2.set_ylabel("clipped-STE gradient", color="tab:green")
    ax.set_xlabel("x")
    ax.set_ylabel("Q(x)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"range [{r_min:.2f}, {r_max:.2f}], S = {qp.scale.item():.3f}", fontsize=9)
    ax = axes[1]
    bins = torch.linspace(float(x.min()), float(x.max()), 61).numpy()
    ax.hist([x[passes].numpy(), x[~passes].numpy()], bins=bins, stacked=True, color=["tab:green", "tab:red"],
            label=["gradient passes", "clipped: gradient 0"])
    ax.set_yscale("log")
    ax.set_xlabel("activation value")
    ax.legend(fontsize=8)
    frac = float(passes.float().mean())
    ax.set_title(f"{100 * frac:.1f}% of the values get a gradient", fontsize=9)
    return {"scale": qp.scale.item(), "zero_point": int(qp.zero_point.item()), "pass_fraction": frac}


def ste_mask_explorer(x: Tensor, max_bits: int = 8) -> Any:
    """An ipywidgets explorer: bit width and clip range [r_min, r_max] -> ``plot_ste_mask``.

    Used in: 05_qat_ste.
    """
    from .explorers import explorer, int_slider, range_slider

    check_tensor(x)
    x = x.detach().flatten().float()
    x_lo, x_hi = float(x.min()), float(x.max())
    span = x_hi - x_lo or 1.0

    def draw(num_bits: int, clip_range: tuple[float, float]) -> None:
        lo, hi = clip_range
        if not hi > lo:
            raise ValueError(f"the clip range must have r_max > r_min, got [{lo:.3f}, {hi:.3f}]")
        plot_ste_mask(x, num_bits, lo, hi)

    return explorer(
        draw,
        title="Which values get a gradient through the STE?",
        num_bits=int_slider(4, 2, max_bits, description="num_bits"),
        clip_range=range_slider((x_lo, x_lo + 0.5 * span), x_lo - 0.25 * span, x_hi + 0.25 * span,
                                span / 200, description="clip range"),
    )
