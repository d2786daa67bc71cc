"""Tests for lecturelib.intops: integer-only layers, bit for bit against PyTorch's fbgemm kernels.

References: ``torch.ops.quantized.linear`` / ``conv2d`` (fbgemm engine), a literal Python-int
transcription of gemmlowp's fixed-point functions, NumPy float32 arithmetic for fbgemm's
requantization, and float64 brute force. Activation codes stay in 0..127 (reduce_range) so
that fbgemm's int16-saturating vpmaddubsw path (AVX2 CPUs without VNNI) gives exact sums too.

Measured (mismatch_rate, seed 0, 150 random layers each, half per-channel): rounding="fbgemm"
differs on 0 codes; rounding="gemmlowp" (int32 q_b, fixed point) on 0.08 % (linear) and 0.15 %
(conv) of codes, always by one code; seeds 0..5 give 0.09-0.18 %.
"""

import math
import platform
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib.intops import (
    check_int_conv2d_against_fbgemm,
    check_int_linear_against_fbgemm,
    fbgemm_layer,
    int_conv2d,
    int_conv2d_trace,
    int_linear,
    int_linear_trace,
    int_mlp_forward,
    mismatch_rate,
    mlp_ranges,
    quantize_bias,
    quantize_multiplier,
    random_layer,
    requantize,
)
from lecturelib.quantizers import PerChannel, choose_qparams, qparams_with_range, quantize

HSET = settings(max_examples=40, deadline=None, derandomize=True)
needs_fbgemm = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="the reference is fbgemm's x86 (AVX2/AVX-512) kernel",
)
INT32 = st.integers(-(2**31) + 1, 2**31 - 1)


# ----------------------------------------------------------------------------- helpers
def gemmlowp_reference(acc: int, M0: int, n: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul + RoundingDivideByPOT, on Python ints."""
    ab = acc * M0
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    x = abs(ab + nudge) // 2**31 * (1 if ab + nudge >= 0 else -1)  # C++ division truncates
    e = n - 31
    mask = (1 << e) - 1
    return (x >> e) + int((x & mask) > (mask >> 1) + int(x < 0))


def make_case(data, conv: bool) -> dict:
    """A layer drawn by hypothesis: shapes, stride/padding, per-channel, bias, codes, scales."""
    d = data.draw
    c_out, c_in = d(st.integers(1, 33)), d(st.integers(1, 5 if conv else 70))
    per_channel, has_bias = d(st.booleans()), d(st.booleans())
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    if conv:
        k, stride, padding = d(st.integers(1, 3)), d(st.integers(1, 2)), d(st.integers(0, 2))
        side = st.integers(max(1, k - 2 * padding), 9)  # the padded input holds one kernel
        h, w = d(side), d(side)
        x_shape, w_shape = (d(st.integers(1, 3)), c_in, h, w), (c_out, c_in, k, k)
    else:
        x_shape, w_shape = (d(st.integers(1, 8)), c_in), (c_out, c_in)
    logu = lambda *s: 10 ** (-3 + 2 * torch.rand(*s, generator=g, dtype=torch.float64))  # noqa
    case = dict(
        q_x=torch.randint(0, 128, x_shape, generator=g), zp_x=d(st.integers(0, 127)),
        scale_x=float(logu(1)), q_w=torch.randint(-128, 128, w_shape, generator=g),
        scale_w=logu(c_out if per_channel else 1),
        bias=torch.randn(c_out, generator=g) * d(st.sampled_from([0.01, 1.0, 5.0]))
        if has_bias else None,
    )
    x = (case["q_x"] - case["zp_x"]).double() * case["scale_x"]
    wr = case["q_w"] * case["scale_w"].view(-1, *[1] * (len(w_shape) - 1))
    b = None if case["bias"] is None else case["bias"].double()
    if conv:
        case.update(stride=stride, padding=padding)
        y = F.conv2d(x, wr, b, stride, padding)
    else:
        y = x @ wr.T + (0 if b is None else b)
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    m_guard = 2 * case["scale_x"] * float(case["scale_w"].max())  # keeps M = S_X S_W / S_Y < 1
    scale_y = max((hi - lo) / 255 * d(st.floats(0.5, 1.5)), m_guard)
    case.update(scale_y=scale_y, zp_y=min(255, max(0, round(-lo / scale_y))))
    return case


def has_vnni() -> bool:
    try:
        return "vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# ----------------------------------------------------------------------------- quantize_multiplier
@HSET
@given(st.floats(2.0**-32, 1.0, exclude_max=True))
def test_quantize_multiplier_is_31_bit_accurate(M):
    M0, n = quantize_multiplier(M)
    assert 2**30 <= M0 < 2**31 and 31 <= n <= 62
    assert abs(Fraction(M0, 2**n) - Fraction(M)) <= Fraction(1, 2 ** (n + 1))


@HSET
@given(st.floats(2.0**-32, 1.0, exclude_max=True, width=32))
def test_quantize_multiplier_is_exact_for_float32(M):
    M0, n = quantize_multiplier(M)
    assert Fraction(M0, 2**n) == Fraction(M) and M0 % 128 == 0  # mantissa << 7, as QNNPACK


@pytest.mark.parametrize("M", [0.0, -0.5, math.nan, math.inf, 1.0, 3.0, 1e-12, 1 - 2.0**-40])
def test_quantize_multiplier_rejects(M):
    with pytest.raises(ValueError, match="M must"):
        quantize_multiplier(M)


# ----------------------------------------------------------------------------- requantize
@HSET
@given(st.lists(INT32, min_size=1, max_size=20), st.floats(2.0**-32, 0.999))
def test_requantize_gemmlowp_matches_literal_gemmlowp(accs, M):
    M0, n = quantize_multiplier(M)
    wide = (-(2**31), 2**31 - 1)
    got = requantize(torch.tensor(accs), M0, n, 0, *wide).tolist()
    assert got == [gemmlowp_reference(a, M0, n) for a in accs]
    assert all(abs(g - round(a * M0 / 2**n)) <= 1 for g, a in zip(got, accs))


def f32_requantize(acc, C, b, zp, qmin, qmax):
    """fbgemm's ReQuantizeOutput in NumPy float32: clip(rint(f32(f32(f32(acc) + b) * C)) + Z)."""
    s = (np.asarray(acc, np.int64).astype(np.float32) + np.float32(b)).astype(np.float32)
    y = (s * np.asarray(C, np.float32)).astype(np.float32)
    return np.clip(np.rint(y).astype(np.int64) + zp, qmin, qmax)


@pytest.mark.parametrize("acc, b, C", [
    (1, 2.0**-24 + 2.0**-40, 0.5),  # tie in fl(1 + b) broken by bits below 2^-30: sticky bit
    (-1, -(2.0**-24 + 2.0**-40), 0.5),
    (2**25 + 2, 0.75, 0.5),  # fl(acc) rounds (tie to even) before the bias is added
    (-(2**25) - 2, -0.75, 0.5),
    (3, 0.0, 0.5), (5, 0.0, 0.5), (7, 0.0, 0.5),  # rint(1.5), rint(2.5), rint(3.5): ties to even
])
def test_requantize_fbgemm_hand_checked_ties(acc, b, C):
    wide = (-(2**31), 2**31 - 1)
    M0, n = quantize_multiplier(C)
    bias_q30 = quantize_bias(torch.tensor([b]), 1.0, 1.0, "fbgemm")
    got = requantize(torch.tensor([acc]), M0, n, 0, *wide, "fbgemm", bias_q30)
    assert got.tolist() == f32_requantize([acc], C, b, 0, *wide).tolist()


def test_requantize_fbgemm_bulk_against_float32():
    """20,000 random (acc, C, b), many of them exact float32 ties, against NumPy float32."""
    rng = np.random.default_rng(0)
    m = 20_000
    acc = (rng.choice([-1, 1], m) * 2.0 ** rng.uniform(0, 31, m)).astype(np.int64)
    acc = np.clip(acc, -(2**31) + 1, 2**31 - 1)
    C = np.float32(2.0 ** rng.uniform(-32, 0, m))
    C[::5] = 0.5  # powers of two expose every bit of fl(acc + b)
    b = np.float32(rng.choice([-1, 1], m) * 2.0 ** rng.uniform(-40, 30, m))
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(acc) + 0.5)) - 24)
    b[::3] = np.float32(half_ulp[::3] * (1 + rng.choice([-1, 0, 1], len(half_ulp[::3])) * 2.0**-20))
    b[::7] = 0.0
    M0, n = (torch.tensor(v) for v in zip(*[quantize_multiplier(float(c)) for c in C]))
    wide = (-(2**31), 2**31 - 1)
    bias_q30 = quantize_bias(torch.from_numpy(b), 1.0, 1.0, "fbgemm")
    got = requantize(torch.from_numpy(acc), M0, n, 3, *wide, "fbgemm", bias_q30)
    np.testing.assert_array_equal(got.numpy(), f32_requantize(acc, C, b, 3, *wide))


@HSET
@given(
    st.lists(INT32 | st.integers(-(2**25), 2**25), min_size=1, max_size=30),
    st.floats(2.0**-32, 1.0, exclude_max=True, width=32),
    st.floats(-(2.0**30), 2.0**30, width=32) | st.floats(-(2.0**-20), 2.0**-20, width=32),
    st.integers(0, 255),
)
def test_requantize_fbgemm_equals_float32_arithmetic(accs, C, b, zp):
    wide = (-(2**31), 2**31 - 1)
    M0, n = quantize_multiplier(C)
    bias_q30 = quantize_bias(torch.tensor([b]), 1.0, 1.0, "fbgemm")  # fl(b / 1) = b
    got = requantize(torch.tensor(accs), M0, n, zp, *wide, "fbgemm", bias_q30)
    assert got.tolist() == f32_requantize(accs, C, b, zp, *wide).tolist()


def test_requantize_per_channel_broadcasts_over_last_dim():
    acc = torch.tensor([[1000, 1000], [-1000, -1000]])
    M0, n = zip(quantize_multiplier(0.5), quantize_multiplier(0.25))
    got = requantize(acc, torch.tensor(M0), torch.tensor(n), 10, 0, 255)
    assert got.tolist() == [[255, 255], [0, 0]]
    got = requantize(acc // 10, torch.tensor(M0), torch.tensor(n), 100, 0, 255)
    assert got.tolist() == [[150, 125], [50, 75]]


# ----------------------------------------------------------------------------- bit-exact vs fbgemm
@needs_fbgemm
@HSET
@given(st.data())
def test_int_linear_is_bitexact_with_fbgemm(data):
    case = make_case(data, conv=False)
    assert torch.equal(int_linear(**case, rounding="fbgemm"), fbgemm_layer(**case))


@needs_fbgemm
@HSET
@given(st.data())
def test_int_conv2d_is_bitexact_with_fbgemm(data):
    case = make_case(data, conv=True)
    got, ref = int_conv2d(**case, rounding="fbgemm"), fbgemm_layer(**case)
    assert got.shape == ref.shape and torch.equal(got, ref)


@needs_fbgemm
def test_bitexact_when_float32_rounds_the_accumulator():
    """|acc - Z_X sum q_W| > 2^24, so fbgemm's int32 -> float32 conversion itself rounds."""
    g = torch.Generator().manual_seed(1)
    sign = torch.tensor([1, -1] * 8).view(-1, 1)
    q_w = (torch.randint(100, 128, (16, 3000), generator=g) * sign).clamp(-128, 127)
    case = dict(q_x=torch.randint(100, 128, (4, 3000), generator=g), zp_x=2, scale_x=0.01,
                q_w=q_w, scale_w=torch.linspace(1e-3, 1e-2, 16, dtype=torch.float64),
                bias=torch.randn(16, generator=g) * 100, scale_y=10.0, zp_y=128)
    t = int_linear_trace(**case, rounding="fbgemm")
    assert int((t.acc + t.q_bias).abs().max()) > 2**24
    assert torch.equal(t.q_y, fbgemm_layer(**case))


def _straddle_scales(seed: int) -> tuple[float, float, float, float]:
    """S_X, S_W, b, S_Y where fl(b * fl(1 / S_X S_W)) != fl(b / (S_X S_W)) and the 1-ulp
    difference flips rint(fl(bias * C)): the output then depends on which formula fbgemm uses."""
    f32, rng = np.float32, np.random.default_rng(seed)
    while True:
        sx, sw, b = (f32(v) for v in (10 ** rng.uniform(-3, -1), 10 ** rng.uniform(-3, -1),
                                      rng.uniform(0.5, 3)))
        atw = f32(sx * sw)
        bf = sorted({f32(b * f32(1.0 / np.float64(atw))), f32(b / atw)})
        for k in range(-64, 64) if len(bf) == 2 else []:
            sy = f32(np.float64(atw) * (bf[0] + bf[1]) * (1 + k * 2.0**-24))
            C = f32(atw / sy)
            if np.rint(f32(bf[0] * C)) != np.rint(f32(bf[1] * C)):
                return float(sx), float(sw), float(b), float(sy)


@needs_fbgemm
@pytest.mark.parametrize("seed", range(4))
def test_fbgemm_bias_reciprocal_per_tensor_division_per_channel(seed):
    """Same scales, same codes: fbgemm's per-tensor kernel multiplies the bias by a float32
    reciprocal, its per-channel kernel divides; the outputs differ and we match both."""
    sx, sw, b, sy = _straddle_scales(seed)
    out = []
    for c_out in (1, 2):  # one scale_w: per-tensor; two: per-channel
        case = dict(q_x=torch.full((1, 3), 50), zp_x=50, scale_x=sx,
                    q_w=torch.tensor([[3, -7, 100]] * c_out), scale_w=torch.tensor([sw] * c_out),
                    bias=torch.tensor([b] * c_out), scale_y=sy, zp_y=100)  # acc - Z_X sum q_W = 0
        ref = fbgemm_layer(**case)
        assert torch.equal(int_linear(**case, rounding="fbgemm"), ref)
        out.append(int(ref[0, 0]))
    assert out[0] != out[1]


def test_multiplier_is_fbgemms_float32_c_multiplier():
    """C = fl(fl(S_X S_W) / S_Y), as PyTorch's qlinear.cpp computes output_multiplier_float."""
    case = random_layer(5, per_channel=True)
    t = int_linear_trace(**case, rounding="fbgemm")
    atw = np.float32(case["scale_x"]) * case["scale_w"].numpy().astype(np.float32)
    C = (atw / np.float32(case["scale_y"])).astype(np.float32)
    exact = [Fraction(int(m), 2 ** int(k)) for m, k in zip(t.M0, t.n)]
    assert exact == [Fraction(float(c)) for c in C]
    t = int_linear_trace(**case, rounding="gemmlowp")
    M = case["scale_x"] * case["scale_w"] / case["scale_y"]
    assert torch.allclose(t.M0.double() * 2.0 ** -t.n.double(), M, rtol=2.0**-30, atol=0)


@needs_fbgemm
def test_notebook_checks_pass():
    assert check_int_linear_against_fbgemm(seed=0, trials=10)
    assert check_int_conv2d_against_fbgemm(seed=0, trials=10)


# ----------------------------------------------------------------------------- tests that can fail
@needs_fbgemm
@pytest.mark.parametrize("seed", range(5))
def test_dropping_the_zero_point_correction_is_not_bitexact(seed):
    case = random_layer(seed) | dict(zp_x=64)
    t = int_linear_trace(**case, rounding="fbgemm")
    ref = fbgemm_layer(**case)
    assert torch.equal(t.q_y, ref)
    wrong = requantize(t.acc, t.M0, t.n, case["zp_y"], 0, 255, "fbgemm", t.bias_q30)
    assert not torch.equal(wrong, ref)


@needs_fbgemm
def test_padding_with_zero_instead_of_zx_is_not_bitexact():
    case = random_layer(3, conv=True) | dict(zp_x=100, padding=2)
    ref = fbgemm_layer(**case)
    assert torch.equal(int_conv2d(**case, rounding="fbgemm"), ref)
    zero_padded = F.pad(case["q_x"], (2,) * 4, value=0)
    wrong = int_conv2d(**(case | dict(q_x=zero_padded, padding=0)), rounding="fbgemm")
    assert not torch.equal(wrong, ref)


@needs_fbgemm
def test_gemmlowp_rounding_differs_from_fbgemm_rarely_and_by_one():
    # ~0.1-0.2 % over 150 layers for every seed tried (0..5); 60 layers can give 0.0
    rates = [mismatch_rate(conv, "gemmlowp", seed=0, trials=150) for conv in (False, True)]
    assert all(0.0002 < r < 0.005 for r in rates), rates
    for seed in range(20):
        case = random_layer(seed, conv=bool(seed % 2), per_channel=seed % 4 < 2)
        layer = int_conv2d if seed % 2 else int_linear
        diff = layer(**case, rounding="gemmlowp") - fbgemm_layer(**case)
        assert int(diff.abs().max()) <= 1


@HSET
@given(st.data())
def test_gemmlowp_linear_is_within_one_code_of_float64(data):
    case = make_case(data, conv=False)
    t = int_linear_trace(**case, rounding="gemmlowp")
    s_w = case["scale_w"].view(-1)
    b = 0 if case["bias"] is None else case["bias"].double()
    y = ((case["q_x"] - case["zp_x"]).double() @ (case["q_w"].double() * s_w[:, None]).T
         * case["scale_x"] + b)
    ideal = (torch.round(y / case["scale_y"]) + case["zp_y"]).clamp(0, 255)
    assert int((t.q_y - ideal).abs().max()) <= 1
    assert t.acc.dtype == t.q_bias.dtype == t.q_y.dtype == torch.int64 and t.bias_q30 is None


def test_trace_pieces():
    case = random_layer(0, conv=True)
    t = int_conv2d_trace(**case)
    w_sum = case["q_w"].sum((1, 2, 3))
    q_b = 0 if case["bias"] is None else quantize_bias(case["bias"], case["scale_x"],
                                                       case["scale_w"])
    assert torch.equal(t.q_bias, q_b - case["zp_x"] * w_sum)
    expected = requantize((t.acc + t.q_bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1), t.M0, t.n,
                          case["zp_y"], 0, 255).permute(0, 3, 1, 2)
    assert torch.equal(t.q_y, expected)


# ----------------------------------------------------------------------------- int8 MLP
def _mlp(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 64, generator=g)
    W1, b1 = torch.randn(32, 64, generator=g) * 0.2, torch.randn(32, generator=g) * 0.1
    W2, b2 = torch.randn(10, 32, generator=g) * 0.3, torch.randn(10, generator=g) * 0.1
    return x, W1, b1, W2, b2


@pytest.mark.parametrize("rounding", ["gemmlowp", "fbgemm"])
def test_int_mlp_agrees_with_float(rounding):
    x, W1, b1, W2, b2 = _mlp(0)
    ranges = mlp_ranges(x, W1, b1, W2, b2)
    res = int_mlp_forward(x, W1, b1, W2, b2, ranges, rounding)
    logits = torch.relu(x @ W1.T + b1) @ W2.T + b2
    assert res.q_logits.dtype == torch.int64 and res.pred.shape == (256,)
    assert float((res.pred == logits.argmax(1)).float().mean()) >= 0.9
    assert float((res.logits - logits).abs().max()) < 0.05 * (ranges[2][1] - ranges[2][0])


@needs_fbgemm
@pytest.mark.skipif(not has_vnni(), reason="uint8 codes up to 255 saturate fbgemm without VNNI")
def test_int_mlp_fbgemm_equals_pytorch_pipeline():
    x, W1, b1, W2, b2 = _mlp(1)
    ranges = mlp_ranges(x, W1, b1, W2, b2)
    res = int_mlp_forward(x, W1, b1, W2, b2, ranges, "fbgemm")
    qps = [qparams_with_range(x, lo, hi, 8, symmetric=False, signed=False) for lo, hi in ranges]
    sz = [(float(qp.scale.reshape(())), int(qp.zero_point.reshape(()))) for qp in qps]
    q = quantize(x, qps[0])
    for i, (W, b) in enumerate([(W1, b1), (W2, b2)]):
        qp = choose_qparams(W, 8, symmetric=True, granularity=PerChannel(0))
        q = fbgemm_layer(q, sz[i][1], sz[i][0], quantize(W, qp), qp.scale.reshape(-1), b,
                         sz[i + 1][0], sz[i + 1][1])
        q = q.clamp(min=sz[1][1]) if i == 0 else q
    assert torch.equal(res.q_logits, q)


# ----------------------------------------------------------------------------- bad input
def _lin(**kw):
    case = random_layer(0, per_channel=True)
    return int_linear(**(case | kw))


BAD_LINEAR = [
    (dict(scale_x=math.nan), "scale_x"),
    (dict(scale_x=0.0), "scale_x"),
    (dict(scale_w=torch.tensor([math.inf])), "scale_w"),
    (dict(scale_w=torch.tensor([0.1, 0.2])), "scale_w"),
    (dict(scale_y=-1.0), "scale_y"),
    (dict(scale_y=1e-12), "scale_y"),
    (dict(q_x=torch.zeros(0, 3, dtype=torch.int64)), "q_x"),
    (dict(q_x=torch.zeros(2, 3)), "q_x"),
    (dict(q_x=torch.full((2, 3), 300)), "q_x"),
    (dict(q_x=torch.zeros(2, 1000, dtype=torch.int64)), "in_features"),
    (dict(q_w=torch.full((3, 3), 200)), "q_w"),
    (dict(bias=torch.zeros(1000)), "bias"),
    (dict(zp_x=300), "zp_x"),
    (dict(zp_x=1.5), "zp_x"),
    (dict(zp_y=-1), "zero_point"),
    (dict(rounding="nearest"), "rounding"),
]


@pytest.mark.parametrize("kw, name", BAD_LINEAR)
def test_int_linear_rejects_bad_input(kw, name):
    with pytest.raises(ValueError, match=name):
        _lin(**kw)


def test_int_linear_rejects_quantized_tensor():
    qx = torch.quantize_per_tensor(torch.rand(2, 3), 0.1, 0, torch.quint8)
    with pytest.raises(ValueError, match="q_x"):
        _lin(q_x=qx)


@pytest.mark.parametrize("kw, name", [
    (dict(stride=0), "stride"), (dict(padding=-1), "padding"),
    (dict(q_x=torch.zeros(1, 99, 5, 5, dtype=torch.int64)), "q_x"),
    (dict(q_x=torch.zeros(1, 1, 1, 1, dtype=torch.int64), padding=0), "kernel"),
])
def test_int_conv2d_rejects_bad_input(kw, name):
    case = random_layer(0, conv=True)
    if "q_x" in kw and kw["q_x"].shape[1] == 1:
        case["q_w"] = torch.ones(2, 1, 3, 3, dtype=torch.int64)
        case["bias"], case["scale_w"] = None, torch.tensor([0.01])
    with pytest.raises(ValueError, match=name):
        int_conv2d(**(case | kw))


@pytest.mark.parametrize("kw, name", [
    (dict(acc=torch.tensor([1.0])), "acc"),
    (dict(acc=torch.tensor([2**40])), "acc"),
    (dict(M0=2**29), "M0"),
    (dict(n=30), "n"),
    (dict(zero_point=300), "zero_point"),
    (dict(qmax=0), "qmax"),
    (dict(bias_q30=torch.tensor([1])), "bias_q30"),
    (dict(rounding="fbgemm", bias_q30=torch.tensor([0.5])), "bias_q30"),
])
def test_requantize_rejects_bad_input(kw, name):
    args = dict(acc=torch.tensor([5]), M0=2**30, n=32, zero_point=0, qmin=0, qmax=255) | kw
    with pytest.raises(ValueError, match=name):
        requantize(**args)


@pytest.mark.parametrize("b, name", [
    (torch.tensor([1, 2]), "bias"), (torch.zeros(2, 2), "bias"),
    (torch.tensor([math.nan]), "bias"), (torch.tensor([1e9]), "bias"),
])
def test_quantize_bias_rejects_bad_input(b, name):
    with pytest.raises(ValueError, match=name):
        quantize_bias(b, 0.01, 0.01)
