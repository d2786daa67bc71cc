"""Tests for lecturelib.quantizers: against PyTorch's fake-quantize kernels and hand-checked cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lecturelib.quantizers import (
    PerChannel,
    PerGroup,
    PerTensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    qrange,
    quantization_error,
    quantize,
)

HSET = settings(max_examples=60, deadline=None, derandomize=True)

from lecturelib.lecture import W_LECTURE

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def float_arrays(min_dims=1, max_dims=3, max_side=6):
    shapes = st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=finite))


# ----------------------------------------------------------------------------- qrange
@pytest.mark.parametrize(
    "n, signed, expected",
    [(2, True, (-2, 1)), (3, True, (-4, 3)), (4, True, (-8, 7)), (8, True, (-128, 127)),
     (8, False, (0, 255)), (1, False, (0, 1)), (32, True, (-(2**31), 2**31 - 1))],
)
def test_qrange_matches_lecture_table(n, signed, expected):
    assert qrange(n, signed) == expected


@pytest.mark.parametrize("bad", [0, 33, -1, 2.0, True, "8", None])
def test_qrange_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="num_bits must be an integer in 1..32"):
        qrange(bad)


# ----------------------------------------------------------------------------- lecture numbers
def test_lecture_per_tensor_2bit_example():
    qp = choose_qparams(W_LECTURE, num_bits=2, symmetric=True)
    assert qp.scale.item() == pytest.approx(2.12)
    expected_q = torch.tensor([[1, 0, 1, 0], [0, 0, -1, 1], [0, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.int32)
    assert torch.equal(quantize(W_LECTURE, qp), expected_q)
    assert quantization_error(W_LECTURE, qp).item() == pytest.approx(2.28, abs=0.005)


def test_lecture_per_channel_2bit_example():
    qp = choose_qparams(W_LECTURE, num_bits=2, symmetric=True, granularity=PerChannel(0))
    assert qp.scale.flatten().tolist() == pytest.approx([2.09, 2.12, 1.92, 1.87])
    # -1.03 / 1.92 = -0.54 rounds to -1: the slide's quantized table shows 0 there, its
    # reconstructed table shows -1.92. The reconstruction (and the error 2.08) is right.
    assert quantize(W_LECTURE, qp)[2, 3].item() == -1
    assert quantization_error(W_LECTURE, qp).item() == pytest.approx(2.08, abs=0.005)


# ----------------------------------------------------------------------------- properties
@HSET
@given(x=float_arrays(), num_bits=st.integers(2, 16), symmetric=st.booleans())
def test_round_trip_error_at_most_half_scale(x, num_bits, symmetric):
    x = torch.from_numpy(x)
    qp = choose_qparams(x, num_bits, symmetric)
    err = (x - fake_quantize(x, qp)).abs()
    bound = qp.scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool((err <= bound).all()), (err.max(), qp.scale)


@HSET
@given(x=float_arrays(), num_bits=st.integers(2, 16), symmetric=st.booleans(), signed=st.booleans())
def test_zero_is_exactly_representable(x, num_bits, symmetric, signed):
    if symmetric and not signed:
        return
    qp = choose_qparams(torch.from_numpy(x), num_bits, symmetric, signed=signed)
    zeros = torch.zeros(qp.shape)
    assert torch.equal(fake_quantize(zeros, qp), zeros)
    assert bool(((qp.zero_point >= qp.qmin) & (qp.zero_point <= qp.qmax)).all())


@HSET
@given(c=finite, shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), num_bits=st.integers(2, 16),
       symmetric=st.booleans())
def test_constant_tensor_quantizes_exactly(c, shape, num_bits, symmetric):
    x = torch.full(shape, c, dtype=torch.float32)
    qp = choose_qparams(x, num_bits, symmetric)
    assert bool(torch.isfinite(qp.scale).all())
    assert torch.equal(fake_quantize(x, qp), x)


@pytest.mark.parametrize("c", [1e-40, -3e-45, 1.2e-38])
def test_subnormal_constant_stays_finite(c):
    x = torch.full((3,), c, dtype=torch.float32)
    qp = choose_qparams(x, 8)
    x_fq = fake_quantize(x, qp)
    assert bool(torch.isfinite(x_fq).all())
    assert float((x_fq - x).abs().max()) <= torch.finfo(torch.float32).tiny


def test_zero_tensor_has_unit_scale_not_nan():
    qp = choose_qparams(torch.zeros(3, 4), 8, granularity=PerChannel(1))
    assert torch.equal(qp.scale, torch.ones(1, 4))


# ----------------------------------------------------------------------------- vs PyTorch
@HSET
@given(x=float_arrays(min_dims=1, max_dims=3, max_side=8), num_bits=st.integers(2, 8),
       symmetric=st.booleans(), signed=st.booleans())
def test_fake_quantize_equals_torch_per_tensor(x, num_bits, symmetric, signed):
    if symmetric and not signed:
        signed = True
    x = torch.from_numpy(x)
    qp = choose_qparams(x, num_bits, symmetric, signed=signed)
    ref = torch.fake_quantize_per_tensor_affine(
        x, qp.scale.reshape(()), qp.zero_point.reshape(()), qp.qmin, qp.qmax
    )
    assert torch.equal(fake_quantize(x, qp), ref)


@HSET
@given(x=float_arrays(min_dims=2, max_dims=4, max_side=6), data=st.data(), num_bits=st.integers(2, 8),
       symmetric=st.booleans())
def test_fake_quantize_equals_torch_per_channel_any_axis(x, data, num_bits, symmetric):
    x = torch.from_numpy(x)
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    qp = choose_qparams(x, num_bits, symmetric, granularity=PerChannel(axis))
    ref = torch.fake_quantize_per_channel_affine(
        x, qp.scale.flatten(), qp.zero_point.flatten(), axis % x.ndim, qp.qmin, qp.qmax
    )
    assert torch.equal(fake_quantize(x, qp), ref)


def test_fake_quantize_matches_torch_on_ties():
    # |x|_max = 127 makes S = 1 exactly, so 0.5, 1.5, ... sit half-way between codes:
    # both implementations must round half to even.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 127.0])
    qp = choose_qparams(x, 8, symmetric=True)
    assert qp.scale.item() == 1.0
    ref = torch.fake_quantize_per_tensor_affine(x, qp.scale.reshape(()), qp.zero_point.reshape(()), -128, 127)
    assert torch.equal(fake_quantize(x, qp), ref)
    assert fake_quantize(x, qp).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0]


def test_per_group_equals_per_tensor_on_each_group():
    torch.manual_seed(0)
    W = torch.randn(6, 32)
    qp = choose_qparams(W, 4, granularity=PerGroup(axis=1, group_size=8))
    assert qp.scale.shape == (6, 4)
    got = fake_quantize(W, qp)
    for r in range(6):
        for g in range(4):
            block = W[r, 8 * g: 8 * (g + 1)]
            ref = fake_quantize(block, choose_qparams(block, 4))
            assert torch.equal(got[r, 8 * g: 8 * (g + 1)], ref)


def test_finer_granularity_never_worse_on_lecture_matrix():
    errs = [quantization_error(W_LECTURE, choose_qparams(W_LECTURE, 2, True, g)).item()
            for g in (PerTensor(), PerChannel(0), PerGroup(1, 2))]
    assert errs[0] > errs[1] > errs[2]


def test_asymmetric_qparams_formula():
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False, signed=False)
    assert scale.item() == pytest.approx(4 / 255)
    assert zp.item() == round(255 / 4)  # 0 - round(-1 / S)
    scale, zp = qparams_from_range(torch.tensor(0.5), torch.tensor(3.0), 8)  # range widened to 0
    assert zp.item() == -128 and scale.item() == pytest.approx(3 / 255)


def test_dequantize_inverts_quantize_on_codes():
    x = torch.linspace(-3, 5, 101)
    qp = choose_qparams(x, 6)
    q = quantize(x, qp)
    assert q.dtype == torch.int32 and int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    assert torch.equal(quantize(dequantize(q, qp), qp), q)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [1, 17, 0, 3.5])
def test_bits_outside_range(bits):
    with pytest.raises(ValueError, match="num_bits must be an integer in 2..16"):
        choose_qparams(torch.randn(4), bits)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_rejected(bad):
    x = torch.tensor([0.0, 1.0, bad])
    with pytest.raises(ValueError, match="x must contain only finite values"):
        choose_qparams(x)
    qp = choose_qparams(torch.randn(3))
    with pytest.raises(ValueError, match="finite"):
        quantize(x, qp)
    with pytest.raises(ValueError, match="min_val must contain only finite"):
        qparams_from_range(torch.tensor(bad), torch.tensor(1.0))


def test_empty_tensor_rejected():
    with pytest.raises(ValueError, match="x must be non-empty"):
        choose_qparams(torch.empty(0, 3))


@pytest.mark.parametrize("axis", [2, -3, 10])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=r"axis must be an integer in -2..1"):
        choose_qparams(torch.randn(3, 4), granularity=PerChannel(axis))
    with pytest.raises(ValueError, match=r"axis must be an integer in -2..1"):
        choose_qparams(torch.randn(3, 4), granularity=PerGroup(axis, 1))


@pytest.mark.parametrize("g", [3, 0, -2, 5])
def test_group_size_must_divide(g):
    with pytest.raises(ValueError, match=r"group_size must divide the length 8 of axis 1 \(allowed: \[1, 2, 4, 8\]\)"):
        choose_qparams(torch.randn(2, 8), granularity=PerGroup(1, g))


def test_mismatched_shapes():
    qp = choose_qparams(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"x has shape \(5, 4\) but the qparams were chosen for shape \(4, 5\)"):
        quantize(torch.randn(5, 4), qp)
    with pytest.raises(ValueError, match="min_val and max_val must have the same shape"):
        qparams_from_range(torch.zeros(3), torch.ones(4))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="symmetric quantization needs signed=True"):
        choose_qparams(torch.randn(4), symmetric=True, signed=False)
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        qparams_from_range(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="granularity must be"):
        choose_qparams(torch.randn(4), granularity="per_channel")
    qp = choose_qparams(torch.randn(3), 4)
    with pytest.raises(ValueError, match=r"q must lie in -8..7"):
        dequantize(torch.tensor([0, 9, 1], dtype=torch.int32), qp)
    with pytest.raises(ValueError, match="q must be an integer tensor"):
        dequantize(torch.zeros(3), qp)
