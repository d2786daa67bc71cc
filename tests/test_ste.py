"""Tests for lecturelib.ste: value and gradient of the straight-through estimator."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib.quantizers import PerChannel, choose_qparams, fake_quantize, qparams_from_range, QParams
from lecturelib.ste import ste_fake_quantize


def _qp_for_range(lo: float, hi: float, n: int, shape) -> QParams:
    scale, zp = qparams_from_range(torch.tensor([[lo]]), torch.tensor([[hi]]), n)
    scale, zp = scale.reshape([1] * len(shape)), zp.reshape([1] * len(shape))
    return QParams(scale, zp, -(2 ** (n - 1)), 2 ** (n - 1) - 1, tuple(shape), tuple(shape))


def test_gradient_is_one_inside_zero_outside():
    x = torch.tensor([-5.0, -1.0, -0.2, 0.0, 0.3, 0.99, 1.0, 1.2, 7.0], requires_grad=True)
    qp = _qp_for_range(-1.0, 1.0, 4, x.shape)
    y = ste_fake_quantize(x, qp)
    y.sum().backward()
    inside = (x.detach() >= -1.0 - qp.scale.item() / 2) & (x.detach() <= 1.0 + qp.scale.item() / 2)
    assert torch.equal(x.grad, inside.float())
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_forward_equals_fake_quantize():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    qp = choose_qparams(x, 3, granularity=PerChannel(0))
    assert torch.equal(ste_fake_quantize(x, qp), fake_quantize(x, qp))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), lo=st.floats(-3, -0.1), hi=st.floats(0.1, 3))
def test_gradient_equals_torch_fake_quantize_backward(seed, n, lo, hi):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(50, generator=g) * 2).requires_grad_(True)
    qp = _qp_for_range(lo, hi, n, x.shape)
    upstream = torch.randn(50, generator=g)
    (ste_fake_quantize(x, qp) * upstream).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    ref = torch.fake_quantize_per_tensor_affine(x, qp.scale.reshape(()), qp.zero_point.reshape(()), qp.qmin, qp.qmax)
    (ref * upstream).sum().backward()
    assert torch.equal(ours, x.grad)


def test_plain_fake_quantize_has_no_useful_gradient():
    # Why the STE exists: autograd through round() gives zero gradient everywhere.
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    qp = choose_qparams(x.detach(), 4)
    y = torch.round(x / qp.scale.reshape(())) * qp.scale.reshape(())
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0
