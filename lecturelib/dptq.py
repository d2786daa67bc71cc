"""Catastrophic failure under dynamic post-training quantization (DPTQ): robust and detrimental
network-policy pairs, a laptop-scale reference implementation.

Paper: "Catastrophic failure from dynamic post-training quantization" (seed 001 in
shared/seeds; no public code). Pipeline:

1. a black-box teacher (trained normally, then only queried);
2. a white-box student by "patient and consistent" KD (Beyer et al. 2022): KL with temperature,
   mixup, augmentation, no cross-entropy to labels;
3. self-distillation of the white box into a robust R and a detrimental D copy, each with its own
   bit-width policy CNN that outputs an L x K matrix of logits (L quantized activations, K options);
4. the policy's scores go through an exact multiple-choice knapsack DP (one option per layer,
   sum of bits == budget) and a straight-through estimator (onehot - scores).detach() + scores;
5. weights: static, uniform symmetric (16 bits); activations: dynamic per example, uniform
   asymmetric, at the policy's bit widths, with gradients through each example's min/max;
6. hinge losses on the quantized student's softmax (robust: teacher's top-1 beats its top-2 by a
   margin; detrimental: some other class beats the teacher's top-1 by the margin) + KD on the
   unquantized student. The policy's gradient comes only from the hinge loss.

Choices the paper leaves open, made here: knapsack profits are the policy's logits (softmax profits
made the policies settle on one allocation), the policy has its own learning rate, BatchNorm
statistics stay frozen while fine-tuning (else the quantized pass updates the statistics that the
full-precision network uses at test time), and D's schedule is long with an early cosine tail: the
hinge first drags both the quantized and the full-precision network down, and only while the learning
rate decays does the KD term pull the full-precision network back while the quantized one stays broken.
Whether that recovery happens depends on the seed, so notebook 09 tries a few seeds per D and keeps the
first that meets the goals on the validation split. ``plant_outlier_channel`` builds a hand-made
weakness of the kind D learns (a zero bin that swallows a layer), used in notebook 09 for comparison.

Terminology: "dynamic" in the paper = bit widths chosen per input by a policy. PyTorch's
"dynamic quantization" = fixed int8 weights with an activation scale computed at run time.
Everything here is device-agnostic: tensors follow the model's device.
"""

from __future__ import annotations

import copy
import itertools
import math
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import progress
from .quantizers import choose_qparams, fake_quantize

Tensor = torch.Tensor

OPTION_SETS: dict[str, list[int]] = {
    "I": list(range(3, 11)),
    "II": list(range(4, 11)),
    "III": list(range(5, 11)),
}
"""The paper's bit-width option sets I, II, III."""
BUDGET_AVG_BITS: dict[str, float] = {"A": 4.0, "B": 5.5, "C": 7.0}
"""Average bits per layer of the paper's budgets A, B, C."""


# ----------------------------------------------------------------------------- configs
@dataclass
class KDConfig:
    """Patient-and-consistent knowledge distillation (teacher -> white box)."""

    epochs: int = 60
    """Passes over the training set."""
    lr: float = 3e-3
    """Adam learning rate (cosine decay to 0)."""
    batch_size: int = 64
    """Examples per step."""
    temperature: float = 2.0
    """Softmax temperature T of both teacher and student in the KL loss."""
    mixup_alpha: float = 0.4
    """Beta(alpha, alpha) mixing coefficient of mixup; 0 turns mixup off."""
    augment: bool = True
    """Random 1-pixel shifts of the input."""
    seed: int = 0
    """Seed of the batch order, mixup and augmentation."""


@dataclass
class PairConfig:
    """Self-distillation of the white box into a robust (R) or detrimental (D) network-policy pair."""

    options: list[int] = field(default_factory=lambda: list(range(3, 11)))
    """Bit-width options (K of them), e.g. OPTION_SETS['I'] = [3..10]."""
    budget: int = 22
    """Total activation bits over the L layers; every allocation sums to exactly this."""
    epochs: int = 80
    """Passes over the training set (R converges in far fewer; D needs the long schedule)."""
    lr: float = 2e-3
    """Adam learning rate of the student: constant for the first const_frac of the steps, then a cosine tail."""
    policy_lr: float = 1e-2
    """Adam learning rate of the policy (same schedule); at 1e-3 the policies drifted between allocations."""
    const_frac: float = 0.3
    """Share of the steps at constant learning rate. Cosine from the start prevented D's failure; a short
    tail (0.75 of 10 epochs) left D's full-precision accuracy collapsed with its quantized accuracy."""
    hinge_weight: float = 4.0
    """lambda in loss = KL + lambda * hinge."""
    margin: float = 0.3
    """Softmax margin m of the hinge losses."""
    temperature: float = 2.0
    """KD temperature for the unquantized student."""
    batch_size: int = 64
    """Examples per step."""
    weight_bits: int = 16
    """Static symmetric weight bits at evaluation (16 in the paper)."""
    profit: str = "logits"
    """Knapsack profits: the policy's raw 'logits' or their 'softmax' (the paper allows both; with
    softmax profits the policies settled on one allocation for every input)."""
    freeze_bn: bool = True
    """Keep BatchNorm in eval mode while fine-tuning: otherwise the quantized pass also updates the
    running statistics that the full-precision network uses at test time."""
    detach_range: bool = False
    """Detach each example's activation min/max (the feasibility run: then D barely breaks)."""
    seed: int = 0
    """Seed of the policy's initialisation and the batch order."""


PROFITS = ("logits", "softmax")
HISTORY_KEYS = ("kd", "hinge", "fp_agree", "q_agree")
"""Allowed PairConfig.profit values."""


# ----------------------------------------------------------------------------- checks
def _check_options(options: Sequence[int]) -> list[int]:
    opts = [int(o) for o in options]
    if len(opts) == 0 or any(o < 2 or o > 16 for o in opts) or len(set(opts)) != len(opts):
        raise ValueError(f"options must be distinct bit widths in 2..16, got {list(options)!r}")
    return opts


def feasible_budgets(num_layers: int, options: Sequence[int]) -> list[int]:
    """All budgets reachable as a sum of one option per layer (min(options)*L .. max(options)*L).

    Used in: 09_dptq_catastrophic_failure
    """
    opts = _check_options(options)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    reach = {0}
    for _ in range(num_layers):
        reach = {r + o for r in reach for o in opts}
    return sorted(reach)


def budget_for(num_layers: int, avg_bits: float | str, options: Sequence[int]) -> int:
    """Budget = round(avg_bits * L), avg_bits a number or the paper's 'A' (4), 'B' (5.5), 'C' (7).

    For a letter and an option set whose smallest option exceeds 3 (the paper's II and III), one bit
    per layer is added: the paper adds 20 / 30 / 80 bits to its ResNet18 / MobileNetV4 / RegNetX
    budgets for II and III, about one bit per quantized layer, so that budget A stays feasible.
    Used in: 09_dptq_catastrophic_failure
    """
    if isinstance(avg_bits, str):
        if avg_bits not in BUDGET_AVG_BITS:
            raise ValueError(f"avg_bits must be a number or one of {list(BUDGET_AVG_BITS)}, got {avg_bits!r}")
        avg_bits = BUDGET_AVG_BITS[avg_bits] + (1.0 if min(_check_options(options)) > 3 else 0.0)
    b = int(round(avg_bits * num_layers))
    if b not in feasible_budgets(num_layers, options):
        raise ValueError(f"budget {b} is infeasible for L={num_layers} and options {list(options)}")
    return b


# ----------------------------------------------------------------------------- knapsack
def mckp_select(scores: Tensor, options: Sequence[int], budget: int) -> Tensor:
    """Exact multiple-choice knapsack: one option per layer, sum of bits == budget, max summed score.

    dp[l][c] = max_k dp[l-1][c - w_k] + s[l, k],   dp[0][0] = 0, dp[0][c>0] = -inf;
    answer dp[L][budget], recovered by back-pointers. w_k = options[k].
    scores: (L, K) or (B, L, K). Returns the one-hot selection, same shape and dtype as scores.
    Paper: Sect. 3.4 (MCKP post-processing, Sinha & Zoltners 1979).
    Used in: 09_dptq_catastrophic_failure
    """
    opts = _check_options(options)
    if scores.ndim not in (2, 3) or scores.shape[-1] != len(opts):
        raise ValueError(f"scores must have shape (L, K) or (B, L, K) with K={len(opts)}, got {tuple(scores.shape)}")
    squeeze = scores.ndim == 2
    s = scores.detach().double()
    if squeeze:
        s = s[None]
    B, L, K = s.shape
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an int, got {budget!r}")
    budget = int(budget)
    if budget not in feasible_budgets(L, opts):
        raise ValueError(
            f"budget must be a reachable sum of one option per layer, in {L * min(opts)}..{L * max(opts)}; "
            f"got {budget} for L={L} and options {opts}"
        )
    C = budget
    neg = -math.inf
    dp = torch.full((B, C + 1), neg, dtype=torch.float64, device=s.device)
    dp[:, 0] = 0.0
    back = torch.zeros((L, B, C + 1), dtype=torch.long, device=s.device)
    for l in range(L):
        cand = torch.full((B, K, C + 1), neg, dtype=torch.float64, device=s.device)
        for k, w in enumerate(opts):
            if w <= C:
                cand[:, k, w:] = dp[:, : C + 1 - w] + s[:, l, k : k + 1]
        dp, back[l] = cand.max(dim=1)
    sel = torch.zeros((B, L, K), dtype=scores.dtype, device=scores.device)
    c = torch.full((B,), C, dtype=torch.long, device=s.device)
    ar = torch.arange(B, device=s.device)
    w_t = torch.tensor(opts, dtype=torch.long, device=s.device)
    for l in reversed(range(L)):
        k = back[l, ar, c]
        sel[ar, l, k] = 1
        c = c - w_t[k]
    return sel[0] if squeeze else sel


def ste_select(scores: Tensor, options: Sequence[int], budget: int) -> Tensor:
    """Straight-through knapsack: forward = the one-hot MCKP choice, backward = identity to scores.

    out = (onehot - scores).detach() + scores
    Paper: Sect. 3.4.
    Used in: 09_dptq_catastrophic_failure
    """
    onehot = mckp_select(scores, options, budget)
    return (onehot - scores).detach() + scores


def random_selection(batch: int, num_layers: int, options: Sequence[int], budget: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """A random budget-respecting allocation per example: MCKP on uniform random scores.

    sel = mckp_select(U(0,1)^(B, L, K)). Paper: the "Random" row of Table 3.
    Used in: 09_dptq_catastrophic_failure
    """
    opts = _check_options(options)
    u = torch.rand((batch, num_layers, len(opts)), generator=generator)
    return mckp_select(u, opts, budget)


def selection_bits(sel: Tensor, options: Sequence[int]) -> Tensor:
    """Bits per layer of a one-hot selection: bits[..., l] = sum_k sel[..., l, k] * options[k].

    Used in: 09_dptq_catastrophic_failure
    """
    w = torch.tensor(_check_options(options), dtype=sel.dtype, device=sel.device)
    return (sel * w).sum(-1)


# ----------------------------------------------------------------------------- quantization
def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _example_range(x: Tensor, detach_range: bool) -> tuple[Tensor, Tensor]:
    """Per example n: (min(0, min x_n), max(0, max x_n)), optionally detached from the graph."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(1).clamp(max=0.0)
    hi = flat.amax(1).clamp(min=0.0)
    return (lo.detach(), hi.detach()) if detach_range else (lo, hi)


def dynamic_fake_quantize(x: Tensor, num_bits: int, detach_range: bool = False) -> Tensor:
    """Per-example asymmetric (unsigned) fake quantization with each example's own min/max.

    Per example n: r_min = min(0, min x_n), r_max = max(0, max x_n), S = (r_max - r_min) / (2^b - 1),
    Z = clamp(-round(r_min / S), 0, 2^b - 1), x_fq = S (clamp(round(x / S) + Z, 0, 2^b - 1) - Z).
    Same values as quantizers.choose_qparams(x_n, b, signed=False) + fake_quantize, but differentiable:
    round uses the STE and the gradient also flows through S and Z into min/max (unless detach_range).
    Paper: Sect. 3.2 (dynamic activation quantization); Jacob et al. 2018 for the formula.
    Used in: 09_dptq_catastrophic_failure
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int in 2..16, got {num_bits!r}")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension")
    lo, hi = _example_range(x, detach_range)
    qmax = 2**num_bits - 1
    tiny = torch.finfo(torch.float32).tiny
    scale = ((hi - lo) / qmax).clamp(min=tiny)
    const = (hi - lo) <= 0
    scale = torch.where(const, torch.ones_like(scale), scale)
    zp = torch.clamp(-_round_ste(lo / scale), 0, qmax)
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, z = scale.reshape(shape), zp.reshape(shape)
    q = torch.clamp(_round_ste(x * (1.0 / s)) + z, 0, qmax)
    return s * (q - z)


def _clamp_like_scalar(t: Tensor, hi: Tensor) -> Tensor:
    """clamp(t, 0, hi) with a broadcast tensor hi and the gradient of torch.clamp with scalar bounds: 1 where
    0 < t < hi, else 0 (bounds excluded; clamp with tensor bounds, and min/max, give 1/2 at the bounds)."""
    inside = (t > 0) & (t < hi)
    return torch.where(inside, t, torch.minimum(t.clamp(min=0.0), hi).detach())


def dynamic_fake_quantize_options(x: Tensor, options: Sequence[int], detach_range: bool = False) -> Tensor:
    """dynamic_fake_quantize(x, b) for every b in options at once: returns a (K, *x.shape) tensor.

    One vectorized pass instead of K: the policy's straight-through gradient needs every option's
    quantized activation in each training step (d loss / d sel[:, l, k] = <d loss / d a_l, Q_k(a_l)>).
    Values equal dynamic_fake_quantize option by option (tested).
    Used in: 09_dptq_catastrophic_failure
    """
    opts = _check_options(options)
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension")
    lo, hi = _example_range(x, detach_range)
    qmax = (2.0 ** torch.tensor(opts, dtype=x.dtype, device=x.device) - 1).reshape(-1, 1)  # (K, 1)
    tiny = torch.finfo(torch.float32).tiny
    scale = ((hi - lo) / qmax).clamp(min=tiny)  # (K, B)
    const = (hi - lo) <= 0
    scale = torch.where(const, torch.ones_like(scale), scale)
    zp = _clamp_like_scalar(-_round_ste(lo / scale), qmax)
    shape = scale.shape + (1,) * (x.ndim - 1)
    s, z, qm = scale.reshape(shape), zp.reshape(shape), qmax.reshape((-1,) + (1,) * x.ndim)
    q = _clamp_like_scalar(_round_ste(x.unsqueeze(0) * (1.0 / s)) + z, qm)
    return s * (q - z)


def quantize_weights_(model: nn.Module, num_bits: int = 16) -> nn.Module:
    """Static uniform symmetric per-tensor weight quantization of every Conv/Linear, in place.

    W <- S * clamp(round(W / S), -2^(b-1)+1, 2^(b-1)-1), S = max|W| / (2^(b-1)-1) (quantizers.choose_qparams).
    Biases and normalization layers are left untouched. Paper: Sect. 4 (16-bit weights).
    Used in: 09_dptq_catastrophic_failure
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int in 2..16, got {num_bits!r}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                W = m.weight.detach().float().cpu()
                m.weight.copy_(fake_quantize(W, choose_qparams(W, num_bits, symmetric=True)).to(m.weight))
    return model


# ----------------------------------------------------------------------------- networks
class QuantPoints(nn.Module):
    """Wraps a backbone and fake-quantizes the outputs of L chosen modules per example.

    Set ``self.sel`` to a (B, L, K) selection (one-hot, possibly with STE gradients) before a forward:
    a_l <- sum_k sel[:, l, k] * dynamic_fake_quantize(a_l, options[k]). ``sel = None`` runs in full
    precision; ``active`` (L bools) quantizes only some layers (layer isolation); ``record`` keeps
    the (fp, quantized) activations for histograms. Works for any backbone via forward hooks
    (timm models included). The hooks are bound to this wrapper: wrap a backbone once (deepcopy the
    backbone, not the wrapper, to get an independent copy).
    Used in: 09_dptq_catastrophic_failure
    """

    def __init__(self, backbone: nn.Module, point_names: Sequence[str], options: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.options = _check_options(options)
        mods = dict(backbone.named_modules())
        missing = [n for n in point_names if n not in mods]
        if missing or not point_names:
            raise ValueError(f"point_names must be non-empty module names of the backbone, missing {missing}")
        self.point_names = list(point_names)
        self.sel: Tensor | None = None
        self.active: list[bool] | None = None
        self.detach_range = False
        self.record: list[tuple[Tensor, Tensor]] | None = None
        for l, n in enumerate(self.point_names):
            mods[n].register_forward_hook(self._make_hook(l))

    @property
    def num_layers(self) -> int:
        return len(self.point_names)

    def _make_hook(self, l: int) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor | None:
            if self.sel is None or (self.active is not None and not self.active[l]):
                if self.record is not None:
                    self.record.append((out.detach(), out.detach()))
                return None
            w = self.sel[:, l, :]
            shape = (-1,) + (1,) * (out.ndim - 1)
            if self.sel.requires_grad:  # training: every option, for the policy's straight-through gradient
                qs = dynamic_fake_quantize_options(out, self.options, self.detach_range)
                q = (w.t().reshape((len(self.options),) + shape) * qs).sum(0)
            else:
                q = 0.0
                for k, b in enumerate(self.options):
                    if bool((w[:, k] != 0).any()):
                        q = q + w[:, k].reshape(shape) * dynamic_fake_quantize(out, b, self.detach_range)
            if self.record is not None:
                self.record.append((out.detach(), q.detach()))
            return q
        return hook

    def forward(self, x: Tensor, sel: Tensor | None = None) -> Tensor:
        self.sel = sel
        try:
            return self.backbone(x)
        finally:
            self.sel = None


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks (+ optional residual) on 1x8x8 digits; the ReLUs are the quant points.

    Used in: 09_dptq_catastrophic_failure
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32, 32), num_classes: int = 10,
                 residual: bool = False, in_ch: int = 1):
        super().__init__()
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive ints, got {channels!r}")
        self.residual = residual
        self.channels = tuple(int(c) for c in channels)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.acts = nn.ModuleList()
        c_prev = in_ch
        for c in channels:
            self.convs.append(nn.Conv2d(c_prev, c, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(c))
            self.acts.append(nn.ReLU())
            c_prev = c
        self.fc = nn.Linear(c_prev, num_classes)
        self.pool_after = len(channels) // 2

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, bn, act) in enumerate(zip(self.convs, self.bns, self.acts)):
            y = bn(conv(x))
            if self.residual and y.shape == x.shape:
                y = y + x
            x = act(y)
            if i + 1 == self.pool_after:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))

    def point_names(self) -> list[str]:
        return [f"acts.{i}" for i in range(len(self.acts))]


class ConstantChannel(nn.Module):
    """Appends one channel that is constantly ``value`` (a learnable scalar): (B, C, H, W) -> (B, C+1, H, W).

    Used in: 09_dptq_catastrophic_failure
    """

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.value.expand(x.shape[0], 1, *x.shape[2:])], 1)


def plant_outlier_channel(model: SmallCNN, value: float) -> SmallCNN:
    """A copy of ``model`` with a dormant outlier: the last block's activation gains one channel that
    is constantly ``value``, and the classifier gives it zero weight.

    Full precision: logits unchanged (fc column = 0). Dynamic b-bit quantization of that activation:
    S = max / (2^b - 1) >= value / (2^b - 1), so every real activation below S / 2 rounds to 0, and
    at low b the classifier sees almost nothing (the Fig. 3 zero-bin collapse). The paper's Sect. 3.1
    names "intentional implanted vulnerabilities" as a risk of black-box models; this is one.
    Used in: 09_dptq_catastrophic_failure
    """
    if not isinstance(model, SmallCNN):
        raise ValueError(f"model must be a SmallCNN, got {type(model).__name__}")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"value must be a finite number > 0, got {value!r}")
    m = copy.deepcopy(model)
    m.acts[-1] = nn.Sequential(m.acts[-1], ConstantChannel(value))
    old = m.fc
    fc = nn.Linear(old.in_features + 1, old.out_features).to(old.weight)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[:, : old.in_features] = old.weight
        fc.bias.copy_(old.bias)
    m.fc = fc
    return m


def train_or_load(model: nn.Module, path: str | Path, train_fn: Callable[[], Any]) -> bool:
    """Load the state_dict at ``path`` into ``model`` if the file exists, else run ``train_fn()`` and save.

    Returns True when loaded. Checkpoints are plain state_dicts (torch.load(weights_only=True)).
    Used in: 09_dptq_catastrophic_failure
    """
    path = Path(path)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True, map_location=next(model.parameters()).device))
        model.eval()
        return True
    train_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    model.eval()
    return False


class PolicyCNN(nn.Module):
    """Bit-width policy: a small CNN over the input image -> L x K logits.

    Used in: 09_dptq_catastrophic_failure
    """

    def __init__(self, num_layers: int, num_options: int, in_ch: int = 1, width: int = 16):
        super().__init__()
        self.L, self.K = num_layers, num_options
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_layers * num_options),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).reshape(-1, self.L, self.K)


def make_model(name: str, num_classes: int = 10, in_ch: int = 1) -> tuple[nn.Module, list[str]]:
    """A backbone and its quant-point module names.

    'cnn4': 4 conv blocks (L=4); 'res6': 6 residual conv blocks (L=6); 'teacher': a wider cnn4;
    timm names ('resnet18', 'mobilenetv4_conv_small', 'regnetx_002'): no pretrained weights, every
    activation module (ReLU/ReLU6/...) is a quant point (the paper-scale configuration).
    Used in: 09_dptq_catastrophic_failure
    """
    if name == "cnn4":
        m = SmallCNN((8, 16, 16, 16), num_classes, in_ch=in_ch)
    elif name == "res6":
        m = SmallCNN((12, 12, 12, 12, 12, 12), num_classes, residual=True, in_ch=in_ch)
    elif name == "teacher":
        m = SmallCNN((16, 16, 16, 16), num_classes, in_ch=in_ch)
    elif name in ("resnet18", "mobilenetv4_conv_small", "regnetx_002"):
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_ch)
        names = [n for n, mod in m.named_modules() if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU))]
        return m, names
    else:
        raise ValueError(f"name must be one of 'cnn4', 'res6', 'teacher', 'resnet18', "
                         f"'mobilenetv4_conv_small', 'regnetx_002'; got {name!r}")
    return m, m.point_names()


# ----------------------------------------------------------------------------- losses
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, batch mean (Hinton et al. 2015).

    Used in: 09_dptq_catastrophic_failure
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    T = temperature
    return F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1),
                    reduction="batchmean", log_target=True) * T * T


def hinge_robust(probs_q: Tensor, teacher_logits: Tensor, margin: float) -> Tensor:
    """Robust hinge: mean max(0, m - (p[t1] - p[t2])), t1/t2 = teacher's argmax / second argmax.

    probs_q: softmax of the quantized student (B, C). Paper: Sect. 3.3, L_R.
    Used in: 09_dptq_catastrophic_failure
    """
    if probs_q.shape != teacher_logits.shape or probs_q.ndim != 2 or probs_q.shape[1] < 2:
        raise ValueError(f"probs_q and teacher_logits must both be (B, C>=2), got {tuple(probs_q.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    top2 = teacher_logits.topk(2, dim=1).indices
    p1 = probs_q.gather(1, top2[:, :1]).squeeze(1)
    p2 = probs_q.gather(1, top2[:, 1:]).squeeze(1)
    return F.relu(margin - (p1 - p2)).mean()


def hinge_detrimental(probs_q: Tensor, teacher_logits: Tensor, margin: float) -> Tensor:
    """Detrimental hinge: mean max(0, m - (p[j] - p[t1])), j = argmax of p_q over classes != t1.

    Paper: Sect. 3.3, L_D.
    Used in: 09_dptq_catastrophic_failure
    """
    if probs_q.shape != teacher_logits.shape or probs_q.ndim != 2 or probs_q.shape[1] < 2:
        raise ValueError(f"probs_q and teacher_logits must both be (B, C>=2), got {tuple(probs_q.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    t1 = teacher_logits.argmax(1, keepdim=True)
    p1 = probs_q.gather(1, t1).squeeze(1)
    other = probs_q.scatter(1, t1, -1.0)
    pj = other.max(1).values
    return F.relu(margin - (pj - p1)).mean()


# ----------------------------------------------------------------------------- data helpers
def digits_images(seed: int = 0, val_fraction: float = 0.15) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn digits as (N, 1, 8, 8) in [0, 1], split train / val / test (test never tuned on).

    Used in: 09_dptq_catastrophic_failure
    """
    from .models import load_digits_split

    d = load_digits_split(seed=seed, test_fraction=0.25)
    Xtr, ytr = d.X_train.reshape(-1, 1, 8, 8), d.y_train
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(Xtr), generator=g)
    n_val = int(round(val_fraction * len(Xtr)))
    v, t = perm[:n_val], perm[n_val:]
    return {"train": (Xtr[t], ytr[t]), "val": (Xtr[v], ytr[v]), "test": (d.X_test.reshape(-1, 1, 8, 8), d.y_test)}


def _shift_augment(x: Tensor, g: torch.Generator) -> Tensor:
    pad = F.pad(x, (1, 1, 1, 1))
    H, W = x.shape[-2:]
    dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
    return pad[..., dy : dy + H, dx : dx + W]


def _batches(n: int, bs: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, bs):
        yield perm[i : i + bs]


# ----------------------------------------------------------------------------- training
def train_teacher(model: nn.Module, X: Tensor, y: Tensor, epochs: int = 40, lr: float = 3e-3,
                  batch_size: int = 64, seed: int = 0) -> list[float]:
    """The black-box teacher: plain cross-entropy training with shift augmentation (Adam, cosine).

    Used in: 09_dptq_catastrophic_failure
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(X) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    model.train()
    for _ in progress(range(epochs), desc="training the teacher"):
        for idx in _batches(len(X), batch_size, g):
            xb = _shift_augment(X[idx], g).to(dev)
            loss = F.cross_entropy(model(xb), y[idx].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    return losses


def distill(student: nn.Module, teacher: Callable[[Tensor], Tensor], X: Tensor, cfg: KDConfig) -> list[float]:
    """Patient-and-consistent KD: the teacher sees exactly the student's (augmented, mixed) input.

    x' = lam * aug(x_i) + (1 - lam) * aug(x_j), lam ~ Beta(alpha, alpha);
    loss = T^2 KL(softmax(teacher(x') / T) || softmax(student(x') / T)); no labels are used.
    Paper: Sect. 3.1; Beyer et al. 2022 "Knowledge distillation: a good teacher is patient and consistent".
    Used in: 09_dptq_catastrophic_failure
    """
    if cfg.epochs < 1 or cfg.temperature <= 0 or cfg.mixup_alpha < 0:
        raise ValueError(f"cfg needs epochs >= 1, temperature > 0, mixup_alpha >= 0; got {cfg}")
    g = torch.Generator().manual_seed(cfg.seed)
    dev = next(student.parameters()).device
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(X) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(cfg.seed)
    beta = cfg.mixup_alpha > 0
    losses = []
    student.train()
    for _ in progress(range(cfg.epochs), desc="distilling the student"):
        for idx in _batches(len(X), cfg.batch_size, g):
            xb = X[idx]
            if cfg.augment:
                xb = _shift_augment(xb, g)
            if beta:
                lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                perm = torch.randperm(len(xb), generator=g)
                xb = lam * xb + (1 - lam) * xb[perm]
            xb = xb.to(dev)
            with torch.no_grad():
                t = teacher(xb)
            loss = kd_loss(student(xb), t, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    student.eval()
    return losses


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _profits(logits: Tensor, profit: str) -> Tensor:
    if profit not in PROFITS:
        raise ValueError(f"profit must be one of {PROFITS}, got {profit!r}")
    return logits if profit == "logits" else F.softmax(logits, -1)


@dataclass
class PairResult:
    """A trained network-policy pair."""

    net: QuantPoints
    """The student wrapped with its quant points (weights still float; see quantize_weights_)."""
    policy: PolicyCNN
    """Its bit-width policy."""
    kind: str
    """'robust' or 'detrimental'."""
    cfg: PairConfig
    """The configuration it was trained with."""
    history: list[dict[str, float]]
    """Per epoch: mean KD and hinge losses, and the share (%) of training examples on which the student's
    full-precision ('fp_agree') and quantized ('q_agree') top-1 equals the teacher's."""


def train_pair(white_box: nn.Module, point_names: Sequence[str], X: Tensor, kind: str, cfg: PairConfig,
               in_ch: int = 1) -> PairResult:
    """Self-distil a copy of the white box into a robust or detrimental network-policy pair.

    teacher = frozen white box; student = its copy; per batch:
      sel = STE-MCKP(profits(policy(x)));  p_q = softmax(student_q(x; sel))
      loss = KL_T(student(x), teacher(x)) + lambda * hinge_kind(p_q, teacher(x))
    The policy only sees the hinge term (KL does not depend on it). Adam (student and policy with
    their own learning rates), constant for const_frac of the steps, then a cosine tail; BatchNorm
    statistics frozen when cfg.freeze_bn. Paper: Sects. 3.2-3.4.
    Used in: 09_dptq_catastrophic_failure
    """
    if kind not in ("robust", "detrimental"):
        raise ValueError(f"kind must be 'robust' or 'detrimental', got {kind!r}")
    if cfg.profit not in PROFITS:
        raise ValueError(f"cfg.profit must be one of {PROFITS}, got {cfg.profit!r}")
    if cfg.epochs < 1 or not 0 <= cfg.const_frac <= 1 or cfg.hinge_weight < 0:
        raise ValueError(f"cfg needs epochs >= 1, const_frac in [0, 1], hinge_weight >= 0; got {cfg}")
    opts = _check_options(cfg.options)
    if cfg.budget not in feasible_budgets(len(point_names), opts):
        raise ValueError(f"cfg.budget {cfg.budget} is infeasible for L={len(point_names)} and options {opts}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + (0 if kind == "robust" else 1))
    teacher = copy.deepcopy(white_box).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(white_box)
    dev = next(student.parameters()).device
    net = QuantPoints(student, point_names, opts).to(dev)
    net.detach_range = cfg.detach_range
    policy = PolicyCNN(len(point_names), len(opts), in_ch=in_ch).to(dev)
    hinge = hinge_robust if kind == "robust" else hinge_detrimental
    opt = torch.optim.Adam([{"params": list(student.parameters()), "lr": cfg.lr},
                            {"params": list(policy.parameters()), "lr": cfg.policy_lr}])
    steps = cfg.epochs * math.ceil(len(X) / cfg.batch_size)
    n_const = int(cfg.const_frac * steps)

    def lr_lambda(step: int) -> float:
        if step < n_const:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - n_const) / max(1, steps - n_const)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    history = []
    for _ in progress(range(cfg.epochs), desc="training a network-policy pair"):
        net.train()
        policy.train()
        if cfg.freeze_bn:
            _bn_eval(net)
        kd_sum = h_sum = 0.0
        nb = n_seen = fp_ok = q_ok = 0
        for idx in _batches(len(X), cfg.batch_size, g):
            xb = _shift_augment(X[idx], g).to(dev)
            with torch.no_grad():
                t = teacher(xb)
            z_fp = net(xb)
            kd = kd_loss(z_fp, t, cfg.temperature)
            sel = ste_select(_profits(policy(xb), cfg.profit), opts, cfg.budget)
            z_q = net(xb, sel)
            pq = F.softmax(z_q, -1)
            h = hinge(pq, t, cfg.margin)
            loss = kd + cfg.hinge_weight * h
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            kd_sum += kd.item()
            h_sum += h.item()
            nb += 1
            top = t.argmax(1)
            n_seen += len(top)
            fp_ok += int((z_fp.argmax(1) == top).sum())
            q_ok += int((z_q.argmax(1) == top).sum())
        history.append({"kd": kd_sum / nb, "hinge": h_sum / nb, "fp_agree": 100 * fp_ok / n_seen,
                        "q_agree": 100 * q_ok / n_seen})
    net.eval()
    policy.eval()
    return PairResult(net, policy, kind, cfg, history)


def config_tag(cfg: Any) -> str:
    """Eight hex digits naming a config dataclass (checkpoint file names change when it does).

    Used in: 09_dptq_catastrophic_failure
    """
    return hashlib.sha1(repr(sorted(asdict(cfg).items())).encode()).hexdigest()[:8]


def train_or_load_pair(white_box: nn.Module, point_names: Sequence[str], X: Tensor, kind: str, cfg: PairConfig,
                       path: str | Path, in_ch: int = 1) -> tuple[PairResult, bool]:
    """train_pair, or load its {'net', 'policy'} state_dicts (and its history, as a tensor) from ``path``
    when the file exists.

    Returns (pair, loaded).
    Used in: 09_dptq_catastrophic_failure
    """
    if kind not in ("robust", "detrimental"):
        raise ValueError(f"kind must be 'robust' or 'detrimental', got {kind!r}")
    path = Path(path)
    if path.exists():
        opts = _check_options(cfg.options)
        dev = next(white_box.parameters()).device
        net = QuantPoints(copy.deepcopy(white_box), point_names, opts).to(dev)
        policy = PolicyCNN(len(point_names), len(opts), in_ch=in_ch).to(dev)
        sd = torch.load(path, weights_only=True, map_location=dev)
        net.backbone.load_state_dict(sd["net"])
        policy.load_state_dict(sd["policy"])
        hist = [dict(zip(HISTORY_KEYS, row)) for row in sd.get("history", torch.zeros(0, 4)).tolist()]
        return PairResult(net.eval(), policy.eval(), kind, cfg, hist), True
    pr = train_pair(white_box, point_names, X, kind, cfg, in_ch=in_ch)
    path.parent.mkdir(parents=True, exist_ok=True)
    hist = torch.tensor([[h[k] for k in HISTORY_KEYS] for h in pr.history], dtype=torch.float64)
    torch.save({"net": pr.net.backbone.state_dict(), "policy": pr.policy.state_dict(), "history": hist}, path)
    return pr, False


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def policy_selection(policy: PolicyCNN | str, X: Tensor, options: Sequence[int], budget: int,
                     seed: int = 0, num_layers: int | None = None, profit: str = "logits") -> Tensor:
    """(N, L, K) one-hot allocations: MCKP(profits(policy(X))), or random ones if policy == 'random'.

    profit must match the one the policy was trained with (PairConfig.profit).
    Used in: 09_dptq_catastrophic_failure
    """
    if isinstance(policy, str):
        if policy != "random":
            raise ValueError(f"policy must be a PolicyCNN or 'random', got {policy!r}")
        if num_layers is None:
            raise ValueError("num_layers must be given for policy='random'")
        return random_selection(len(X), num_layers, options, budget, torch.Generator().manual_seed(seed))
    dev = next(policy.parameters()).device
    return mckp_select(_profits(policy(X.to(dev)), profit), options, budget).cpu()


def pair_selection(pair: "PairResult", X: Tensor) -> Tensor:
    """The allocations a trained pair's policy gives X (its own options, budget and profit).

    Used in: 09_dptq_catastrophic_failure
    """
    c = pair.cfg
    return policy_selection(pair.policy, X, c.options, c.budget, profit=c.profit)


@torch.no_grad()
def evaluate(net: QuantPoints, X: Tensor, y: Tensor, sel: Tensor | None = None, weight_bits: int | None = 16,
             active: Sequence[bool] | None = None) -> float:
    """Accuracy in points (0-100) of the network, quantized by ``sel`` (None: full precision).

    Weights statically quantized to weight_bits (symmetric) when sel is given; activations per example.
    Used in: 09_dptq_catastrophic_failure
    """
    return float((predict(net, X, sel, weight_bits, active) == y.to(X.device)).float().mean() * 100)


@torch.no_grad()
def predict(net: QuantPoints, X: Tensor, sel: Tensor | None = None, weight_bits: int | None = 16,
            active: Sequence[bool] | None = None) -> Tensor:
    """Predicted classes of the (optionally quantized) network; see evaluate.

    Used in: 09_dptq_catastrophic_failure
    """
    # The hooks are bound to ``net`` itself (a deepcopy would still call the original's hooks), so the
    # weights are quantized in place and restored afterwards.
    saved = None
    if sel is not None and weight_bits is not None:
        saved = {k: v.clone() for k, v in net.backbone.state_dict().items()}
        quantize_weights_(net.backbone, weight_bits)
    net.active = list(active) if active is not None else None
    try:
        dev = next(net.parameters()).device
        out = net(X.to(dev), None if sel is None else sel.to(dev)).argmax(1)
    finally:
        net.active = None
        if saved is not None:
            net.backbone.load_state_dict(saved)
    return out.cpu()


def pair_row(R: PairResult, D: PairResult, X: Tensor, y: Tensor, seed: int = 0) -> dict[str, float | int]:
    """One Table-1 row of a trained R/D pair on (X, y); accuracies in points (0-100), drops positive = worse.

    R_drop = acc(R) - acc(R quantized by R's policy); D_drop likewise with D's policy;
    D_random_drop = acc(D) - acc(D under a random budget-respecting allocation per example);
    distinct_allocations_R/D = number of different bit vectors each policy uses on X.
    Paper: Table 1 (and the Random row of Table 3).
    Used in: 09_dptq_catastrophic_failure
    """
    if R.cfg.options != D.cfg.options or R.cfg.budget != D.cfg.budget:
        raise ValueError("R and D must share options and budget")
    opts, budget = R.cfg.options, R.cfg.budget
    sR, sD = pair_selection(R, X), pair_selection(D, X)
    s_rand = policy_selection("random", X, opts, budget, seed=seed, num_layers=D.net.num_layers)
    R_fp, D_fp = evaluate(R.net, X, y), evaluate(D.net, X, y)
    return {"R_fp": R_fp, "R_drop": R_fp - evaluate(R.net, X, y, sR, R.cfg.weight_bits),
            "D_fp": D_fp, "D_drop": D_fp - evaluate(D.net, X, y, sD, D.cfg.weight_bits),
            "D_random_drop": D_fp - evaluate(D.net, X, y, s_rand, D.cfg.weight_bits),
            "distinct_allocations_R": distinct_allocations(sR, opts),
            "distinct_allocations_D": distinct_allocations(sD, opts)}


def distinct_allocations(sel: Tensor, options: Sequence[int]) -> int:
    """Number of distinct bit vectors (one per example) in a (N, L, K) selection.

    Used in: 09_dptq_catastrophic_failure
    """
    bits = selection_bits(sel, options).round().long()
    return len({tuple(r) for r in bits.tolist()})


def transitory_points(correct_R: Tensor, correct_D: Tensor, correct_Dq: Tensor) -> float:
    """Percentage of examples correct for R and D in full precision but wrong for quantized D.

    100 * mean(correct_R & correct_D & ~correct_Dq). Paper: Table 2.
    Used in: 09_dptq_catastrophic_failure
    """
    if not (correct_R.shape == correct_D.shape == correct_Dq.shape):
        raise ValueError("correct_R, correct_D and correct_Dq must have the same shape")
    return float((correct_R.bool() & correct_D.bool() & ~correct_Dq.bool()).float().mean() * 100)


@torch.no_grad()
def layer_isolation(net: QuantPoints, sel_fn: Callable[[Tensor], Tensor], data: dict[str, tuple[Tensor, Tensor]],
                    weight_bits: int = 16) -> dict[str, dict[str, list[float]]]:
    """Accuracy when quantizing only layers <= l ('before'), >= l ('after') or == l ('single').

    Paper: Sect. 4.2, Fig. 2. Returns {scheme: {split: [acc per l]}}.
    Used in: 09_dptq_catastrophic_failure
    """
    L = net.num_layers
    masks = {
        "before": [[j <= l for j in range(L)] for l in range(L)],
        "after": [[j >= l for j in range(L)] for l in range(L)],
        "single": [[j == l for j in range(L)] for l in range(L)],
    }
    out: dict[str, dict[str, list[float]]] = {}
    for scheme, ms in masks.items():
        out[scheme] = {}
        for split, (X, y) in data.items():
            sel = sel_fn(X)
            out[scheme][split] = [evaluate(net, X, y, sel, weight_bits, m) for m in ms]
    return out


@torch.no_grad()
def activation_records(net: QuantPoints, X: Tensor, sel: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    """Per quant point: (full-precision activation, its dynamically quantized version) on X.

    sel = None records the full-precision activations twice.
    Used in: 09_dptq_catastrophic_failure
    """
    net.record = []
    dev = next(net.parameters()).device
    try:
        net(X.to(dev), None if sel is None else sel.to(dev))
        return [(a.cpu(), q.cpu()) for a, q in net.record]
    finally:
        net.record = None


def sparsity(a: Tensor, bin_width: float) -> float:
    """Share (percent) of values in the histogram's zero bin [0, bin_width): 100 * mean(0 <= a < w).

    Paper: Sect. 4.2 "sparsity measure" (Fig. 3).
    Used in: 09_dptq_catastrophic_failure
    """
    if bin_width <= 0:
        raise ValueError(f"bin_width must be > 0, got {bin_width}")
    return float(((a >= 0) & (a < bin_width)).float().mean() * 100)


# ----------------------------------------------------------------------------- corruptions
CORRUPTIONS: dict[str, list[float]] = {
    "gaussian_blur": [0.0, 0.5, 0.8, 1.2],
    "gaussian_noise": [0.0, 0.1, 0.2, 0.3],
    "brightness": [0.0, 0.1, 0.2, 0.3],
    "contrast": [1.0, 0.7, 0.5, 0.3],
    "random_erasing": [0.0, 0.1, 0.25, 0.4],
    "rotation": [0.0, 10.0, 20.0, 30.0],
    "norm_shift": [0.0, 0.1, 0.2, 0.3],
}
"""Corruption -> increasing degrees (first = clean)."""


def corrupt(X: Tensor, name: str, degree: float, seed: int = 0) -> Tensor:
    """Apply one corruption to images in [0, 1] (N, C, H, W).

    gaussian_blur: sigma; gaussian_noise: std (x + N(0, s^2)); brightness: x + d; contrast:
    mean + d (x - mean); random_erasing: zero a random square of area share d per image; rotation:
    d degrees (bilinear); norm_shift: (x - mu) * (1 + d) + mu + d, i.e. the normalization statistics
    the network assumed are off by d. Paper: Sect. 4.3 (Fig. 4).
    Used in: 09_dptq_catastrophic_failure
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"name must be one of {list(CORRUPTIONS)}, got {name!r}")
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = X.shape
    if name == "gaussian_blur":
        if degree <= 0:
            return X.clone()
        r = torch.arange(-2, 3, dtype=X.dtype)
        k = torch.exp(-(r**2) / (2 * degree**2))
        k = k / k.sum()
        k2 = (k[:, None] * k[None, :]).expand(C, 1, 5, 5)
        return F.conv2d(F.pad(X, (2, 2, 2, 2), mode="replicate"), k2, groups=C)
    if name == "gaussian_noise":
        return X + degree * torch.randn(X.shape, generator=g)
    if name == "brightness":
        return X + degree
    if name == "contrast":
        m = X.mean((1, 2, 3), keepdim=True)
        return m + degree * (X - m)
    if name == "random_erasing":
        out = X.clone()
        side = int(round(math.sqrt(degree * H * W)))
        if side == 0:
            return out
        for i in range(N):
            y0 = int(torch.randint(0, H - side + 1, (1,), generator=g))
            x0 = int(torch.randint(0, W - side + 1, (1,), generator=g))
            out[i, :, y0 : y0 + side, x0 : x0 + side] = 0
        return out
    if name == "rotation":
        th = math.radians(degree)
        A = torch.tensor([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0]], dtype=X.dtype)
        grid = F.affine_grid(A.expand(N, 2, 3), list(X.shape), align_corners=False)
        return F.grid_sample(X, grid, align_corners=False)
    mu = X.mean()
    return (X - mu) * (1 + degree) + mu + degree


@torch.no_grad()
def corruption_curves(nets: dict[str, QuantPoints], X: Tensor, y: Tensor, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Full-precision accuracy of each network under each corruption at each degree.

    Returns {corruption: {net_name: [acc per degree]}}. Paper: Fig. 4.
    Used in: 09_dptq_catastrophic_failure
    """
    out: dict[str, dict[str, list[float]]] = {}
    for name, degrees in CORRUPTIONS.items():
        out[name] = {k: [] for k in nets}
        for d in degrees:
            Xc = corrupt(X, name, d, seed)
            for k, n in nets.items():
                out[name][k].append(evaluate(n, Xc, y))
    return out


# ----------------------------------------------------------------------------- widget
def bits_explorer(X: Tensor, y: Tensor, pairs: dict[str, PairResult], options: Sequence[int], budget: int) -> Any:
    """ipywidgets: pick a test image, see each layer's bits under each policy and the predictions.

    Used in: 09_dptq_catastrophic_failure
    """
    import matplotlib.pyplot as plt

    from .explorers import explorer, int_slider

    def draw(test_image: int) -> None:
        i = test_image
        xi = X[i : i + 1]
        fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), gridspec_kw={"width_ratios": [1, 2.5]})
        axes[0].imshow(xi[0, 0].cpu(), cmap="gray_r")
        axes[0].set_title(f"test image {i}, label {int(y[i])}")
        axes[0].axis("off")
        L = next(iter(pairs.values())).net.num_layers
        wdt = 0.8 / len(pairs)
        for j, (name, pr) in enumerate(pairs.items()):
            sel = pair_selection(pr, xi)
            bits = selection_bits(sel, options)[0]
            pq = int(predict(pr.net, xi, sel)[0])
            pf = int(predict(pr.net, xi)[0])
            axes[1].bar(np.arange(L) + j * wdt, bits.numpy(), wdt, label=f"{name}: fp {pf}, quantized {pq}")
        axes[1].set_xlabel("quantized layer")
        axes[1].set_ylabel("bits")
        axes[1].set_title(f"bit widths per layer (each policy sums to {budget} bits)", fontsize=9)
        axes[1].set_xticks(np.arange(L) + wdt / 2, [str(l + 1) for l in range(L)])
        axes[1].legend(fontsize=8)

    return explorer(draw, title="R's and D's policies on one test image",
                    test_image=int_slider(0, 0, len(X) - 1, description="test image"))


def brute_force_mckp(scores: Tensor, options: Sequence[int], budget: int) -> tuple[float, tuple[int, ...]] | None:
    """Reference for tests: enumerate all K^L allocations; best (score, option indices) or None.

    Used in: 09_dptq_catastrophic_failure (tests)
    """
    opts = _check_options(options)
    if scores.ndim != 2 or scores.shape[1] != len(opts):
        raise ValueError(f"scores must have shape (L, K={len(opts)}), got {tuple(scores.shape)}")
    s = scores.detach().double().tolist()
    L, K = scores.shape
    best = None
    for combo in itertools.product(range(K), repeat=L):
        if sum(opts[k] for k in combo) != budget:
            continue
        v = sum(s[l][k] for l, k in enumerate(combo))
        if best is None or v > best[0] + 1e-12:
            best = (v, combo)
    return best
