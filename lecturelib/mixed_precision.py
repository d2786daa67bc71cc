"""Mixed-precision quantization: one (weight bits, activation bits) pair per layer under a budget.

Scope: the lecture's "Mixed-Precision Quantization" section and HAQ. Four parts, top to bottom:

1. the model and its layers: a small depthwise-separable CNN on scikit-learn digits, and the
   per-layer facts a cost model needs (``layer_specs``);
2. hardware feedback: modeled costs (size in bits, BitOps = w_bits * a_bits * MACs) and a
   *measured* latency lookup table for the two precisions this CPU really executes (fp32 and
   int8 through PyTorch's quantized kernels);
3. a fake-quantized model that runs any policy (per-channel weights, per-tensor activations,
   through ``lecturelib.quantizers``) and a per-layer sensitivity table (bits -> loss increase);
4. four searches at the same budget, each a function that returns a ``SearchResult``:
   uniform precision, greedy by sensitivity, an exact multiple-choice knapsack (HAWQ-style)
   and a HAQ-style DDPG agent with HAQ's budget enforcement.

A *policy* is a tuple with one ``(w_bits, a_bits)`` pair per quantizable layer; ``a_bits`` is the
bit width of that layer's *input* activation. ``None`` instead of a pair keeps a layer in float.

Papers: Wang, Liu, Lin, Lin & Han, "HAQ: Hardware-Aware Automated Quantization with Mixed
Precision", CVPR 2019; Dong et al., "HAWQ: Hessian AWare Quantization", ICCV 2019, and Yao et
al., "HAWQ-V3", ICML 2021 (integer program over per-layer sensitivities); Lillicrap et al.,
"Continuous control with deep reinforcement learning" (DDPG), ICLR 2016.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .harness import progress
from .quantizers import PerChannel, QParams, block_minmax, fake_quantize, qparams_from_range, qrange

Tensor = torch.Tensor
Policy = tuple  # tuple[tuple[int, int] | None, ...]

BITS: tuple[int, ...] = tuple(range(2, 9))
"""Bit widths searched for weights and activations: 2..8 (1 bit is binarization: notebook 06)."""
LECTURE_BITS: tuple[int, ...] = tuple(range(1, 9))
"""The lecture's choices for weights and for activations: 1..8 bits, so 8 x 8 = 64 per layer."""

__all__ = [
    "BITS",
    "LECTURE_BITS",
    "HAQ_SLIDE_TABLES",
    "DigitsCNN",
    "LayerSpec",
    "layer_specs",
    "design_space_size",
    "design_space_log10",
    "conv_macs",
    "bitops",
    "size_bits",
    "policy_bitops",
    "policy_size_bits",
    "average_bits",
    "cost_table",
    "policy_cost",
    "budget_for_average_bits",
    "LatencyRow",
    "measure_latency_lut",
    "FakeQuantModel",
    "PolicyEvaluator",
    "SensitivityTable",
    "sensitivity_table",
    "SearchResult",
    "search_uniform",
    "search_greedy",
    "mckp_solve",
    "search_knapsack",
    "enforce_budget",
    "HAQConfig",
    "haq_state_features",
    "search_rl",
    "plot_policy_heatmaps",
]


# ============================================================================= the model
class DigitsCNN(nn.Module):
    """A MobileNet-like CNN for 8x8 digits with 8 quantizable layers.

    conv3x3(1->c1) -> dw3x3 -> pw1x1(c1->c2) -> dw3x3 stride 2 -> pw1x1(c2->c3) -> dw3x3
    -> pw1x1(c3->c3) -> flatten (c3 x 4 x 4) -> fc(->10); ReLU after every conv;
    widths (c1, c2, c3) = (8, 16, 32). Input (N, 64) or (N, 1, 8, 8).
    Used in: 07_mixed_precision.
    """

    NAMES = ("conv1", "dw1", "pw1", "dw2", "pw2", "dw3", "pw3", "fc")

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        if len(widths) != 3 or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths
        ):
            raise ValueError(f"widths must be three positive integers, got {widths!r}")
        c1, c2, c3 = widths
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(1, c1, 3, padding=1),
                nn.Conv2d(c1, c1, 3, padding=1, groups=c1),
                nn.Conv2d(c1, c2, 1),
                nn.Conv2d(c2, c2, 3, stride=2, padding=1, groups=c2),
                nn.Conv2d(c2, c3, 1),
                nn.Conv2d(c3, c3, 3, padding=1, groups=c3),
                nn.Conv2d(c3, c3, 1),
                nn.Linear(c3 * 16, 10),
            ]
        )

    def forward(
        self,
        x: Tensor,
        weights: Sequence[Tensor] | None = None,
        act_hook: Callable[[int, Tensor], Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Logits (N, 10). ``weights`` replaces each layer's weight; ``act_hook(i, x)`` maps the
        input of layer i (to fake-quantize or record it); with ``start`` > 0, x is the input of
        layer ``start`` (as ``act_hook`` saw it) and the layers before it are skipped."""
        last = len(self.layers) - 1
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= last:
            raise ValueError(f"start must be a layer index in 0..{last}, got {start!r}")
        if start == 0:
            x = x.reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
        for i in range(start, last + 1):
            layer = self.layers[i]
            if i == last and i != start:
                x = x.flatten(1)  # (N, C * 4 * 4)
            if act_hook is not None:
                x = act_hook(i, x)
            w = layer.weight if weights is None else weights[i]
            if isinstance(layer, nn.Conv2d):
                x = F.relu(F.conv2d(x, w, layer.bias, layer.stride, layer.padding, 1, layer.groups))
            else:
                x = F.linear(x, w, layer.bias)
        return x


@dataclass(frozen=True)
class LayerSpec:
    """What a cost model and HAQ's state need to know about one quantizable layer.

    Used in: 07_mixed_precision.
    """

    name: str
    """Layer name, e.g. ``pw2``."""
    kind: str
    """``conv``, ``depthwise``, ``pointwise`` or ``linear``."""
    c_in: int
    """Input channels (features)."""
    c_out: int
    """Output channels (features)."""
    kernel: int
    """Kernel side (1 for linear)."""
    stride: int
    """Stride (0 for linear, as in HAQ's state)."""
    padding: int
    """Zero padding on each side (0 for linear)."""
    groups: int
    """Convolution groups (c_in for depthwise, 1 otherwise)."""
    in_hw: tuple[int, int]
    """Input feature-map height and width ((1, 1) for linear)."""
    out_hw: tuple[int, int]
    """Output feature-map height and width ((1, 1) for linear)."""
    params: int
    """Number of weights (biases not counted)."""
    macs: int
    """Multiply-accumulates per image: c_out * (c_in / groups) * k^2 * H_out * W_out."""


def conv_macs(c_in: int, c_out: int, kernel: int, out_hw: tuple[int, int], groups: int = 1) -> int:
    """Multiply-accumulates of a conv layer for one image.

    MACs = c_out * (c_in / groups) * k * k * H_out * W_out   (a linear layer: k = 1, H = W = 1)
    Used in: 07_mixed_precision.
    """
    for name, v in (("c_in", c_in), ("c_out", c_out), ("kernel", kernel), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups must divide c_in and c_out ({c_in}, {c_out}), got {groups}")
    if len(out_hw) != 2 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out_hw
    ):
        raise ValueError(f"out_hw must be two positive integers (H_out, W_out), got {out_hw!r}")
    return c_out * (c_in // groups) * kernel * kernel * out_hw[0] * out_hw[1]


def layer_specs(model: DigitsCNN) -> list[LayerSpec]:
    """One ``LayerSpec`` per quantizable layer of ``model``, in execution order.

    Shapes come from one forward pass of a blank 8x8 image. kind: depthwise if
    groups == c_in == c_out > 1, pointwise if a 1x1 conv, else conv / linear.
    Used in: 07_mixed_precision.
    """
    if not isinstance(model, DigitsCNN):
        raise ValueError(f"model must be a DigitsCNN, got {type(model).__name__}")
    inputs: list[Tensor] = []
    with torch.no_grad():
        model(torch.zeros(1, 64), act_hook=lambda i, x: inputs.append(x) or x)
    specs = []
    for name, m, x in zip(model.NAMES, model.layers, inputs):
        if isinstance(m, nn.Conv2d):
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            kind = (
                "depthwise"
                if m.groups == m.in_channels == m.out_channels > 1
                else "pointwise"
                if k == 1
                else "conv"
            )
            in_hw = (int(x.shape[2]), int(x.shape[3]))
            out_hw = ((in_hw[0] + 2 * p - k) // s + 1, (in_hw[1] + 2 * p - k) // s + 1)
            specs.append(
                LayerSpec(
                    name,
                    kind,
                    m.in_channels,
                    m.out_channels,
                    k,
                    s,
                    p,
                    m.groups,
                    in_hw,
                    out_hw,
                    m.weight.numel(),
                    conv_macs(m.in_channels, m.out_channels, k, out_hw, m.groups),
                )
            )
        else:
            specs.append(
                LayerSpec(
                    name,
                    "linear",
                    m.in_features,
                    m.out_features,
                    1,
                    0,
                    0,
                    1,
                    (1, 1),
                    (1, 1),
                    m.weight.numel(),
                    m.in_features * m.out_features,
                )
            )
    return specs


# ======================================================================== design space and costs
def design_space_size(n_layers: int, n_bit_choices: int = len(LECTURE_BITS)) -> int:
    """Number of mixed-precision policies: (choices for weights * choices for activations)^n.

    size = (B * B)^n; with the lecture's 1..8 bits, B = 8 and size = 64^n.
    Lecture: "Challenge: Huge Design Space".
    Used in: 07_mixed_precision.
    """
    for name, v in (("n_layers", n_layers), ("n_bit_choices", n_bit_choices)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return (n_bit_choices * n_bit_choices) ** n_layers


def design_space_log10(n_layers: int, n_bit_choices: int = len(LECTURE_BITS)) -> float:
    """log10 of ``design_space_size``: n * log10(B^2) (64^n -> n * 1.806).

    Used in: 07_mixed_precision.
    """
    design_space_size(n_layers, n_bit_choices)  # validates
    return n_layers * 2 * math.log10(n_bit_choices)


def _check_layer_bits(w_bits: int, a_bits: int) -> None:
    for name, v in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 32:
            raise ValueError(f"{name} must be an integer in 1..32, got {v!r}")


def bitops(macs: int, w_bits: int, a_bits: int) -> int:
    """Bit operations of a layer: BitOps = w_bits * a_bits * MACs (modeled, not measured).

    A bit-serial or bit-flexible accelerator (BISMO, BitFusion; HAQ's hardware) spends time and
    energy roughly in proportion to this number. Paper: HAQ sec. 1; BitFusion (Sharma et al. 2018).
    Used in: 07_mixed_precision.
    """
    _check_layer_bits(w_bits, a_bits)
    if isinstance(macs, bool) or not isinstance(macs, (int, np.integer)) or macs < 0:
        raise ValueError(f"macs must be a non-negative integer, got {macs!r}")
    return int(macs) * int(w_bits) * int(a_bits)


def size_bits(params: int, w_bits: int) -> int:
    """Weight storage of a layer: size = params * w_bits (biases and scales not counted; modeled).

    Used in: 07_mixed_precision.
    """
    _check_layer_bits(w_bits, 1)
    if isinstance(params, bool) or not isinstance(params, (int, np.integer)) or params < 0:
        raise ValueError(f"params must be a non-negative integer, got {params!r}")
    return int(params) * int(w_bits)


def _check_policy(specs: Sequence[LayerSpec], policy: Policy, allow_float: bool = False) -> None:
    if len(policy) != len(specs):
        raise ValueError(
            f"policy must have one (w_bits, a_bits) pair per layer ({len(specs)}), "
            f"got {len(policy)}"
        )
    for i, pair in enumerate(policy):
        if pair is None and allow_float:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"policy[{i}] must be a (w_bits, a_bits) pair, got {pair!r}")
        _check_layer_bits(*pair)


def policy_bitops(specs: Sequence[LayerSpec], policy: Policy) -> int:
    """BitOps of a whole policy: sum_l w_l * a_l * MACs_l.

    Used in: 07_mixed_precision.
    """
    _check_policy(specs, policy)
    return sum(bitops(s.macs, w, a) for s, (w, a) in zip(specs, policy))


def policy_size_bits(specs: Sequence[LayerSpec], policy: Policy) -> int:
    """Weight storage of a whole policy in bits: sum_l params_l * w_l.

    Used in: 07_mixed_precision.
    """
    _check_policy(specs, policy)
    return sum(size_bits(s.params, w) for s, (w, _) in zip(specs, policy))


def average_bits(specs: Sequence[LayerSpec], policy: Policy) -> float:
    """The uniform bit width with the same BitOps:
    b_avg = sqrt(sum_l w_l a_l MACs_l / sum_l MACs_l).

    A uniform b-bit policy (w = a = b everywhere) has b_avg = b exactly.
    Used in: 07_mixed_precision.
    """
    return math.sqrt(policy_bitops(specs, policy) / sum(s.macs for s in specs))


METRICS = ("bitops", "size_bits")


def cost_table(
    specs: Sequence[LayerSpec], metric: str = "bitops", bits: Sequence[int] = BITS
) -> np.ndarray:
    """Integer cost of every choice: table[l, i, j] = cost of layer l at (w = bits[i], a = bits[j]).

    bitops: w * a * MACs_l;  size_bits: params_l * w (does not depend on a).
    Used in: 07_mixed_precision.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not specs:
        raise ValueError("specs must list at least one layer, got 0")
    table = np.zeros((len(specs), len(bits), len(bits)), dtype=np.int64)
    for l, s in enumerate(specs):
        for i, w in enumerate(bits):
            for j, a in enumerate(bits):
                table[l, i, j] = (
                    bitops(s.macs, w, a) if metric == "bitops" else size_bits(s.params, w)
                )
    return table


def _index(bits: Sequence[int], b: int, name: str) -> int:
    if b not in bits:
        raise ValueError(f"{name} must be one of {tuple(bits)}, got {b!r}")
    return list(bits).index(b)


def policy_cost(costs: np.ndarray, policy: Policy, bits: Sequence[int] = BITS) -> int:
    """Total cost of a policy from a ``cost_table``: sum_l costs[l, w_l, a_l].

    Used in: 07_mixed_precision.
    """
    if len(policy) != costs.shape[0]:
        raise ValueError(f"policy must have {costs.shape[0]} layers, got {len(policy)}")
    return int(
        sum(
            costs[l, _index(bits, w, "w_bits"), _index(bits, a, "a_bits")]
            for l, (w, a) in enumerate(policy)
        )
    )


def budget_for_average_bits(specs: Sequence[LayerSpec], avg_bits: float) -> int:
    """BitOps budget of ``avg_bits`` average bits: floor(b^2 * sum_l MACs_l).

    So the uniform b-bit policy meets the budget b exactly.
    Used in: 07_mixed_precision.
    """
    if not isinstance(avg_bits, (int, float)) or not 1 <= avg_bits <= 32:
        raise ValueError(f"avg_bits must be a number in 1..32, got {avg_bits!r}")
    return int(math.floor(avg_bits * avg_bits * sum(s.macs for s in specs) + 1e-9))


# ============================================================================= measured latency
@dataclass(frozen=True)
class LatencyRow:
    """Measured latency of one layer shape on this CPU (fastest of several repeats).

    Used in: 07_mixed_precision.
    """

    name: str
    """Layer name."""
    kind: str
    """Layer kind (conv, depthwise, pointwise, linear)."""
    fp32_us: float
    """float32 kernel (F.conv2d / F.linear), microseconds per batch."""
    int8_us: float
    """int8 kernel (torch.ops.quantized.conv2d / linear), microseconds per batch."""

    @property
    def speedup(self) -> float:
        """fp32 time / int8 time (> 1: int8 is faster)."""
        return self.fp32_us / self.int8_us


@contextmanager
def _quantized_engine():
    """The x86/fbgemm quantized engine, with torch.ao's deprecation warnings silenced."""
    engines = torch.backends.quantized.supported_engines
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    try:
        with warnings.catch_warnings():  # quantized tensors and ops are deprecated in torch 2.x
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        torch.backends.quantized.engine = old


def _fastest_us(fn: Callable[[], object], repeats: int, inner: int) -> float:
    for _ in range(3):
        fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.min(times)) * 1e6  # the fastest repeat: the least disturbed by other processes


def measure_latency_lut(
    model: DigitsCNN,
    specs: Sequence[LayerSpec],
    batch_size: int = 16,
    repeats: int = 21,
    inner: int = 20,
    seed: int = 0,
) -> list[LatencyRow]:
    """Measure each layer shape in fp32 and in int8 (PyTorch's quantized CPU kernels).

    Per layer: t_fp32 = time of F.conv2d / F.linear on a float batch; t_int8 = time of
    torch.ops.quantized.conv2d / linear on a quint8 batch with per-channel qint8 weights
    (prepacked once; quantizing the input is not timed). Each time is the fastest of ``repeats``
    timings of ``inner`` calls: on a shared machine the minimum is the least disturbed estimate.
    Batch 16 as in HAQ's lookup tables.
    Only these two precisions exist as kernels on a CPU: there is no 2..7-bit kernel to time.
    Paper: HAQ sec. 3.3 (hardware feedback from a lookup table / simulator).
    Used in: 07_mixed_precision.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be positive, got {repeats} and {inner}")
    if len(specs) != len(model.layers):
        raise ValueError(
            f"specs must describe the model's {len(model.layers)} layers, got {len(specs)}"
        )
    g = torch.Generator().manual_seed(seed)
    rows = []
    with _quantized_engine(), torch.no_grad():
        for spec, layer in zip(specs, model.layers):
            w, b = layer.weight.detach(), layer.bias.detach()
            if spec.kind == "linear":
                x = torch.rand(batch_size, spec.c_in, generator=g)
            else:
                x = torch.rand(batch_size, spec.c_in, *spec.in_hw, generator=g)
            w_scale = (w.abs().reshape(len(w), -1).amax(1) / 127).clamp(min=1e-8).double()
            w_q = torch.quantize_per_channel(
                w, w_scale, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8
            )
            x_q = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
            if spec.kind == "linear":
                packed = torch.ops.quantized.linear_prepack(w_q, b)
                fp32 = partial(F.linear, x, w, b)
                int8 = partial(torch.ops.quantized.linear, x_q, packed, 0.05, 64)
            else:
                st, pd = [spec.stride] * 2, [spec.padding] * 2
                packed = torch.ops.quantized.conv2d_prepack(w_q, b, st, pd, [1, 1], spec.groups)
                fp32 = partial(F.conv2d, x, w, b, st, pd, 1, spec.groups)
                int8 = partial(torch.ops.quantized.conv2d, x_q, packed, 0.05, 64)
            rows.append(
                LatencyRow(
                    spec.name,
                    spec.kind,
                    _fastest_us(fp32, repeats, inner),
                    _fastest_us(int8, repeats, inner),
                )
            )
    return rows


# ============================================================================= fake-quantized model
class FakeQuantModel:
    """Runs a float ``DigitsCNN`` under any mixed-precision policy, with fake quantization.

    Weights: symmetric, per output channel (``PerChannel(0)``), with a clip ratio per channel
    chosen from ``clip_grid`` by least squared error.  Activations (each layer's input):
    asymmetric unsigned, per tensor, range [min(x_min, 0), alpha * x_max] calibrated on
    ``X_calib``, alpha from ``clip_grid`` by least squared error, separately for every bit width.
    (scale, zero_point) always come from ``lecturelib.quantizers.qparams_from_range``:
        x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z)
    Weights are fake-quantized once per bit width with ``quantizers.fake_quantize``; activations,
    on every forward pass, with ``torch.fake_quantize_per_tensor_affine``, which ``fake_quantize``
    matches bit for bit (tests/test_mixed_precision.py checks it) and which is ~4x faster.
    Paper: HAQ sec. 3.4 (linear quantization with a clip value searched per layer and bit width).
    Used in: 07_mixed_precision.
    """

    def __init__(
        self,
        model: DigitsCNN,
        X_calib: Tensor,
        bits: Sequence[int] = BITS,
        clip_grid: Sequence[float] = tuple(
            float(a) for a in np.round(np.linspace(1.0, 0.3, 15), 3)
        ),
        seed: int = 0,
    ):
        if not isinstance(model, DigitsCNN):
            raise ValueError(f"model must be a DigitsCNN, got {type(model).__name__}")
        if not isinstance(X_calib, Tensor) or X_calib.ndim != 2 or len(X_calib) == 0:
            raise ValueError("X_calib must be a non-empty (N, 64) tensor of images")
        if not bits or any(
            isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in bits
        ):
            raise ValueError(f"bits must be integers in 2..16, got {bits!r}")
        if not clip_grid or any(not 0 < a <= 1 for a in clip_grid):
            raise ValueError(f"clip_grid must be ratios in (0, 1], got {clip_grid!r}")
        self.model, self.bits = model.eval(), tuple(bits)
        self.n_layers = len(model.layers)
        self.w_fq: list[dict[int, Tensor]] = [{} for _ in range(self.n_layers)]
        self.a_qparams: list[dict[int, tuple[float, int, int, int]]] = [
            {} for _ in range(self.n_layers)
        ]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for l, layer in enumerate(model.layers):
                for b in self.bits:
                    self.w_fq[l][b] = self._weight_fq(layer.weight.detach(), b, clip_grid)
            inputs: list[Tensor] = []
            model(X_calib, act_hook=lambda i, x: inputs.append(x) or x)
            for l, x in enumerate(inputs):
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 1e-8)
                x = x.flatten()
                if x.numel() > 50_000:  # a random subsample is enough to compare clip ratios
                    x = x[torch.randperm(x.numel(), generator=g)[:50_000]]
                for b in self.bits:
                    errs = [
                        float(((self._act_fq(x, self._act_qparams(lo, a * hi, b)) - x) ** 2).mean())
                        for a in clip_grid
                    ]
                    self.a_qparams[l][b] = self._act_qparams(
                        lo, clip_grid[int(np.argmin(errs))] * hi, b
                    )

    @staticmethod
    def _act_qparams(lo: float, hi: float, b: int) -> tuple[float, int, int, int]:
        scale, zp = qparams_from_range(
            torch.tensor(lo), torch.tensor(hi), b, symmetric=False, signed=False
        )
        qmin, qmax = qrange(b, signed=False)
        return float(scale), int(zp), qmin, qmax

    @staticmethod
    def _act_fq(x: Tensor, qp: tuple[float, int, int, int]) -> Tensor:
        return torch.fake_quantize_per_tensor_affine(x, *qp)

    @staticmethod
    def _weight_fq(W: Tensor, b: int, clip_grid: Sequence[float]) -> Tensor:
        block = PerChannel(0).block_size(tuple(W.shape))
        lo, hi = block_minmax(W, block)
        amax = torch.maximum(lo.abs(), hi.abs())
        qmin, qmax = qrange(b)
        best_err, best = None, None
        for alpha in clip_grid:
            scale, zp = qparams_from_range(-alpha * amax, alpha * amax, b, symmetric=True)
            W_fq = fake_quantize(W, QParams(scale, zp, qmin, qmax, block, tuple(W.shape)))
            err = ((W_fq - W) ** 2).reshape(len(W), -1).sum(1)  # (C_out,)
            if best is None:
                best_err, best = err, W_fq
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better.view(-1, *[1] * (W.ndim - 1)), W_fq, best)
        return best

    def check_policy(self, policy: Policy) -> tuple:
        """Return ``policy`` as a tuple of (int, int) pairs or None; ValueError if malformed."""
        if not isinstance(policy, (tuple, list)) or len(policy) != self.n_layers:
            raise ValueError(f"policy must have {self.n_layers} entries, got {policy!r}")
        out = []
        for l, pair in enumerate(policy):
            if pair is None:
                out.append(None)
            elif (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and pair[0] in self.bits
                and pair[1] in self.bits
            ):
                out.append((int(pair[0]), int(pair[1])))
            else:
                raise ValueError(
                    f"policy[{l}] must be None or (w_bits, a_bits) with bits in {self.bits}, "
                    f"got {pair!r}"
                )
        return tuple(out)

    @torch.no_grad()
    def logits(self, policy: Policy, X: Tensor, start: int = 0) -> Tensor:
        """Logits with layer l's weights at w_l bits and its input at a_l bits (None: float).

        With ``start`` > 0, X is the float input of layer ``start`` (see ``layer_inputs``)."""
        policy = self.check_policy(policy)
        weights = [
            self.model.layers[l].weight if p is None else self.w_fq[l][p[0]]
            for l, p in enumerate(policy)
        ]

        def act(i: int, x: Tensor) -> Tensor:
            return x if policy[i] is None else self._act_fq(x, self.a_qparams[i][policy[i][1]])

        return self.model(X, weights=weights, act_hook=act, start=start)

    @torch.no_grad()
    def layer_inputs(self, X: Tensor) -> list[Tensor]:
        """The float model's input to every layer (layer 0: the images, reshaped)."""
        inputs: list[Tensor] = []
        self.model(X, act_hook=lambda i, x: inputs.append(x) or x)
        return inputs


class PolicyEvaluator:
    """Accuracy, loss and divergence from the float model of policies on one data set, cached.

    accuracy = mean(argmax logits == y);  loss = mean cross-entropy with the labels;
    kl = mean_x KL(p_float(x) || p_policy(x)), the float model's own predictions as soft labels
    (>= 0, and 0 for the float model).  Layers before the first quantized one are not recomputed
    (their float outputs are cached).  ``n_evaluations`` counts distinct policies run.
    Used in: 07_mixed_precision.
    """

    def __init__(self, fq_model: FakeQuantModel, X: Tensor, y: Tensor):
        if not isinstance(fq_model, FakeQuantModel):
            raise ValueError(f"fq_model must be a FakeQuantModel, got {type(fq_model).__name__}")
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(
                f"X and y must be non-empty and of the same length, got {len(X)} and {len(y)}"
            )
        self.fq_model, self.X, self.y = fq_model, X, y
        self._inputs = fq_model.layer_inputs(X)
        self._log_p_float = F.log_softmax(fq_model.logits((None,) * fq_model.n_layers, X), dim=1)
        self._cache: dict[tuple, tuple[float, float, float]] = {}
        self.n_evaluations = 0

    def evaluate(self, policy: Policy) -> tuple[float, float, float]:
        """(accuracy, loss, kl) of ``policy``."""
        key = self.fq_model.check_policy(policy)
        if key not in self._cache:
            start = next((l for l, p in enumerate(key) if p is not None), 0)
            out = self.fq_model.logits(key, self._inputs[start], start=start)
            log_q = F.log_softmax(out, dim=1)
            kl = F.kl_div(log_q, self._log_p_float, log_target=True, reduction="batchmean")
            self._cache[key] = (
                float((out.argmax(1) == self.y).float().mean()),
                float(F.cross_entropy(out, self.y)),
                max(float(kl), 0.0),
            )
            self.n_evaluations += 1
        return self._cache[key]

    def __call__(self, policy: Policy) -> float:
        """Accuracy of ``policy``."""
        return self.evaluate(policy)[0]


# ============================================================================= sensitivity
@dataclass(frozen=True)
class SensitivityTable:
    """Loss increase when a single layer is quantized and every other layer stays in float.

    Used in: 07_mixed_precision.
    """

    delta_loss: np.ndarray
    """(n_layers, len(bits), len(bits)): the loss increase with layer l at (bits[i], bits[j])."""
    bits: tuple[int, ...]
    """The bit widths of the table's axes 1 (weights) and 2 (activations)."""
    measure: str
    """What the loss increase is: ``kl`` (KL from the float model's outputs) or ``ce``
    (label cross-entropy minus the float model's)."""
    evaluations: int
    """Forward passes it took: n_layers * len(bits)^2 (+1 for the float model)."""

    def value(self, policy: Policy) -> float:
        """Additive proxy of the loss increase: sum_l delta_loss[l, w_l, a_l]."""
        return float(
            sum(
                self.delta_loss[l, self.bits.index(w), self.bits.index(a)]
                for l, (w, a) in enumerate(policy)
            )
        )


def sensitivity_table(evaluator: PolicyEvaluator, measure: str = "kl") -> SensitivityTable:
    """Measure delta_loss[l, w, a]: the loss increase with only layer l quantized at (w, a).

    measure="kl": KL(p_float || p_quantized) averaged over the images (never negative; the float
    model's own predictions act as labels, so no label noise); "ce": CE(quantized) - CE(float).
    The knapsack and the greedy search treat the network's loss increase as the sum of these
    per-layer increases (HAWQ's additivity assumption, with a measured loss increase in place of
    HAWQ's Hessian-trace proxy).  Paper: Dong et al., HAWQ, ICCV 2019; HAWQ-V3, ICML 2021.
    Used in: 07_mixed_precision.
    """
    if not isinstance(evaluator, PolicyEvaluator):
        raise ValueError(f"evaluator must be a PolicyEvaluator, got {type(evaluator).__name__}")
    if measure not in ("kl", "ce"):
        raise ValueError(f"measure must be 'kl' or 'ce', got {measure!r}")
    n, bits = evaluator.fq_model.n_layers, evaluator.fq_model.bits
    before = evaluator.n_evaluations
    float_ce = evaluator.evaluate((None,) * n)[1]
    table = np.zeros((n, len(bits), len(bits)))
    for l in range(n):
        for i, w in enumerate(bits):
            for j, a in enumerate(bits):
                _, ce, kl = evaluator.evaluate(tuple((w, a) if k == l else None for k in range(n)))
                table[l, i, j] = kl if measure == "kl" else ce - float_ce
    return SensitivityTable(table, bits, measure, evaluator.n_evaluations - before)


# ============================================================================= searches
@dataclass
class SearchResult:
    """What a search returns: the policy it picked and what it cost to find.

    Used in: 07_mixed_precision.
    """

    method: str
    """uniform, greedy, knapsack or rl."""
    policy: Policy
    """One (w_bits, a_bits) per layer."""
    budget: int
    """The cost budget it had to meet."""
    cost: int
    """The policy's cost (always <= budget)."""
    objective: float
    """What the method optimised: search-set accuracy (uniform, rl) or the summed sensitivity
    (greedy, knapsack; lower is better)."""
    evaluations: int
    """Forward passes of the quantized model the search ran (sensitivity table not counted)."""
    history: list[float] = field(default_factory=list)
    """rl: the reward of each episode; empty otherwise."""


def _check_budget(costs: np.ndarray, budget: int) -> None:
    if not isinstance(costs, np.ndarray) or costs.ndim != 3 or costs.shape[1] != costs.shape[2]:
        raise ValueError(
            "costs must be a (n_layers, n_bits, n_bits) array from cost_table, "
            f"got {getattr(costs, 'shape', costs)!r}"
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer cost, got {budget!r}")
    min_cost = int(costs.min(axis=(1, 2)).sum())
    if budget < min_cost:
        raise ValueError(
            f"budget must be >= {min_cost} (every layer at its cheapest choice), got {budget}"
        )


def _check_sens(sens: SensitivityTable, costs: np.ndarray) -> None:
    if not isinstance(sens, SensitivityTable):
        raise ValueError(f"sens must be a SensitivityTable, got {type(sens).__name__}")
    if sens.delta_loss.shape != costs.shape:
        raise ValueError(
            f"sens and costs must have the same (layers, bits, bits) shape, "
            f"got {sens.delta_loss.shape} and {costs.shape}"
        )


def search_uniform(
    evaluate: Callable[[Policy], float], costs: np.ndarray, budget: int, bits: Sequence[int] = BITS
) -> SearchResult:
    """The same (w, a) in every layer: of the pairs that fit the budget and cannot be raised
    (no fitting pair has w' >= w and a' >= a), the one with the best ``evaluate`` accuracy.

    uniform b-bit budgets leave one such pair, (b, b); between them, e.g. (2, 3) and (3, 2).
    Ties go to the pair with more weight bits.
    Used in: 07_mixed_precision.
    """
    _check_budget(costs, budget)
    n = costs.shape[0]
    fits = [
        (w, a)
        for w, a in product(sorted(bits, reverse=True), repeat=2)
        if policy_cost(costs, ((w, a),) * n, bits) <= budget
    ]
    if not fits:
        raise ValueError(f"budget must allow at least one uniform policy, got {budget}")
    maximal = [
        (w, a)
        for w, a in fits
        if not any(w2 >= w and a2 >= a and (w2, a2) != (w, a) for w2, a2 in fits)
    ]
    best: tuple[float, Policy] | None = None
    for w, a in maximal:
        acc = evaluate(((w, a),) * n)
        if best is None or acc > best[0]:
            best = (acc, ((w, a),) * n)
    return SearchResult(
        "uniform", best[1], int(budget), policy_cost(costs, best[1], bits), best[0], len(maximal)
    )


def search_greedy(sens: SensitivityTable, costs: np.ndarray, budget: int) -> SearchResult:
    """Greedy by sensitivity: start at the most bits, lower one bit at a time until it fits.

    Each step lowers w_l or a_l by one bit, choosing the move with the smallest
    (increase of sum_l delta_loss) / (cost saved); stops as soon as the cost fits the budget.
    Used in: 07_mixed_precision.
    """
    _check_budget(costs, budget)
    _check_sens(sens, costs)
    n, nb = costs.shape[0], costs.shape[1]
    idx = [[nb - 1, nb - 1] for _ in range(n)]
    cost = int(sum(costs[l, nb - 1, nb - 1] for l in range(n)))
    while cost > budget:
        best = None
        for l in range(n):
            for k in (0, 1):
                if idx[l][k] == 0:
                    continue
                new = list(idx[l])
                new[k] -= 1
                saved = int(costs[l, idx[l][0], idx[l][1]] - costs[l, new[0], new[1]])
                if saved <= 0:
                    continue
                dv = sens.delta_loss[l, new[0], new[1]] - sens.delta_loss[l, idx[l][0], idx[l][1]]
                key = (dv / saved, -saved, l, k)
                if best is None or key < best[0]:
                    best = (key, l, new, saved)
        _, l, new, saved = best
        idx[l], cost = new, cost - saved
    policy = tuple((sens.bits[i], sens.bits[j]) for i, j in idx)
    return SearchResult("greedy", policy, int(budget), cost, sens.value(policy), 0)


def mckp_solve(
    values: Sequence[Sequence[float]],
    costs: Sequence[Sequence[int]],
    capacity: int,
    max_cells: int = 20_000_000,
) -> tuple[list[int], float]:
    """Exact multiple-choice knapsack: pick one item per group, minimise the total value.

    min sum_l values[l][c_l]  subject to  sum_l costs[l][c_l] <= capacity.
    Dynamic program over the total cost:
        best_l(t) = min_c best_{l-1}(t - costs[l][c]) + values[l][c],
    with every cost divided by their greatest common divisor g
    (exact: sum c <= C iff sum c/g <= C // g).
    Ties go to the lower choice index. Returns (chosen index per group, total value).
    Paper: HAWQ-V3 (Yao et al. 2021) solves the same problem as an integer linear program.
    Used in: 07_mixed_precision (and tests/test_mixed_precision.py checks it against brute force).
    """
    if len(values) != len(costs) or len(values) == 0:
        raise ValueError(
            "values and costs must list the same number (>= 1) of groups, "
            f"got {len(values)} and {len(costs)}"
        )
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    cst = [np.asarray(c) for c in costs]
    for l, (v, c) in enumerate(zip(vals, cst)):
        if v.ndim != 1 or v.shape != c.shape or len(v) == 0:
            raise ValueError(
                f"group {l}: values and costs must be 1-D of the same non-zero length, "
                f"got {v.shape} and {c.shape}"
            )
        if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
            raise ValueError(f"group {l}: costs must be non-negative integers, got {c.tolist()}")
        if not np.isfinite(v).all():
            raise ValueError(f"group {l}: values must be finite, got {v.tolist()}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
    min_total = sum(int(c.min()) for c in cst)
    if min_total > capacity:
        raise ValueError(
            f"capacity must be >= {min_total} (the cheapest choice in every group), got {capacity}"
        )
    g = math.gcd(*[int(x) for c in cst for x in c]) or 1
    cst = [(c // g).astype(np.int64) for c in cst]
    cap = int(capacity) // g
    if len(cst) * (cap + 1) > max_cells:
        raise ValueError(
            f"capacity / gcd = {cap} is too large for the table (max_cells={max_cells}); "
            "scale the costs down"
        )
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(cst), cap + 1), dtype=np.int32)
    for l, (v, c) in enumerate(zip(vals, cst)):
        new = np.full(cap + 1, np.inf)
        for j in range(len(v)):
            cj = int(c[j])
            if cj > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[cj:] = best[: cap + 1 - cj] + v[j]
            better = cand < new
            new[better] = cand[better]
            choice[l, better] = j
        best = new
    t = int(np.argmin(best))  # lowest total value; ties: the cheaper total
    total = float(best[t])
    picks = [0] * len(cst)
    for l in range(len(cst) - 1, -1, -1):
        picks[l] = int(choice[l, t])
        t -= int(cst[l][picks[l]])
    return picks, total


def search_knapsack(sens: SensitivityTable, costs: np.ndarray, budget: int) -> SearchResult:
    """HAWQ-style exact search: minimise sum_l delta_loss[l, w_l, a_l] s.t. sum_l cost <= budget.

    Each layer is a group of len(bits)^2 items (value = measured loss increase, cost = cost_table
    entry); ``mckp_solve`` finds the optimum of this additive model exactly.
    Paper: HAWQ-V3 (Yao et al. 2021); Dong et al. 2019.
    Used in: 07_mixed_precision.
    """
    _check_budget(costs, budget)
    _check_sens(sens, costs)
    nb = costs.shape[1]
    picks, total = mckp_solve(
        [sens.delta_loss[l].reshape(-1) for l in range(len(costs))],
        [costs[l].reshape(-1) for l in range(len(costs))],
        int(budget),
    )
    policy = tuple((sens.bits[p // nb], sens.bits[p % nb]) for p in picks)
    return SearchResult(
        "knapsack", policy, int(budget), policy_cost(costs, policy, sens.bits), total, 0
    )


def enforce_budget(
    policy: Policy, costs: np.ndarray, budget: int, bits: Sequence[int] = BITS
) -> Policy:
    """HAQ's budget enforcement: while over budget, sweep from the last layer to the first,
    lowering that layer's activation bits by one, then its weight bits by one, and stop as soon
    as the cost fits.

    while cost(policy) > budget: for l = n-1 .. 0: a_l -= 1 (if > min); stop if it fits;
                                                     w_l -= 1 (if > min); stop if it fits
    (HAQ's released code also pins the first and last layer at 8 bits; we do not.)
    Paper: HAQ sec. 3.3 ("we sequentially decrease the bitwidth of each layer until the
    constraint is finally satisfied").
    Used in: 07_mixed_precision.
    """
    _check_budget(costs, budget)
    idx = [[_index(bits, w, "w_bits"), _index(bits, a, "a_bits")] for w, a in policy]
    if len(idx) != costs.shape[0]:
        raise ValueError(f"policy must have {costs.shape[0]} layers, got {len(idx)}")

    def cost() -> int:
        return int(sum(costs[l, i, j] for l, (i, j) in enumerate(idx)))

    while cost() > budget:
        lowered = False
        for l in range(len(idx) - 1, -1, -1):
            for k in (1, 0):  # activation first, then weights
                if idx[l][k] > 0:
                    idx[l][k] -= 1
                    lowered = True
                if cost() <= budget:
                    return tuple((bits[i], bits[j]) for i, j in idx)
        if not lowered:
            raise ValueError(
                f"budget must be >= {cost()}, the cost with every layer at {min(bits)} bits, "
                f"got {budget}"
            )
    return tuple((bits[i], bits[j]) for i, j in idx)


# ============================================================================= HAQ's agent
@dataclass
class HAQConfig:
    """DDPG agent for HAQ-style bit allocation (defaults follow HAQ's released code where noted).

    Used in: 07_mixed_precision.
    """

    episodes: int = 300
    """Episodes (one episode = one full policy = one evaluation). HAQ: 600."""
    warmup: int = 20
    """Episodes with uniformly random actions before learning starts. HAQ: 20."""
    hidden: int = 64
    """Hidden units of actor and critic (two layers each). HAQ: 300 (our state has 10 numbers)."""
    lr_actor: float = 1e-4
    """Adam learning rate of the actor. HAQ: 1e-4."""
    lr_critic: float = 1e-3
    """Adam learning rate of the critic. HAQ: 1e-3."""
    batch_size: int = 64
    """Transitions per update. HAQ: 64."""
    updates_per_episode: int = 0
    """Gradient updates after each learning episode; 0: one per transition (2 per layer), as HAQ."""
    buffer_per_layer: int = 128
    """Replay memory: this many transitions per layer. HAQ: 128."""
    init_delta: float = 0.5
    """Initial std of the truncated-normal exploration noise. HAQ: 0.5."""
    delta_decay: float = 0.99
    """Noise std multiplier per episode after warm-up. HAQ: 0.99."""
    baseline_alpha: float = 0.5
    """Moving-average rate of the reward baseline. HAQ: 0.5."""
    reward_scale: float = 0.1
    """reward = reward_scale * (accuracy - float accuracy) in percent. HAQ: 0.1."""
    seed: int = 0
    """Seeds networks, exploration and replay sampling."""


def haq_state_features(specs: Sequence[LayerSpec]) -> np.ndarray:
    """HAQ's static state per layer, each column min-max normalised to [0, 1] over the layers.

    columns: layer index, c_in, c_out, kernel, stride, params, input feature-map size (H*W),
    is depthwise. At run time two columns are appended per step: whether the action is for the
    weights (1) or the activations (0), and the previous action (bits / 8).
    Paper: HAQ sec. 3.1, eq. 1-2 (O_k for conv and fc layers).
    Used in: 07_mixed_precision.
    """
    if not specs:
        raise ValueError("specs must list at least one layer, got 0")
    f = np.array(
        [
            [
                i,
                s.c_in,
                s.c_out,
                s.kernel,
                s.stride,
                s.params,
                s.in_hw[0] * s.in_hw[1],
                float(s.kind == "depthwise"),
            ]
            for i, s in enumerate(specs)
        ],
        dtype=np.float64,
    )
    lo, hi = f.min(0), f.max(0)
    return np.where(hi > lo, (f - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0).astype(np.float32)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


def _truncated_normal(rng: np.random.Generator, mu: float, sigma: float) -> float:
    """One sample of N(mu, sigma^2) restricted to [0, 1] (rejection sampling)."""
    for _ in range(1000):
        x = rng.normal(mu, sigma)
        if 0.0 <= x <= 1.0:
            return float(x)
    return float(np.clip(mu, 0.0, 1.0))


def search_rl(
    evaluate: Callable[[Policy], float],
    specs: Sequence[LayerSpec],
    costs: np.ndarray,
    budget: int,
    float_accuracy: float,
    cfg: HAQConfig = HAQConfig(),
    bits: Sequence[int] = BITS,
) -> SearchResult:
    """HAQ: a DDPG agent walks the layers, choosing weight bits then activation bits per layer.

    step t (layer l = t // 2): state s_t = [static features of l, is_weight, previous action];
    action a_t in [0, 1] -> bits = round(b_min - 0.5 + a_t (b_max - b_min + 1)), clipped;
    after the last step the policy is pushed under the budget (``enforce_budget``), evaluated,
    and every transition of the episode gets reward R = 0.1 (acc - acc_float) (accuracy in %).
    Exploration: warm-up episodes act uniformly at random, then a ~ TruncNormal(actor(s), delta^2)
    on [0, 1] with delta = 0.5 * 0.99^(episode - warmup).
    Updates (one per transition, HAQ): critic Q(s, a) regresses R - b (b: moving average of the
    batch mean reward); actor ascends Q(s, actor(s)). Unlike HAQ's code, the critic target does not
    bootstrap from Q(s', a') (discount 0): every transition already carries the episode's final
    reward, so bootstrapping would only count it again; hence no target networks either.
    Returns the best policy seen (as HAQ does) with its search-set accuracy.
    Paper: HAQ sec. 3.1-3.5; DDPG: Lillicrap et al. 2016.
    Used in: 07_mixed_precision.
    """
    _check_budget(costs, budget)
    if len(specs) != costs.shape[0]:
        raise ValueError(
            f"specs ({len(specs)}) and costs ({costs.shape[0]}) must describe the same layers"
        )
    if cfg.episodes < 1 or not 0 <= cfg.warmup <= cfg.episodes:
        raise ValueError(
            f"episodes must be >= 1 and warmup in 0..episodes, got {cfg.episodes} and {cfg.warmup}"
        )
    n, b_min, b_max = len(specs), min(bits), max(bits)
    static = haq_state_features(specs)
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        actor = nn.Sequential(_mlp(static.shape[1] + 2, cfg.hidden, 1), nn.Sigmoid())
        critic = _mlp(static.shape[1] + 3, cfg.hidden, 1)
    opt_a = torch.optim.Adam(actor.parameters(), lr=cfg.lr_actor)
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic)
    capacity = cfg.buffer_per_layer * n
    buf_s = np.zeros((capacity, static.shape[1] + 2), np.float32)
    buf_a = np.zeros((capacity, 1), np.float32)
    buf_r = np.zeros((capacity, 1), np.float32)
    n_stored, baseline = 0, None
    best: tuple[float, Policy, float] | None = None
    history: list[float] = []
    before = getattr(evaluate, "n_evaluations", None)
    calls = 0

    def update() -> None:
        nonlocal baseline
        ix = rng.integers(0, min(n_stored, capacity), size=cfg.batch_size)
        s, a, r = (
            torch.from_numpy(buf_s[ix]),
            torch.from_numpy(buf_a[ix]),
            torch.from_numpy(buf_r[ix]),
        )
        mean_r = float(r.mean())
        baseline = (
            mean_r if baseline is None else baseline + cfg.baseline_alpha * (mean_r - baseline)
        )
        critic_loss = F.mse_loss(critic(torch.cat([s, a], 1)), r - baseline)
        opt_c.zero_grad()
        critic_loss.backward()
        opt_c.step()
        actor_loss = -critic(torch.cat([s, actor(s)], 1)).mean()
        opt_a.zero_grad()
        actor_loss.backward()
        opt_a.step()

    for episode in progress(range(cfg.episodes), desc="HAQ agent episodes"):
        states, actions, chosen = [], [], []
        prev = 1.0
        for t in range(2 * n):
            s = np.concatenate([static[t // 2], [1.0 - t % 2, prev]]).astype(np.float32)
            if episode < cfg.warmup:
                a = float(rng.uniform())
            else:
                with torch.no_grad():
                    mu = float(actor(torch.from_numpy(s)[None])[0, 0])
                a = _truncated_normal(
                    rng, mu, cfg.init_delta * cfg.delta_decay ** (episode - cfg.warmup)
                )
            b = int(np.clip(round(b_min - 0.5 + a * (b_max - b_min + 1)), b_min, b_max))
            states.append(s)
            actions.append(a)
            chosen.append(b)
            prev = b / b_max
        policy = enforce_budget(tuple(zip(chosen[0::2], chosen[1::2])), costs, budget, bits)
        acc = evaluate(policy)
        calls += 1
        reward = cfg.reward_scale * 100.0 * (acc - float_accuracy)
        history.append(reward)
        if best is None or acc > best[0]:
            best = (acc, policy, reward)
        for s, a in zip(states, actions):
            slot = n_stored % capacity
            buf_s[slot], buf_a[slot], buf_r[slot] = s, a, reward
            n_stored += 1
        if episode >= cfg.warmup:
            for _ in range(cfg.updates_per_episode or len(states)):
                update()
    evals = calls if before is None else evaluate.n_evaluations - before  # distinct policies run
    return SearchResult(
        "rl", best[1], int(budget), policy_cost(costs, best[1], bits), best[0], evals, history
    )


# ============================================================================= figures
def plot_policy_heatmaps(policies: dict[str, dict[float, Policy]], layer_names: Sequence[str]):
    """Heat maps of chosen bits: one column of panels per method, weight bits on top, activation
    bits below; in each panel, rows are budgets (average bits), columns are layers, and every cell
    shows its bit width.  Plotting only.
    Used in: 07_mixed_precision.
    """
    import matplotlib.pyplot as plt

    if not policies:
        raise ValueError("policies must map at least one method to {budget: policy}, got none")
    methods = list(policies)
    budgets = sorted(next(iter(policies.values())))
    fig, axes = plt.subplots(
        2,
        len(methods),
        figsize=(3.2 * len(methods), 2.2 + 0.8 * len(budgets)),
        sharey=True,
        squeeze=False,
        constrained_layout=True,
    )
    for col, m in enumerate(methods):
        for row, what in enumerate(("weight bits", "activation bits")):
            grid = np.array([[pair[row] for pair in policies[m][b]] for b in budgets])
            ax = axes[row, col]
            im = ax.imshow(grid, cmap="viridis", vmin=min(BITS), vmax=max(BITS), aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(
                    j, i, str(v), ha="center", va="center", fontsize=7, color="w" if v < 6 else "k"
                )
            ax.set_xticks(range(len(layer_names)), layer_names, fontsize=7, rotation=60)
            ax.set_yticks(range(len(budgets)), [f"{b:g}" for b in budgets], fontsize=8)
            ax.set_title(f"{m}: {what}", fontsize=9)
            if col == 0:
                ax.set_ylabel("budget (average bits)")
    fig.colorbar(im, ax=axes, shrink=0.5, label="bits")
    return fig


# ======================================================================== the slides' HAQ tables
HAQ_SLIDE_TABLES: dict[str, list[tuple]] = {
    "model_size": [  # (method, weights, top-1, top-5, size in MB): MobileNetV1, weights only
        ("Han et al.", "2 bits", 37.62, 64.31, 1.09),
        ("HAQ", "flexible", 57.14, 81.87, 1.09),
        ("Han et al.", "3 bits", 65.93, 86.85, 1.60),
        ("HAQ", "flexible", 67.66, 88.21, 1.58),
        ("Han et al.", "4 bits", 71.14, 89.84, 2.10),
        ("HAQ", "flexible", 71.74, 90.36, 2.07),
        ("Original", "32 bits", 70.90, 89.90, 16.14),
    ],
    "latency": [  # (method, weights, activations, top-1, top-5, latency in ms)
        ("PACT", "4 bits", "4 bits", 62.44, 84.19, 7.86),
        ("HAQ", "flexible", "flexible", 67.45, 87.85, 7.86),
        ("PACT", "6 bits", "4 bits", 67.51, 87.84, 11.10),
        ("HAQ", "flexible", "flexible", 70.40, 89.69, 11.09),
        ("PACT", "6 bits", "6 bits", 70.46, 89.59, 19.99),
        ("HAQ", "flexible", "flexible", 70.90, 89.95, 19.98),
        ("Original", "8 bits", "8 bits", 70.82, 89.85, 20.08),
    ],
    "energy": [  # (method, weights, activations, top-1, top-5, energy in mJ)
        ("PACT", "4 bits", "4 bits", 62.44, 84.19, 13.47),
        ("HAQ", "flexible", "flexible", 64.78, 85.85, 13.69),
        ("PACT", "6 bits", "4 bits", 67.51, 87.84, 16.57),
        ("HAQ", "flexible", "flexible", 70.37, 89.40, 16.30),
        ("PACT", "6 bits", "6 bits", 70.46, 89.59, 26.80),
        ("HAQ", "flexible", "flexible", 70.90, 89.73, 26.67),
        ("Original", "8 bits", "8 bits", 70.82, 89.95, 31.03),
    ],
}
"""The lecture's three HAQ tables (MobileNetV1 on ImageNet), as printed on the slides.
Used in: 07_mixed_precision."""
