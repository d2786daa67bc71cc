"""Sound interval bounds for a float MLP policy and its quantized twin, and a consistency verifier.

Scope: one-hidden-layer policies logits = W2 relu(W1 x + b1) + b2 (CartPole's 4-128-2) and
quantized versions of them, described by ``IntervalNet``: the effective (dequantized) weights
the deployed kernels multiply by, plus a model of every activation quantizer (``ActQuant``):

    static  (fixed S, Z):      Q(x) = S (clamp(round(x / S) + Z, qmin, qmax) - Z)
                               = clamp(x, S (qmin - Z), S (qmax - Z)) + e,   |e| <= S / 2
    dynamic (S from the vector itself, batch 1):
        asymmetric (fbgemm):   S = (max(x, 0) - min(x, 0)) / (qmax - qmin)
        symmetric (torchao):   S = max |x| / ((qmax - qmin) / 2)
                               Q(x) = x + e,  |e| <= S / 2,  and S <= the same formula on the bounds.

Bounds are computed in centre-radius form on logits, never on softmax (softmax is monotone, so
argmax needs no probabilities, and probabilities are not logits):

    affine:  c' = W c + b,   r' = |W| r            (exact for a box: Gowal et al. 2018, IBP)
    ReLU:    [l, u] -> [relu(l), relu(u)]
    margin of action k over j:  m_kj = (W2[k] - W2[j]) . h + b2[k] - b2[j]   (one row, not two intervals)

``diff_margin_bounds`` also bounds the difference delta = g - f layer by layer (ReluDiff,
Paulsen, Wang & Wang, ICSE 2020), so a state far from the decision boundary certifies from
m_f's lower bound plus delta's lower bound without bisection. ``certify`` / ``certify_many``
bisect a box until every piece is CERTIFIED (some action k has margin lower bound > 0 against
every other action, for f and for g), or a search finds a COUNTEREXAMPLE (a concrete float32
state where argmax f != argmax g, confirmed by running both deployed networks at batch 1),
or the box's own work budget (pieces, bisection depth) runs out (UNKNOWN). The budget is per
box, so one box that can be neither certified nor refuted costs a bounded amount of time and
memory and never holds up the others.

Every bound adds a small float slack (FLOAT_SLACK) so that the float32 rounding of the
deployed kernels stays inside it. Papers: Gowal et al., "On the Effectiveness of Interval Bound
Propagation", 2018; Paulsen, Wang & Wang, "ReluDiff: Differential Verification of Deep Neural
Networks", ICSE 2020; Jacob et al., CVPR 2018 (the quantizers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import rl

Tensor = torch.Tensor

VERDICTS = ("CERTIFIED", "COUNTEREXAMPLE", "UNKNOWN")
"""Verdict names; ``certify_many`` returns their indices 0, 1, 2."""
CERTIFIED, COUNTEREXAMPLE, UNKNOWN = 0, 1, 2
FLOAT_SLACK = 1e-5
"""Relative slack added to every bound: radius += FLOAT_SLACK * (|W| (|c| + r) + |b|) + 1e-6."""
CODE_EPS = 1e-3
"""Codes within this many units of a rounding boundary count as possibly rounding either way."""


# ----------------------------------------------------------------------------- checks
def _as_box(lo: Tensor, hi: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Validate a batch of boxes: lo, hi of shape (N, d) (or (d,)), finite, lo <= hi."""
    for name, t in (("lo", lo), ("hi", hi)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    lo2, hi2 = lo.reshape(1, -1) if lo.ndim == 1 else lo, hi.reshape(1, -1) if hi.ndim == 1 else hi
    if lo2.ndim != 2 or lo2.shape != hi2.shape:
        raise ValueError(f"lo and hi must both have shape (N, d) or (d,), got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if dim is not None and lo2.shape[1] != dim:
        raise ValueError(f"box must have state dimension {dim}, got {lo2.shape[1]}")
    if not bool(torch.isfinite(lo2).all() and torch.isfinite(hi2).all()):
        raise ValueError("box bounds must be finite, found NaN or inf")
    if bool((lo2 > hi2).any()):
        raise ValueError("box must have lo <= hi in every coordinate (an inverted box is empty)")
    return lo2, hi2


def _check_int(value: object, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _slack(absW: Tensor, c: Tensor, r: Tensor, b: Tensor) -> Tensor:
    return FLOAT_SLACK * ((c.abs() + r) @ absW.T + b.abs()) + 1e-6


# ----------------------------------------------------------------------------- primitives
def affine_bounds(W: Tensor, b: Tensor, lo: Tensor, hi: Tensor, slack: bool = True) -> tuple[Tensor, Tensor]:
    """Interval of W x + b over the box lo <= x <= hi, in centre-radius form.

    c = (lo + hi) / 2,  r = (hi - lo) / 2,  c' = W c + b,  r' = |W| r  (+ float slack),
    result [c' - r', c' + r']. Exact for one affine layer (each output's extremes are attained
    at a corner); lo and hi are (N, in), W is (out, in), b is (out,).
    Paper: Gowal et al. 2018 (IBP). Used in: 08_cartpole_consistency.
    """
    if W.ndim != 2 or b.shape != (W.shape[0],):
        raise ValueError(f"W must be (out, in) and b (out,), got {tuple(W.shape)} and {tuple(b.shape)}")
    lo, hi = _as_box(lo, hi, W.shape[1])
    c, r = (lo + hi) / 2, (hi - lo) / 2
    absW = W.abs()
    cc, rr = c @ W.T + b, r @ absW.T
    if slack:
        rr = rr + _slack(absW, c, r, b)
    return cc - rr, cc + rr


def relu_bounds(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU is monotone, so relu([l, u]) = [relu(l), relu(u)]. Used in: 08_cartpole_consistency."""
    lo, hi = _as_box(lo, hi)
    return lo.clamp(min=0), hi.clamp(min=0)


@dataclass(frozen=True)
class ActQuant:
    """How a deployed layer quantizes its input vector (one state at a time)."""

    kind: str
    """"static": fixed scale and zero point; "dynamic": scale chosen from the vector at run time."""
    qmin: int
    """Smallest integer code."""
    qmax: int
    """Largest integer code."""
    scale: float = 1.0
    """Static only: S."""
    zero_point: int = 0
    """Static only: Z."""
    symmetric: bool = False
    """Dynamic only: S = max|x| / ((qmax - qmin) / 2) (torchao) instead of range / (qmax - qmin) (fbgemm)."""

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic"):
            raise ValueError(f"kind must be 'static' or 'dynamic', got {self.kind!r}")
        if not self.qmin < self.qmax:
            raise ValueError(f"qmin must be < qmax, got {self.qmin} and {self.qmax}")
        if self.kind == "static" and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite float, got {self.scale!r}")

    @property
    def clip_range(self) -> tuple[float, float]:
        """Static: the real range [S (qmin - Z), S (qmax - Z)] representable without clipping."""
        return self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point)

    def _dynamic_scale(self, lo_min: Tensor, hi_max: Tensor) -> Tensor:
        if self.symmetric:
            return torch.maximum(lo_min.abs(), hi_max.abs()) / ((self.qmax - self.qmin) / 2)
        return (hi_max.clamp(min=0) - lo_min.clamp(max=0)) / (self.qmax - self.qmin)

    def apply(self, x: Tensor) -> Tensor:
        """Quantize-dequantize each row of x on its own (batch-1 semantics). Used in: 08."""
        if self.kind == "static":
            q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
            return (q - self.zero_point) * self.scale
        s = self._dynamic_scale(x.amin(1, keepdim=True), x.amax(1, keepdim=True))
        s = torch.where(s > 0, s, torch.ones_like(s))
        if self.symmetric:
            return torch.clamp(torch.round(x / s), self.qmin, self.qmax) * s
        zp = torch.clamp(torch.round(self.qmin - x.amin(1, keepdim=True).clamp(max=0) / s), self.qmin, self.qmax)
        return (torch.clamp(torch.round(x / s) + zp, self.qmin, self.qmax) - zp) * s

    def code_range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(k_lo, k_hi, s_lo, s_hi): the codes k = q - Z each element can take, Q(x) = S k, and S's range.

        k = clamp(round(x / S) + Z, qmin, qmax) - Z is monotone in x / S, and x / S over the box lies
        in [min(l / S_lo, l / S_hi), max(u / S_lo, u / S_hi)]. Dynamic scales: S_hi is the scale
        formula on (min of lower bounds, max of upper bounds), S_lo on the tightest range any
        vector in the box must have (S_lo = 0 means unknown: the code range is then useless).
        Used in: 08_cartpole_consistency.
        """
        if self.kind == "static":
            s = torch.full_like(lo[:, :1], self.scale)
            k_lo = torch.clamp(torch.round(lo / s - CODE_EPS) + self.zero_point, self.qmin, self.qmax) - self.zero_point
            k_hi = torch.clamp(torch.round(hi / s + CODE_EPS) + self.zero_point, self.qmin, self.qmax) - self.zero_point
            return k_lo, k_hi, s, s
        s_hi = self._dynamic_scale(lo.amin(1, keepdim=True), hi.amax(1, keepdim=True))
        s_lo = self._dynamic_scale(hi.amin(1, keepdim=True), lo.amax(1, keepdim=True))
        if self.symmetric:  # max|x| is at least the largest lower bound of |x_i|
            mag_lo = torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo))).amax(1, keepdim=True)
            s_lo = mag_lo / ((self.qmax - self.qmin) / 2)
        s_lo_safe = torch.where(s_lo > 0, s_lo, torch.ones_like(s_lo))
        t_lo = torch.minimum(lo / s_lo_safe, lo / s_hi.clamp(min=1e-30))
        t_hi = torch.maximum(hi / s_lo_safe, hi / s_hi.clamp(min=1e-30))
        k_lo, k_hi = torch.round(t_lo - CODE_EPS), torch.round(t_hi + CODE_EPS)
        if self.symmetric:
            k_lo, k_hi = k_lo.clamp(self.qmin, self.qmax), k_hi.clamp(self.qmin, self.qmax)
        k_lo = torch.where(s_lo > 0, k_lo, torch.full_like(k_lo, -math.inf))
        k_hi = torch.where(s_lo > 0, k_hi, torch.full_like(k_hi, math.inf))
        return k_lo, k_hi, s_lo, s_hi

    def bounds(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ql, qu, dl, du): Q(x) in [ql, qu] and Q(x) - x in [dl, du] for all x in [lo, hi].

        Two sound bounds, intersected:
        error model: Q(x) = clamp(x) + e, |e| <= S/2, so Q(x) - x in [min(0, hi_r - u), max(0, lo_r - l)] +- S/2
                     (dynamic: no clipping, S <= its formula evaluated on the bounds);
        code model:  the integer code k = round(x / S) is monotone in x / S, so
                     k in [round(l / S), round(u / S)] and Q(x) = S k in [S k_lo, S k_hi];
                     on a box small enough that k_lo = k_hi, Q(x) is known (up to S's own range).
        A margin of CODE_EPS codes absorbs float rounding in the deployed kernels.
        Used in: 08_cartpole_consistency.
        """
        k_lo, k_hi, s_lo, s_hi = self.code_range(lo, hi)
        if self.kind == "static":
            lo_r, hi_r = self.clip_range
            e = 0.5 * self.scale * (1 + FLOAT_SLACK) + 1e-7
            gl, gu = lo.clamp(lo_r, hi_r) - e, hi.clamp(lo_r, hi_r) + e
            dl, du = (hi_r - hi).clamp(max=0) - e, (lo_r - lo).clamp(min=0) + e
            cl, cu = k_lo * s_lo, k_hi * s_lo
            cl, cu = cl - FLOAT_SLACK * cl.abs() - 1e-7, cu + FLOAT_SLACK * cu.abs() + 1e-7  # float32 kernels
        else:
            e = (0.5 * s_hi * (1 + FLOAT_SLACK) + 1e-7).expand_as(lo)
            gl, gu, dl, du = lo - e, hi + e, -e, e
            ok = (s_lo > 0).expand_as(lo)
            cl = torch.minimum(k_lo * s_lo, k_lo * s_hi)
            cu = torch.maximum(k_hi * s_lo, k_hi * s_hi)
            cl, cu = cl - FLOAT_SLACK * cl.abs() - 1e-7, cu + FLOAT_SLACK * cu.abs() + 1e-7
            cl, cu = torch.where(ok, cl, gl), torch.where(ok, cu, gu)
        ql, qu = torch.maximum(gl, cl), torch.minimum(gu, cu)
        dl, du = torch.maximum(dl, cl - hi), torch.minimum(du, cu - lo)
        return ql, torch.maximum(qu, ql), dl, torch.maximum(du, dl)


# ----------------------------------------------------------------------------- networks
@dataclass
class IntervalNet:
    """A 1-hidden-layer policy as the verifier sees it: effective weights + activation quantizers.

    logits = Qout( W2 Qhid( relu( W1 Qin(x) + b1 ) ) + b2 ), a missing quantizer is the identity.
    ``module`` is the deployed network (what really runs); ``batch_invariant`` says whether its
    rows are computed independently (False for torch.ao dynamic quantization).
    """

    name: str
    """Label used in tables and plots."""
    W1: Tensor
    """(hidden, 4) float64: the weights the deployed first layer multiplies by (dequantized)."""
    b1: Tensor
    """(hidden,) float64."""
    W2: Tensor
    """(actions, hidden) float64."""
    b2: Tensor
    """(actions,) float64."""
    q_in: ActQuant | None = None
    """Quantizer of the state before layer 1."""
    q_hid: ActQuant | None = None
    """Quantizer of the hidden ReLU output before layer 2."""
    q_out: ActQuant | None = None
    """Quantizer of the logits (static int8 requantizes its output)."""
    module: nn.Module | None = None
    """The deployed network, called at batch 1 to confirm counterexamples."""
    batch_invariant: bool = True
    """True when a batch gives each row the decision it gets alone."""

    @property
    def dim(self) -> int:
        return self.W1.shape[1]

    @property
    def is_float(self) -> bool:
        return self.q_in is None and self.q_hid is None and self.q_out is None

    def simulate(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """Logits with batch-1 semantics for every row (an emulation of the deployed kernels)."""
        x = x.to(dtype)
        if self.q_in is not None:
            x = self.q_in.apply(x)
        h = torch.relu(x @ self.W1.T.to(dtype) + self.b1.to(dtype))
        if self.q_hid is not None:
            h = self.q_hid.apply(h)
        y = h @ self.W2.T.to(dtype) + self.b2.to(dtype)
        return self.q_out.apply(y) if self.q_out is not None else y

    @torch.inference_mode()
    def deployed_logits(self, x: Tensor) -> Tensor:
        """Logits of the deployed module, each row as at batch 1 (looping when not batch-invariant)."""
        x = x.float()
        if self.module is None:
            return self.simulate(x).float()
        with rl.fbgemm(), rl.quiet(), rl.threads(1):
            if self.batch_invariant:
                return self.module(x).float()
            return torch.cat([self.module(x[i: i + 1]) for i in range(len(x))]).float()

    def decide(self, x: Tensor) -> Tensor:
        """Deployed actions, argmax of ``deployed_logits``."""
        return self.deployed_logits(x).argmax(dim=1)

    def rows_logits(self, x: Tensor) -> Tensor:
        """Batch-1 logits for many rows at once: the deployed module when it is batch-invariant,
        else the float64 emulation (whose argmax agreement with the module the notebook measures)."""
        return self.deployed_logits(x) if self.batch_invariant else self.simulate(x).float()


def _t(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64).clone()


def from_float(model: nn.Sequential, name: str = "float") -> IntervalNet:
    """IntervalNet of a float Linear-ReLU-Linear policy. Used in: 08_cartpole_consistency."""
    l1, l2 = _linears(model)
    return IntervalNet(name, _t(l1.weight), _t(l1.bias), _t(l2.weight), _t(l2.bias), module=model)


def _linears(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "weight") and not isinstance(m, nn.Sequential)]
    mods = [m for m in mods if type(m).__name__ in ("Linear", "LinearReLU", "DynamicQuantizedLinear",
                                                    "QuantizedLinear", "QuantizedLinearReLU")
            or "Linear" in type(m).__name__]
    if len(mods) != 2:
        raise ValueError(f"model must have exactly two linear layers (Linear-ReLU-Linear), found {len(mods)}")
    return mods[0], mods[1]


def from_dynamic(qmodel: nn.Module, name: str = "dynamic int8") -> IntervalNet:
    """torch.ao ``quantize_dynamic`` (fbgemm) model: int8 weights, uint8 activations with reduce_range
    (codes 0..127), scale from each batch's own min/max. At batch 1 that is each state's own range.
    Used in: 08_cartpole_consistency.
    """
    l1, l2 = _linears(qmodel)
    q = ActQuant("dynamic", 0, 127)
    return IntervalNet(name, _t(l1.weight().dequantize()), _t(l1.bias()), _t(l2.weight().dequantize()),
                       _t(l2.bias()), q, q, None, qmodel, batch_invariant=False)


def from_static(qmodel: nn.Module, name: str = "static int8") -> IntervalNet:
    """torch.ao eager static model (QuantStub -> LinearReLU -> Linear -> DeQuantStub), fbgemm:
    every activation has a calibrated (S, Z) on quint8 codes 0..255. Used in: 08_cartpole_consistency.
    """
    l1, l2 = _linears(qmodel)
    quant = [m for m in qmodel.modules() if type(m).__name__ == "Quantize"]
    if len(quant) != 1:
        raise ValueError("qmodel must be a converted torch.ao static model with one Quantize stub")
    qs = lambda s, z: ActQuant("static", 0, 255, float(s), int(z))  # noqa: E731
    return IntervalNet(name, _t(l1.weight().dequantize()), _t(l1.bias()), _t(l2.weight().dequantize()),
                       _t(l2.bias()), qs(quant[0].scale, quant[0].zero_point), qs(l1.scale, l1.zero_point),
                       qs(l2.scale, l2.zero_point), qmodel)


def from_torchao(model: nn.Module, name: str = "torchao int8") -> IntervalNet:
    """torchao ``Int8DynamicActivationInt8WeightConfig`` model: int8 per-row weights, int8 symmetric
    activations with one scale per row (per token), S = max|x| / 127.5. Used in: 08_cartpole_consistency.
    """
    l1, l2 = _linears(model)
    q = ActQuant("dynamic", -128, 127, symmetric=True)
    with rl.quiet():
        W1, W2 = l1.weight.dequantize(), l2.weight.dequantize()
    return IntervalNet(name, _t(W1), _t(l1.bias), _t(W2), _t(l2.bias), q, q, None, model)


def from_lowbit(model: rl.LowBitPolicy, name: str | None = None) -> IntervalNet:
    """lecturelib's integer ``LowBitPolicy`` (PTQ or QAT): static per-tensor activations,
    per-channel weights, int32 bias. Used in: 08_cartpole_consistency.
    """
    e = model.effective()
    return IntervalNet(name or f"{model.num_bits}-bit", _t(e["W1"]), _t(e["b1"]), _t(e["W2"]), _t(e["b2"]),
                       e["q_in"], e["q_hid"], None, model)


# ----------------------------------------------------------------------------- bounds
@dataclass
class LayerBounds:
    """Per-layer intervals of one network over a batch of boxes (each entry a (lo, hi) pair)."""

    input: tuple[Tensor, Tensor]
    """The (quantized) input."""
    pre: tuple[Tensor, Tensor]
    """W1 x + b1."""
    hidden: tuple[Tensor, Tensor]
    """relu(...), quantized if the net quantizes it."""
    logits: tuple[Tensor, Tensor]
    """Final logits (quantized if the net quantizes them)."""


def layer_bounds(net: IntervalNet, lo: Tensor, hi: Tensor) -> LayerBounds:
    """Plain interval propagation through every layer of ``net`` (with ReLU and quantizers).

    Used in: 08_cartpole_consistency.
    """
    lo, hi = _as_box(lo, hi, net.dim)
    xl, xu = lo.double(), hi.double()
    if net.q_in is not None:
        xl, xu, _, _ = net.q_in.bounds(xl, xu)
    zl, zu = affine_bounds(net.W1, net.b1, xl, xu)
    hl, hu = relu_bounds(zl, zu)
    if net.q_hid is not None:
        hl, hu, _, _ = net.q_hid.bounds(hl, hu)
    yl, yu = affine_bounds(net.W2, net.b2, hl, hu)
    if net.q_out is not None:
        yl, yu, _, _ = net.q_out.bounds(yl, yu)
    return LayerBounds((xl, xu), (zl, zu), (hl, hu), (yl, yu))


def _margin_rows(W2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """R[k, j] = W2[k] - W2[j] (K, K, H) and the bias difference (K, K)."""
    return W2[:, None, :] - W2[None, :, :], b2[:, None] - b2[None, :]


def _cr_dot(R: Tensor, c: Tensor, r: Tensor, rb: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds of R . h + rb for h in [c - r, c + r]: (N, K, K) lower and upper."""
    cc = torch.einsum("kjh,nh->nkj", R, c) + rb
    absR = R.abs()
    rr = torch.einsum("kjh,nh->nkj", absR, r) + FLOAT_SLACK * (torch.einsum("kjh,nh->nkj", absR, c.abs() + r) + rb.abs()) + 1e-6
    return cc - rr, cc + rr


def margin_bounds(net: IntervalNet, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of every logit margin m_kj = y_k - y_j over each box, (N, K, K).

    m_kj = (W2[k] - W2[j]) . h + (b2[k] - b2[j]) with h in its interval: one row, so the bound is
    tighter than l_k - u_j from two separate logit intervals. With an output quantizer the
    margin is also bounded through the quantized logits, and the tighter of the two kept.
    Used in: 08_cartpole_consistency.
    """
    lb = layer_bounds(net, lo, hi)
    hl, hu = lb.hidden
    R, rb = _margin_rows(net.W2, net.b2)
    ml, mu = _cr_dot(R, (hl + hu) / 2, (hu - hl) / 2, rb)
    if net.q_out is not None:
        yl, yu = affine_bounds(net.W2, net.b2, hl, hu)
        _, _, dl, du = net.q_out.bounds(yl, yu)
        ql, qu = lb.logits
        ml = torch.maximum(ml + dl[:, :, None] - du[:, None, :], ql[:, :, None] - qu[:, None, :])
        mu = torch.minimum(mu + du[:, :, None] - dl[:, None, :], qu[:, :, None] - ql[:, None, :])
    return ml, mu


def _relu_diff(fl: Tensor, fu: Tensor, gl: Tensor, gu: Tensor, dl: Tensor, du: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds of relu(g) - relu(f) given f in [fl, fu], g in [gl, gu], g - f in [dl, du] (ReluDiff)."""
    low = torch.maximum(dl.clamp(max=0), -fu.clamp(min=0))
    up = torch.minimum(du.clamp(min=0), gu.clamp(min=0))
    low = torch.where(fl >= 0, torch.maximum(low, dl), low)  # f active: relu(g) - f >= g - f
    up = torch.where(gl >= 0, torch.minimum(up, du), up)  # g active: g - relu(f) <= g - f
    low = torch.where(fu <= 0, torch.maximum(low, gl.clamp(min=0)), low)  # f inactive: = relu(g)
    up = torch.where(gu <= 0, torch.minimum(up, -fl.clamp(min=0)), up)  # g inactive: = -relu(f)
    return low, torch.maximum(up, low)


@dataclass
class DiffBounds:
    """Margin bounds of f and g over a batch of boxes, and of their difference (all (N, K, K))."""

    f_lower: Tensor
    """Lower bound of f's margin y_k - y_j."""
    f_upper: Tensor
    """Upper bound of f's margin."""
    g_lower: Tensor
    """Lower bound of g's margin: max(own interval bound, f_lower + delta_lower)."""
    g_upper: Tensor
    """Upper bound of g's margin."""
    delta_lower: Tensor
    """Lower bound of delta = m_g - m_f."""
    delta_upper: Tensor
    """Upper bound of delta."""


def diff_margin_bounds(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor) -> DiffBounds:
    """Bounds of both margins and of delta = m_g - m_f, propagated together (ReluDiff style).

    d_in  = Qin(x) - x                          (quantizer error model)
    d_pre = W1g d_in + (W1g - W1f) x + (b1g - b1f)           (centre-radius)
    d_hid = relu(f_pre + d_pre) - relu(f_pre), bounded case by case (both active: d_pre;
            both inactive: 0; otherwise within [min(d, 0), max(d, 0)] and a few more facts),
            then + (Qhid(h_g) - h_g)
    delta = R_g . d_hid + (R_g - R_f) . h_f + (rb_g - rb_f), R = W2[k] - W2[j].
    Since the quantization error is small, delta's interval stays narrow even where f's own
    bounds are wide, and m_g >= lower(m_f) + lower(delta) certifies g cheaply.
    Paper: Paulsen, Wang & Wang, ICSE 2020 (ReluDiff). Used in: 08_cartpole_consistency.
    """
    if not f.is_float:
        raise ValueError("f must be the float network (no quantizers); pass the quantized one as g")
    if f.W1.shape != g.W1.shape or f.W2.shape != g.W2.shape:
        raise ValueError(f"f and g must have the same architecture, got {tuple(f.W1.shape)}/{tuple(f.W2.shape)} "
                         f"and {tuple(g.W1.shape)}/{tuple(g.W2.shape)}")
    lo, hi = _as_box(lo, hi, f.dim)
    xl, xu = lo.double(), hi.double()
    # layer 1 of f, and of g on its own
    fzl, fzu = affine_bounds(f.W1, f.b1, xl, xu)
    gxl, gxu, dxl, dxu = g.q_in.bounds(xl, xu) if g.q_in is not None else (xl, xu, torch.zeros_like(xl), torch.zeros_like(xl))
    gzl, gzu = affine_bounds(g.W1, g.b1, gxl, gxu)
    # difference through layer 1: W1g d + dW x + db
    dW, db = g.W1 - f.W1, g.b1 - f.b1
    dc, dr = (dxl + dxu) / 2, (dxu - dxl) / 2
    xc, xr = (xl + xu) / 2, (xu - xl) / 2
    absWg, absdW = g.W1.abs(), dW.abs()
    c = dc @ g.W1.T + xc @ dW.T + db
    r = dr @ absWg.T + xr @ absdW.T + FLOAT_SLACK * ((dc.abs() + dr) @ absWg.T + (xc.abs() + xr) @ (absdW + f.W1.abs()).T
                                                     + db.abs() + f.b1.abs()) + 2e-6
    dzl, dzu = c - r, c + r
    gzl, gzu = torch.maximum(gzl, fzl + dzl), torch.minimum(gzu, fzu + dzu)
    # ReLU
    fhl, fhu = fzl.clamp(min=0), fzu.clamp(min=0)
    ghl, ghu = gzl.clamp(min=0), gzu.clamp(min=0)
    dhl, dhu = _relu_diff(fzl, fzu, gzl, gzu, dzl, dzu)
    if g.q_hid is not None:
        ghl, ghu, el, eu = g.q_hid.bounds(ghl, ghu)
        dhl, dhu = dhl + el, dhu + eu
    # margins
    Rf, rbf = _margin_rows(f.W2, f.b2)
    Rg, rbg = _margin_rows(g.W2, g.b2)
    fml, fmu = _cr_dot(Rf, (fhl + fhu) / 2, (fhu - fhl) / 2, rbf)
    gml, gmu = _cr_dot(Rg, (ghl + ghu) / 2, (ghu - ghl) / 2, rbg)
    d1l, d1u = _cr_dot(Rg, (dhl + dhu) / 2, (dhu - dhl) / 2, rbg - rbf)
    d2l, d2u = _cr_dot(Rg - Rf, (fhl + fhu) / 2, (fhu - fhl) / 2, torch.zeros_like(rbf))
    deltal, deltau = d1l + d2l, d1u + d2u
    if g.q_out is not None:
        yl, yu = affine_bounds(g.W2, g.b2, ghl, ghu)
        ql, qu, el, eu = g.q_out.bounds(yl, yu)
        el_kj, eu_kj = el[:, :, None] - eu[:, None, :], eu[:, :, None] - el[:, None, :]
        gml = torch.maximum(gml + el_kj, ql[:, :, None] - qu[:, None, :])
        gmu = torch.minimum(gmu + eu_kj, qu[:, :, None] - ql[:, None, :])
        deltal, deltau = deltal + el_kj, deltau + eu_kj
    gml, gmu = torch.maximum(gml, fml + deltal), torch.minimum(gmu, fmu + deltau)
    return DiffBounds(fml, fmu, gml, gmu, deltal, deltau)


def certified_action(f_lower: Tensor, g_lower: Tensor) -> Tensor:
    """The certificate condition, per box: the action k with min_{j != k} lower(m_kj) > 0 for
    both f and g, or -1 where no action qualifies. f_lower, g_lower: (N, K, K) margin lower bounds.
    Used in: 08_cartpole_consistency.
    """
    if f_lower.shape != g_lower.shape or f_lower.ndim != 3 or f_lower.shape[1] != f_lower.shape[2]:
        raise ValueError(f"f_lower and g_lower must both have shape (N, K, K), got {tuple(f_lower.shape)}, "
                         f"{tuple(g_lower.shape)}")
    K = f_lower.shape[1]
    eye = torch.eye(K, dtype=torch.bool)
    inf = torch.tensor(math.inf, dtype=f_lower.dtype)
    ok = (torch.where(eye, inf, f_lower).amin(2) > 0) & (torch.where(eye, inf, g_lower).amin(2) > 0)  # (N, K)
    return torch.where(ok.any(1), ok.to(torch.int64).argmax(1), torch.full((len(ok),), -1))


# ----------------------------------------------------------------------------- verifier
@dataclass
class CertifyConfig:
    """Budget and search settings of ``certify_many``. The budget is per box, so one hard box can
    never starve the others or blow up memory: a box that runs out of it is UNKNOWN."""

    max_depth: int = 24
    """Most bisections along any path from a box to a piece."""
    max_pieces: int = 256
    """Most pieces bounded per box, counted over all rounds; a box that would exceed it is UNKNOWN."""
    n_random: int = 4
    """Uniform random points tried per piece in the counterexample search."""
    n_line: int = 16
    """Points per line scan across f's decision boundary."""
    search_depth: int = 6
    """Pieces that f's own bound leaves open are searched at every depth up to this one, then at
    every 4th; pieces where f alone is certified (only g can flip) at every 6th depth."""
    chunk: int = 4096
    """Pieces bounded or searched at once (bounds the memory whatever the number of boxes)."""
    seed: int = 0
    """Seeds the random search points."""


@dataclass
class VerifyResult:
    """Verdicts of ``certify_many`` for a batch of boxes."""

    verdicts: Tensor
    """int64 (N,): 0 CERTIFIED, 1 COUNTEREXAMPLE, 2 UNKNOWN."""
    counterexamples: Tensor
    """float32 (N, d): a confirmed disagreeing state for COUNTEREXAMPLE boxes, NaN elsewhere."""
    leaves: int
    """Pieces bounded in total (each box counts as one piece, each bisection adds two)."""
    seconds: float
    """Wall time."""
    unconfirmed: int = 0
    """Search hits whose deployed re-run did not disagree (emulation vs kernel rounding); not counted."""
    heavy: int = 0
    """Boxes that used at least half of their piece budget (how close the budget is to binding)."""

    def fractions(self) -> dict[str, float]:
        """{"certified", "counterexample", "unknown"}: fractions of the boxes."""
        n = max(1, len(self.verdicts))
        return {v.lower(): float((self.verdicts == i).sum()) / n for i, v in enumerate(VERDICTS)}


def _grad_margin(f: IntervalNet, x: Tensor, k: Tensor, j: Tensor) -> tuple[Tensor, Tensor]:
    """m = y_k - y_j of the float net at x and its gradient (piecewise linear, exact)."""
    z = x @ f.W1.T + f.b1
    act = (z > 0).double()
    R = f.W2[k] - f.W2[j]  # (L, H)
    m = ((torch.relu(z) * R).sum(1) + f.b2[k] - f.b2[j])
    grad = (R * act) @ f.W1
    return m, grad


def _search_points(f: IntervalNet, lo: Tensor, hi: Tensor, cell: Tensor, cfg: CertifyConfig,
                   gen: torch.Generator) -> list[Tensor]:
    """Candidate states per piece, in groups tried one after the other (most productive first):
    a fine line scan across f's linearised boundary (+-cell/4 around it, where g's boundary, a
    rounding step away, usually is), a wider one (+-2 cells), then the centre, random points and
    a scan along the whole gradient direction. Each group is (L, C, d), clipped to the piece."""
    L, d = lo.shape
    c = (lo + hi) / 2
    logits = torch.relu(c @ f.W1.T + f.b1) @ f.W2.T + f.b2
    top2 = logits.topk(2, dim=1).indices
    m, grad = _grad_margin(f, c, top2[:, 0], top2[:, 1])
    gn = grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
    u = grad / gn
    t_star = (-m / gn[:, 0])[:, None]  # linearised distance to f's boundary along u
    half_diag = ((hi - lo) / 2).norm(dim=1, keepdim=True)
    t = torch.linspace(-1, 1, cfg.n_line, dtype=torch.float64)[None, :]
    line = lambda tt: c[:, None, :] + tt[:, :, None] * u[:, None, :]  # noqa: E731
    rand = lo[:, None, :] + (hi - lo)[:, None, :] * torch.rand(L, cfg.n_random, d, generator=gen, dtype=torch.float64)
    groups = [line(t_star + t * 0.25 * cell), line(t_star + t * 2 * cell),
              torch.cat([c[:, None, :], rand, line(t * half_diag)], dim=1)]
    return [torch.minimum(torch.maximum(P, lo[:, None, :]), hi[:, None, :]).float().double() for P in groups]


def _cell_size(g: IntervalNet, lo: Tensor, hi: Tensor) -> Tensor:
    if g.q_in is None:
        return ((hi - lo).amax(1, keepdim=True) * 1e-3).clamp(min=1e-6)
    if g.q_in.kind == "static":
        return torch.full((len(lo), 1), g.q_in.scale, dtype=torch.float64)
    return g.q_in._dynamic_scale(lo.amin(1, keepdim=True), hi.amax(1, keepdim=True)).clamp(min=1e-6)


def _find_counterexamples(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor, cfg: CertifyConfig,
                          gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Search each piece for a state where the emulated argmaxes differ: (found (L,), points (L, d)).
    The groups of ``_search_points`` are tried in turn, each only on the pieces still without a hit."""
    found = torch.zeros(len(lo), dtype=torch.bool)
    points = torch.full(lo.shape, math.nan, dtype=torch.float64)
    for s in range(0, len(lo), cfg.chunk):
        l, h = lo[s: s + cfg.chunk], hi[s: s + cfg.chunk]
        idx = torch.arange(s, s + len(l))
        for P in _search_points(f, l, h, _cell_size(g, l, h), cfg, gen):  # (L, C, d)
            todo = ~found[idx]
            P, rows = P[todo], idx[todo]
            if not len(rows):
                break
            flat = P.reshape(-1, P.shape[-1])
            with torch.no_grad():
                yf, yg = f.simulate(flat, torch.float32), g.simulate(flat, torch.float32)
            dis = (yf.argmax(1) != yg.argmax(1)).reshape(P.shape[:2])
            hit = dis.any(1)
            first = dis.to(torch.int64).argmax(1)
            found[rows[hit]] = True
            points[rows[hit]] = P[hit, first[hit]]
    return found, points


EDGE_EPS = 1e-4
"""Codes within this many units of a cell edge, at a box's own boundary, count as both codes: the
float32 kernel computes x * (1 / S), whose rounding can move a code edge by ~1e-5 codes."""


def _static_codes(q: ActQuant, lo: Tensor, hi: Tensor, outer_lo: Tensor | None = None,
                  outer_hi: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Codes (q - Z) of a piece's two ends, per dimension, for a static quantizer.

    Code k covers the cell [(k - 0.5) S, (k + 0.5) S] (unbounded at a clipped end). A piece end that
    is an inner cut, made exactly on a cell edge by ``_choose_split``, takes the code of the piece's
    inside: a state on the edge, or next to it on the wrong side of the kernel's float32 rounding,
    gets the code of the neighbouring piece, which is part of the same box. An end that is the
    box's own boundary (equal to ``outer_lo`` / ``outer_hi``) has no neighbour in the box, so there
    the codes within EDGE_EPS of an edge count on both sides (outward)."""
    t_lo, t_hi = lo / q.scale + 1e-9, hi / q.scale - 1e-9
    if outer_lo is not None:
        t_lo = torch.where(lo == outer_lo, lo / q.scale - EDGE_EPS, t_lo)
    if outer_hi is not None:
        t_hi = torch.where(hi == outer_hi, hi / q.scale + EDGE_EPS, t_hi)
    k_lo = torch.clamp(torch.round(t_lo) + q.zero_point, q.qmin, q.qmax) - q.zero_point
    k_hi = torch.clamp(torch.round(t_hi) + q.zero_point, q.qmin, q.qmax) - q.zero_point
    return k_lo, k_hi


def _single_cell(g: IntervalNet, lo: Tensor, hi: Tensor, outer_lo: Tensor, outer_hi: Tensor) -> tuple[Tensor, Tensor]:
    """For a static input quantizer: which pieces lie in one input-code cell (then g is constant
    there, equal to g at the grid point S k), and that grid point. outer_lo, outer_hi: the bounds
    of the box each piece belongs to."""
    k_lo, k_hi = _static_codes(g.q_in, lo, hi, outer_lo, outer_hi)
    return (k_lo == k_hi).all(1), (k_lo * g.q_in.scale).float()


def _choose_split(g: IntervalNet, lo: Tensor, hi: Tensor, sens: Tensor) -> tuple[Tensor, Tensor]:
    """Where to cut each leaf: for a static input quantizer, on an input-code cell edge while the
    leaf spans several codes (each piece then has one g value); otherwise at the midpoint of the
    side that moves f's margin most, width_i * sum_h |R_h| |W1_hi|."""
    dim = ((hi - lo) * sens).argmax(1)
    cut = ((lo + hi) / 2).gather(1, dim[:, None])
    if g.q_in is None or g.q_in.kind != "static":  # dynamic: code edges move with S, midpoints work best
        return dim, cut
    k_lo, k_hi = _static_codes(g.q_in, lo, hi)
    span = k_hi - k_lo
    dc = span.argmax(1)[:, None]
    b = torch.floor((k_lo.gather(1, dc) + k_hi.gather(1, dc)) / 2) + 0.5
    ok = span.gather(1, dc) > 0
    return torch.where(ok[:, 0], dc[:, 0], dim), torch.where(ok, b * g.q_in.scale, cut)


def _bounds_g_lower(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor, outer_lo: Tensor, outer_hi: Tensor,
                    chunk: int) -> tuple[Tensor, Tensor]:
    """Margin lower bounds (f_lower, g_lower), (L, K, K), of every piece, ``chunk`` pieces at a time.

    g_lower comes from ``diff_margin_bounds``; for a static input quantizer, a piece inside one
    input-code cell has a constant g, so its g_lower is replaced by the exact deployed decision
    (+1 in row a, the action g takes there; -1 elsewhere). outer_lo, outer_hi: each piece's box."""
    fl, gl = [], []
    for s in range(0, len(lo), chunk):
        l, h = lo[s: s + chunk], hi[s: s + chunk]
        db = diff_margin_bounds(f, g, l, h)
        g_lower = db.g_lower
        if g.q_in is not None and g.q_in.kind == "static":  # one input-code cell: g is known exactly
            single, grid = _single_cell(g, l, h, outer_lo[s: s + chunk], outer_hi[s: s + chunk])
            if bool(single.any()):
                a = g.rows_logits(grid[single]).argmax(1)  # the deployed action, ties as argmax breaks them
                K = g_lower.shape[1]
                row = (torch.arange(K)[None, :, None] == a[:, None, None]).double().expand(-1, K, K)
                g_lower[single] = 2 * row - 1  # +1: "action a beats every j", -1 otherwise
        fl.append(db.f_lower)
        gl.append(g_lower)
    return torch.cat(fl), torch.cat(gl)


def certify_many(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor,
                 cfg: CertifyConfig = CertifyConfig()) -> VerifyResult:
    """Verdict for each box [lo_i, hi_i]: CERTIFIED, COUNTEREXAMPLE or UNKNOWN.

    Work list of pieces (initially the boxes themselves). Each round:
      1. ``diff_margin_bounds`` on every piece; a piece is certified when ``certified_action`` >= 0
         (some k with lower(m_kj) > 0 for f and for g against every j).
      2. uncertified pieces are searched for a disagreement (line scans across f's linearised
         boundary at the input quantizer's cell size, then random points); for each box, one hit is
         re-run on both *deployed* networks at batch 1, and only a confirmed disagreement makes
         the box a COUNTEREXAMPLE (its other pieces are dropped);
      3. the rest are bisected at the midpoint of the dimension with the largest
         width_i * sum_h |R_h| |W1_hi| (how much that side moves f's margin), or on an input-code
         cell edge for a static input quantizer.
    A box whose pieces are all certified is CERTIFIED: on every piece both argmaxes equal that
    piece's k, so argmax f = argmax g on the whole box. Work per box is capped: a box whose
    pieces reach ``max_depth`` bisections, or whose pieces would number more than ``max_pieces``
    in total, is UNKNOWN (unless a counterexample turns up first); its pieces are dropped.
    Used in: 08_cartpole_consistency.
    """
    lo, hi = _as_box(lo, hi, f.dim)
    for name in ("max_depth", "max_pieces", "n_random", "n_line", "search_depth", "chunk"):
        _check_int(getattr(cfg, name), name, 0 if name in ("max_depth", "search_depth") else 1)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    N = len(lo)
    verdict = torch.full((N,), CERTIFIED, dtype=torch.int64)
    cex = torch.full(lo.shape, math.nan, dtype=torch.float32)
    pieces = torch.zeros(N, dtype=torch.int64)  # pieces bounded so far, per box
    R, _ = _margin_rows(f.W2, f.b2)
    sens = (R.abs().sum((0, 1)) @ f.W1.abs())  # (d,): how much each input moves the margins
    box_lo, box_hi = lo.double(), hi.double()
    Llo, Lhi, owner = box_lo, box_hi, torch.arange(N)
    depth, unconfirmed = 0, 0
    while len(owner):
        pieces += torch.bincount(owner, minlength=N)
        f_lower, g_lower = _bounds_g_lower(f, g, Llo, Lhi, box_lo[owner], box_hi[owner], cfg.chunk)
        open_ = certified_action(f_lower, g_lower) < 0
        Llo, Lhi, owner, f_lower = Llo[open_], Lhi[open_], owner[open_], f_lower[open_]
        if not len(owner):
            break
        # 2. search the open pieces; confirm one hit per box on the deployed networks
        f_open = certified_action(f_lower, f_lower) < 0
        search = (f_open & ((depth <= cfg.search_depth) | (depth % 4 == 0))) | (depth % 6 == 0)
        if bool(search.any()):
            found, pts = _find_counterexamples(f, g, Llo[search], Lhi[search], cfg, gen)
            hit_owner, hit_pts = owner[search][found], pts[found]
            first = torch.ones(len(hit_owner), dtype=torch.bool)  # the first hit of each box
            first[1:] = hit_owner[1:] != hit_owner[:-1]  # owners are sorted within a round
            hit_owner, x = hit_owner[first], hit_pts[first].float()
            if len(x):
                real = f.decide(x) != g.decide(x)
                verdict[hit_owner[real]] = COUNTEREXAMPLE
                cex[hit_owner[real]] = x[real]
                unconfirmed += int((~real).sum())
        keep = verdict[owner] != COUNTEREXAMPLE
        Llo, Lhi, owner = Llo[keep], Lhi[keep], owner[keep]
        # 3. the budget per box, then bisect what is left
        over = (pieces + 2 * torch.bincount(owner, minlength=N) > cfg.max_pieces) | (depth >= cfg.max_depth)
        verdict[owner[over[owner]]] = UNKNOWN
        alive = ~over[owner]
        Llo, Lhi, owner = Llo[alive], Lhi[alive], owner[alive]
        if not len(owner):
            break
        dim, mid = _choose_split(g, Llo, Lhi, sens)
        hi_left = Lhi.clone().scatter_(1, dim[:, None], mid)
        lo_right = Llo.clone().scatter_(1, dim[:, None], mid)
        # interleave the halves so that each box's pieces stay together (sorted by owner)
        Llo = torch.stack([Llo, lo_right], 1).reshape(-1, Llo.shape[1])
        Lhi = torch.stack([hi_left, Lhi], 1).reshape(-1, Lhi.shape[1])
        owner = owner.repeat_interleave(2)
        depth += 1
    return VerifyResult(verdict, cex, int(pieces.sum()), time.perf_counter() - t0, unconfirmed,
                        int((pieces >= cfg.max_pieces // 2).sum()))


@dataclass
class Certificate:
    """``certify``'s answer for one box."""

    verdict: str
    """"CERTIFIED", "COUNTEREXAMPLE" or "UNKNOWN"."""
    counterexample: Tensor | None
    """A float32 state (d,) where the deployed argmaxes differ, for COUNTEREXAMPLE."""
    leaves: int
    """Leaves examined."""


def certify(f: IntervalNet, g: IntervalNet, box: tuple[Tensor, Tensor],
            cfg: CertifyConfig = CertifyConfig()) -> Certificate:
    """Is argmax f(x) = argmax g(x) for every x in the box (lo, hi)?  See ``certify_many``.

    Used in: 08_cartpole_consistency.
    """
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise ValueError("box must be a pair (lo, hi) of tensors of shape (d,)")
    lo, hi = _as_box(box[0], box[1], f.dim)
    if len(lo) != 1:
        raise ValueError(f"box must be a single box of shape (d,), got {len(lo)} boxes; use certify_many")
    res = certify_many(f, g, lo, hi, cfg)
    v = int(res.verdicts[0])
    return Certificate(VERDICTS[v], res.counterexamples[0] if v == COUNTEREXAMPLE else None, res.leaves)


def boxes_around(states: Tensor, half_width: float) -> tuple[Tensor, Tensor]:
    """lo = s - h, hi = s + h for each state (N, d), in normalized state units.

    Used in: 08_cartpole_consistency.
    """
    if not isinstance(half_width, (int, float)) or isinstance(half_width, bool) or not (
            math.isfinite(half_width) and half_width >= 0):
        raise ValueError(f"half_width must be a finite float >= 0, got {half_width!r}")
    s = rl._check_states(states)
    return s - half_width, s + half_width


def plain_ibp(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor) -> Tensor:
    """The study's recipe done soundly but plainly: one interval pass per network, no
    differential bound, no bisection, no search. CERTIFIED if some logit interval lies above
    all others (l_k > u_j) for both networks; COUNTEREXAMPLE if the two deployed networks
    disagree at the box centre (the only point the study ran); else UNKNOWN. (N,) verdicts.
    Used in: 08_cartpole_consistency.
    """
    lo, hi = _as_box(lo, hi, f.dim)
    out = torch.full((len(lo),), UNKNOWN, dtype=torch.int64)
    lbs = []
    for net in (f, g):
        yl, yu = layer_bounds(net, lo, hi).logits
        lbs.append(yl[:, :, None] - yu[:, None, :])
    out[certified_action(*lbs) >= 0] = CERTIFIED
    c = ((lo + hi) / 2).float()
    dis = f.rows_logits(c).argmax(1) != g.rows_logits(c).argmax(1)
    out[dis & (out != CERTIFIED)] = COUNTEREXAMPLE
    return out


def check_certificates(f: IntervalNet, g: IntervalNet, lo: Tensor, hi: Tensor, verdicts: Tensor,
                       n_samples: int = 64, seed: int = 0, chunk: int = 1024) -> int:
    """Dense sampling inside every CERTIFIED box: how many contain a state where the argmaxes differ.

    Samples: the 2^d corners and ``n_samples`` uniform points per box, run with batch-1 semantics
    (``IntervalNet.rows_logits``). A sound verifier gives 0. Used in: 08_cartpole_consistency.
    """
    lo, hi = _as_box(lo, hi, f.dim)
    _check_int(n_samples, "n_samples", 1)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(verdicts == CERTIFIED).flatten()
    d = lo.shape[1]
    corners = torch.tensor(list(np.ndindex(*(2,) * d)), dtype=torch.float32)  # (2^d, d)
    bad = 0
    for s in range(0, len(idx), chunk):
        i = idx[s: s + chunk]
        l, h = lo[i].float(), hi[i].float()
        u = torch.cat([corners.expand(len(i), -1, -1), torch.rand(len(i), n_samples, d, generator=gen)], dim=1)
        P = (l[:, None, :] + (h - l)[:, None, :] * u).minimum(h[:, None, :]).reshape(-1, d)
        dis = (f.rows_logits(P).argmax(1) != g.rows_logits(P).argmax(1)).reshape(len(i), -1)
        bad += int(dis.any(1).sum())
    return bad


# ----------------------------------------------------------------------------- the study's recipe
def study_bounds(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """The original study's interval recipe, reconstructed: push the two box corners through the
    layers with the ReLU dropped and no |W|:  lower = W2 (W1 lo + b1) + b2,  upper = W2 (W1 hi + b1) + b2.
    NOT SOUND: a negative weight maps the low corner to a high output, so 'lower' can exceed
    'upper' and true outputs fall outside. Shown only to measure that. Used in: 08_cartpole_consistency.
    """
    lo, hi = _as_box(lo, hi, W1.shape[1])
    lin = lambda x: (x.double() @ W1.double().T + b1.double()) @ W2.double().T + b2.double()  # noqa: E731
    return lin(lo), lin(hi)


# ----------------------------------------------------------------------------- figures
def verdict_slice(f: IntervalNet, g: IntervalNet, base: Tensor, half_width: float, dims: tuple[int, int] = (2, 3),
                  extent: tuple[float, float, float, float] = (-0.3, 0.3, -0.3, 0.3), n: int = 41,
                  cfg: CertifyConfig = CertifyConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Verdicts on an n x n grid of box centres over two state dimensions, the others at ``base``.

    Returns (xs, ys, verdicts (n, n)), verdicts[i, j] for (xs[j], ys[i]). Used in: 08_cartpole_consistency.
    """
    _check_int(n, "n", 2)
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < f.dim for d in dims):
        raise ValueError(f"dims must be two different state indices in 0..{f.dim - 1}, got {dims!r}")
    xs = torch.linspace(extent[0], extent[1], n)
    ys = torch.linspace(extent[2], extent[3], n)
    S = base.float().reshape(1, -1).repeat(n * n, 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    S[:, dims[0]], S[:, dims[1]] = gx.reshape(-1), gy.reshape(-1)
    lo, hi = boxes_around(S, half_width)
    return xs, ys, certify_many(f, g, lo, hi, cfg).verdicts.reshape(n, n)


def plot_verdict_slice(ax, xs: Tensor, ys: Tensor, verdicts: Tensor, f: IntervalNet, base: Tensor,
                       dims: tuple[int, int] = (2, 3), title: str = "", states: Tensor | None = None) -> None:
    """Draw a verdict grid (green certified, red counterexample, grey unknown) with f's decision
    boundary (black line) and, optionally, visited states. Used in: 08_cartpole_consistency."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#7fc97f", "#f0027f", "#bdbdbd"])
    dx, dy = float(xs[1] - xs[0]) / 2, float(ys[1] - ys[0]) / 2
    ax.imshow(verdicts.numpy(), origin="lower", cmap=cmap, vmin=0, vmax=2, aspect="auto",
              extent=(float(xs[0]) - dx, float(xs[-1]) + dx, float(ys[0]) - dy, float(ys[-1]) + dy))
    fx = torch.linspace(float(xs[0]), float(xs[-1]), 200)
    fy = torch.linspace(float(ys[0]), float(ys[-1]), 200)
    gy, gx = torch.meshgrid(fy, fx, indexing="ij")
    S = base.double().reshape(1, -1).repeat(200 * 200, 1)
    S[:, dims[0]], S[:, dims[1]] = gx.reshape(-1).double(), gy.reshape(-1).double()
    y = f.simulate(S)
    m = (y[:, 1] - y[:, 0]).reshape(200, 200)
    ax.contour(fx.numpy(), fy.numpy(), m.numpy(), levels=[0.0], colors="k", linewidths=1.2)
    if states is not None:
        ax.scatter(states[:, dims[0]], states[:, dims[1]], s=2, c="k", alpha=0.25, linewidths=0)
    ax.set_xlabel(f"{rl.STATE_NAMES[dims[0]]} (normalized)")
    ax.set_ylabel(f"{rl.STATE_NAMES[dims[1]]} (normalized)")
    ax.set_title(title, fontsize=9)


HALF_WIDTHS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
"""Box half-widths the explorer offers (normalized state units)."""


def explorer(f: IntervalNet, nets: dict[str, IntervalNet], states: Tensor, cfg: CertifyConfig = CertifyConfig()):
    """Explorer (``ll.explorer``): pick a visited state, a box half-width and a quantized variant; see
    both networks' logit intervals over the box, the logits at the state itself, and the verdict.
    Used in: 08_cartpole_consistency.
    """
    import matplotlib.pyplot as plt

    from . import explorers as ex

    if not nets:
        raise ValueError("nets must name at least one quantized IntervalNet")
    states = rl._check_states(states)

    def draw(index: int, half_width: float, variant: str) -> None:
        g = nets[variant]
        lo, hi = boxes_around(states[index: index + 1], half_width)
        cert = certify(f, g, (lo[0], hi[0]), cfg)
        fig, ax = plt.subplots(figsize=(6.5, 2.6))
        for row, (net, colour) in enumerate(((f, "tab:blue"), (g, "tab:orange"))):
            yl, yu = layer_bounds(net, lo, hi).logits
            y0 = net.rows_logits(states[index: index + 1])[0]
            for k in range(yl.shape[1]):
                pos = k * 3 + row
                ax.plot([float(yl[0, k]), float(yu[0, k])], [pos, pos], color=colour, lw=6, solid_capstyle="butt",
                        label=net.name if k == 0 else None)
                ax.plot(float(y0[k]), pos, "k|", ms=14)
        ax.set_yticks([0.5, 3.5], ["logit 0 (push left)", "logit 1 (push right)"])
        ax.set_xlabel("logit value (interval over the box; | = value at the state)")
        ax.legend(loc="upper left", fontsize=8)
        where = (f" at {[round(v, 4) for v in cert.counterexample.tolist()]}" if cert.counterexample is not None else "")
        ax.set_title(f"state {index}, half-width {half_width:g}: {cert.verdict}{where}", fontsize=9)

    return ex.explorer(draw, title="Logit intervals of the float policy f and a quantized g over a box",
                       index=ex.int_slider(0, 0, len(states) - 1, description="visited state"),
                       half_width=ex.dropdown(list(HALF_WIDTHS), 0.01, description="half-width"),
                       variant=ex.dropdown(list(nets), description="variant"))


# ----------------------------------------------------------------------------- the whole study
@dataclass
class VariantVerification:
    """``verify_variant``'s results for one quantized variant at one box half-width."""

    fractions: dict[str, float]
    """Our verifier: {"certified", "counterexample", "unknown"} as fractions of the boxes."""
    baseline: dict[str, float]
    """The plain-IBP recipe (``plain_ibp``): same keys."""
    unsound: int
    """CERTIFIED boxes in which dense sampling found a disagreement (must be 0)."""
    counterexamples_confirmed: int
    """COUNTEREXAMPLE states that disagree when both deployed networks are re-run at batch 1."""
    counterexamples: int
    """COUNTEREXAMPLE boxes."""
    seconds: float
    """Wall time of ``certify_many`` (the verifier itself)."""
    audit_seconds: float
    """Wall time of the rest: the plain-IBP baseline, the dense-sampling audit, the batch-1 re-runs."""
    result: VerifyResult = field(repr=False, default=None)
    """The full per-box result."""


def verify_variant(f: IntervalNet, g: IntervalNet, states: Tensor, half_width: float,
                   cfg: CertifyConfig = CertifyConfig(), n_dense: int = 64) -> VariantVerification:
    """Boxes of ``half_width`` around ``states``: our verdicts, the plain-IBP recipe's, a dense-sampling
    audit of every certificate, and a batch-1 re-run of every counterexample. Runs on one thread
    (these are many small tensor operations). Used in: 08_cartpole_consistency.
    """
    lo, hi = boxes_around(states, half_width)
    with rl.threads(1):
        res = certify_many(f, g, lo, hi, cfg)
        t0 = time.perf_counter()
        base = plain_ibp(f, g, lo, hi)
        unsound = check_certificates(f, g, lo, hi, res.verdicts, n_samples=n_dense, seed=cfg.seed)
        idx = torch.nonzero(res.verdicts == COUNTEREXAMPLE).flatten()
        x = res.counterexamples[idx]
        confirmed = int((f.decide(x) != g.decide(x)).sum()) if len(idx) else 0
        inside = bool(((x >= lo[idx]) & (x <= hi[idx])).all()) if len(idx) else True
    if not inside:
        raise RuntimeError("a counterexample lies outside its box")
    n = max(1, len(base))
    base_fr = {v.lower(): float((base == i).sum()) / n for i, v in enumerate(VERDICTS)}
    return VariantVerification(res.fractions(), base_fr, unsound, confirmed, len(idx), res.seconds,
                               time.perf_counter() - t0, res)
