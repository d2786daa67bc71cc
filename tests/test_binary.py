"""lecturelib.binary: binarization, BWN, TWN, TTQ, the STE layers and packed inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib import binary as lb
from lecturelib.lecture import W_LECTURE

SETTINGS = settings(deadline=None, derandomize=True, max_examples=40)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one torch thread is fastest (and two spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLIDE_BINARY = torch.tensor(
    [[1, -1, 1, 1], [1, -1, -1, 1], [-1, 1, 1, -1], [1, 1, 1, 1]], dtype=torch.float32
)
SLIDE_TERNARY = torch.tensor(
    [[1, -1, 1, 0], [0, 0, -1, 1], [-1, 1, 0, -1], [1, 0, 1, 1]], dtype=torch.int8
)


def random_matrix(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_sign_on_the_slide() -> None:
    assert torch.equal(
        lb.binarize_sign(W_LECTURE), SLIDE_BINARY
    )  # zeros become +1, as on the slide
    assert lb.binarize_sign(torch.tensor([0.0, -0.0, -1e-30, 1e-30])).tolist() == [1, 1, -1, 1]
    assert torch.sign(torch.tensor(0.0)) == 0  # why torch.sign is not a binarizer


def test_bwn_and_twn_lecture_numbers() -> None:
    alpha = lb.bwn_alpha(W_LECTURE).item()
    assert abs(W_LECTURE.abs().sum().item() - 16.78) < 1e-4 and abs(alpha - 16.78 / 16) < 1e-6
    assert round(alpha, 2) == 1.05
    assert round(lb.squared_error(W_LECTURE, lb.binarize_sign(W_LECTURE)), 2) == 9.28
    err_bwn = lb.squared_error(W_LECTURE, lb.bwn_quantize(W_LECTURE))
    assert abs(err_bwn - 9.2452) < 1e-3  # the slide prints 9.24: truncated, 9.245 rounds to 9.25
    twn = lb.twn_quantize(W_LECTURE)
    assert round(twn.delta, 2) == 0.73 and abs(twn.scale_pos - 1.5) < 1e-6
    assert int((twn.codes != 0).sum()) == 11 and torch.equal(twn.codes, SLIDE_TERNARY)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 6))
def test_bwn_alpha_is_optimal(seed: int, rows: int, cols: int) -> None:
    W = random_matrix(seed, rows, cols).double()
    B = lb.binarize_sign(W)
    alpha = lb.bwn_alpha(W).item()
    grid = np.linspace(0, 3 * W.abs().max().item() + 0.1, 401)
    errs = [lb.squared_error(W, a * B) for a in grid]
    assert lb.squared_error(W, alpha * B) <= min(errs) + 1e-9
    per_row = lb.bwn_alpha(W, per_channel=True)
    assert torch.allclose(per_row, W.abs().mean(1))
    assert torch.allclose(lb.bwn_quantize(W, per_channel=True), per_row[:, None] * B)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(0.0, 1.5))
def test_twn_rt_is_optimal_for_its_codes(seed: int, factor: float) -> None:
    W = random_matrix(seed, 5, 7).double()
    t = lb.twn_quantize(W, factor)
    codes = t.codes.double()
    assert torch.equal(t.codes, ((W > t.delta).to(torch.int8) - (W < -t.delta).to(torch.int8)))
    if (codes != 0).any():
        grid = np.linspace(0, 4, 401)
        best = min(lb.squared_error(W, r * codes) for r in grid)
        assert lb.squared_error(W, t.W_t) <= best + 1e-9


def test_ttq_fit_reaches_the_group_means() -> None:
    d = lb.twn_delta(W_LECTURE)
    fit = lb.fit_ttq_scales(W_LECTURE, d, init=1.5, steps=300, lr=0.5)
    W = W_LECTURE
    assert (
        abs(fit.w_p - W[W > d].mean().item()) < 1e-4
        and abs(fit.w_n + W[W < -d].mean().item()) < 1e-4
    )
    ttq = lb.ttq_quantize(W, fit.w_p, fit.w_n, d)
    assert lb.squared_error(W, ttq.W_t) < lb.squared_error(W, lb.twn_quantize(W).W_t)
    assert fit.history[-1][2] < fit.history[0][2]


def test_hard_sigmoid_and_stochastic_binarization() -> None:
    r = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 5.0])
    assert torch.allclose(lb.hard_sigmoid(r), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.65, 1.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    n = 20_000
    q = lb.binarize_stochastic(r.expand(n, -1).contiguous(), generator=g)
    assert set(q.unique().tolist()) <= {-1.0, 1.0}
    p_hat = (q > 0).double().mean(0)
    p = lb.hard_sigmoid(r).double()
    assert torch.all((p_hat - p).abs() <= 4 * torch.sqrt(p * (1 - p) / n) + 1e-12)


def test_sign_ste_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5], requires_grad=True)
    y = lb.sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_ttq_gradients() -> None:
    W = torch.tensor([[0.9, -0.02, -0.6], [0.01, 0.4, -1.0]], requires_grad=True)
    w_p = torch.tensor(1.3, requires_grad=True)
    w_n = torch.tensor(0.7, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = lb._TTQFunction.apply(W, w_p, w_n, 0.05)
    assert torch.allclose(out, torch.tensor([[1.3, 0.0, -0.7], [0.0, 1.3, -0.7]]))
    (out * g).sum().backward()
    assert abs(w_p.grad.item() - (1 + 5)) < 1e-6 and abs(w_n.grad.item() + (3 + 6)) < 1e-6
    assert torch.allclose(W.grad, torch.tensor([[1.3, 2.0, 2.1], [4.0, 6.5, 4.2]]))


@pytest.mark.parametrize("mode", lb.WEIGHT_MODES)
def test_quant_linear_forward(mode: str) -> None:
    torch.manual_seed(0)
    layer = lb.QuantLinear(9, 5, mode).eval()
    x = torch.randn(4, 9)
    W = layer.weight.detach()
    with torch.no_grad():
        y = layer(x)
    expected = {
        "float": W,
        "bc": lb.binarize_sign(W),
        "sign": lb.binarize_sign(W),
        "bwn": lb.bwn_quantize(W, per_channel=True),
        "twn": lb.twn_quantize(W).W_t,
        "ttq": lb.ttq_quantize(W, layer.w_p.item(), layer.w_n.item(), lb.ttq_delta(W)).W_t
        if mode == "ttq"
        else None,
    }[mode]
    assert torch.allclose(y, F.linear(x, expected, layer.bias), atol=1e-5)
    layer.train()
    y = layer(x)
    y.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_xnor_input_scaling() -> None:
    torch.manual_seed(1)
    layer = lb.QuantLinear(6, 3, "bwn", "sign_scaled").eval()
    x = torch.randn(5, 6)
    W = layer.weight.detach()
    ref = (lb.binarize_sign(x) @ lb.binarize_sign(W).T) * W.abs().mean(1) * x.abs().mean(
        1, keepdim=True
    ) + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)


def _random_bn(model: lb.BinaryMLP) -> None:
    g = torch.Generator().manual_seed(3)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 5 + 0.1)


@pytest.mark.parametrize("name", ["BNN", "XNOR-Net"])
def test_packed_forward_is_bitwise_identical(name: str) -> None:
    torch.manual_seed(2)
    model = lb.BinaryMLP([64, 130, 70, 10], name).eval()  # widths not a multiple of 64
    _random_bn(model)
    X = torch.rand(37, 64)
    with torch.no_grad():
        ref = model(X)
    got = lb.packed_forward(model, X)
    assert torch.equal(got, ref)
    assert lb.binary_layer_shapes(model, 37) == [("fc2", 37, 70, 130), ("fc3", 37, 10, 70)]


def test_recalibrate_batchnorm() -> None:
    torch.manual_seed(4)
    model = lb.BinaryMLP([64, 16, 16, 10], "BinaryConnect")
    X = torch.rand(50, 64)
    lb.recalibrate_batchnorm(model, X)
    assert not model.training
    with torch.no_grad():
        h = model.fc1(X)  # eval mode: deterministic sign(W)
    assert torch.allclose(model.bn1.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, h.var(0, unbiased=True), rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1


def test_binary_mlp_trains() -> None:
    torch.manual_seed(0)
    X = torch.rand(64, 64)
    y = torch.randint(0, 10, (64,))
    for name in ("BNN", "TTQ"):
        model = lb.BinaryMLP([64, 32, 32, 10], name)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], name


def test_twn_sweep_and_plot() -> None:
    sweep = lb.twn_sweep(W_LECTURE, [0.0, 0.7, 1.0, 3.0])
    assert sweep["sparsity"].tolist()[0] == 2 / 16 and sweep["sparsity"][-1] == 1.0
    assert np.all(np.diff(sweep["sparsity"]) >= 0)
    import matplotlib

    matplotlib.use("Agg")
    point = lb.plot_twn_threshold(W_LECTURE, 0.7)
    assert abs(point["r_t"] - 1.5) < 1e-6


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lb.binarize_sign([1.0]), "torch.Tensor"),
        (lambda: lb.binarize_sign(torch.tensor([1, 2])), "floating-point"),
        (lambda: lb.bwn_alpha(torch.ones(3), per_channel=True), "per_channel"),
        (lambda: lb.twn_delta(W_LECTURE, factor=-1.0), "factor"),
        (lambda: lb.ternary_codes(W_LECTURE, -0.1), "delta"),
        (lambda: lb.ttq_delta(W_LECTURE, t=1.5), "t must"),
        (lambda: lb.fit_ttq_scales(W_LECTURE, 0.7, 1.0, steps=0), "steps"),
        (lambda: lb.squared_error(W_LECTURE, torch.ones(3)), "W_q"),
        (lambda: lb.twn_sweep(W_LECTURE, []), "factors"),
        (lambda: lb.plot_twn_threshold(W_LECTURE, 5.0), "factor"),
        (lambda: lb.QuantLinear(3, 2, "binary"), "weight_mode"),
        (lambda: lb.QuantLinear(3, 2, "sign", "relu"), "input_mode"),
        (lambda: lb.BinaryMLP([64, 10], "BNN"), "sizes"),
        (lambda: lb.BinaryMLP([64, 8, 8, 10], "ternary"), "method"),
        (
            lambda: lb.packed_forward(
                lb.BinaryMLP([64, 8, 8, 10], "BWN").eval(), torch.rand(2, 64)
            ),
            "binary weights and activations",
        ),
        (
            lambda: lb.packed_forward(lb.BinaryMLP([64, 8, 8, 10], "BNN"), torch.rand(2, 64)),
            "eval mode",
        ),
        (lambda: lb.binary_layer_shapes(lb.BinaryMLP([64, 8, 8, 10], "BNN"), 0), "batch"),
        (lambda: lb.recalibrate_batchnorm(torch.nn.Linear(2, 2), torch.rand(3, 2)), "BatchNorm"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
