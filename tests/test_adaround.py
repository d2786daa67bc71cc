"""Tests for lecturelib.adaround: rounding modes, AdaRound's loss terms and driver, against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lecturelib as ll
from lecturelib import adaround as ar

SETTINGS = settings(deadline=None, derandomize=True, max_examples=25)


def _correlated_inputs(n: int, d: int, seed: int, rho: float = 0.8) -> torch.Tensor:
    """n samples of d inputs that share a common factor: corr(x_i, x_j) = rho."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g)
    return math.sqrt(rho) * z + math.sqrt(1 - rho) * torch.randn(n, d, generator=g)


def _linear(out_f: int, in_f: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


# ----------------------------------------------------------------------------- rounding modes
@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), out_f=st.integers(1, 6), in_f=st.integers(1, 9))
def test_round_weight_modes_against_elementwise_reference(seed, bits, out_f, in_f):
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    qp = ar.weight_qparams(W, bits)
    S = qp.scale.reshape(-1, 1)
    x = W * (1.0 / S)
    assert torch.equal(ar.round_weight(W, qp, "nearest"), ll.fake_quantize(W, qp))
    assert torch.equal(ar.round_weight(W, qp, "floor"), torch.clamp(torch.floor(x), qp.qmin, qp.qmax) * S)
    assert torch.equal(ar.round_weight(W, qp, "ceil"), torch.clamp(torch.ceil(x), qp.qmin, qp.qmax) * S)
    sto = ar.round_weight(W, qp, "stochastic", torch.Generator().manual_seed(seed))
    lo, hi = ar.round_weight(W, qp, "floor"), ar.round_weight(W, qp, "ceil")
    assert bool(((sto == lo) | (sto == hi)).all())


def test_stochastic_rounding_is_unbiased():
    W = torch.tensor([[0.1, -0.37, 0.55, 0.9, -0.9]])
    qp = ar.weight_qparams(W, 3)
    W_rep = W.repeat(20_000, 1)  # 20,000 identical channels with the same scale: 20,000 samples at once
    qp_rep = ar.weight_qparams(W_rep, 3)
    assert torch.equal(qp_rep.scale, qp.scale.expand(20_000, 1))
    mean = ar.round_weight(W_rep, qp_rep, "stochastic", torch.Generator().manual_seed(0)).mean(0)
    step = qp.scale.item()
    assert torch.allclose(mean, W, atol=0.02 * step), (mean, W)  # sampling error ~ step / 2 / sqrt(20000)


def test_round_weight_rejects_bad_mode():
    W = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        ar.round_weight(W, ar.weight_qparams(W, 4), "banker")
    with pytest.raises(ValueError, match="shape"):
        ar.round_weight(torch.randn(2, 4), ar.weight_qparams(W, 4), "floor")


# ----------------------------------------------------------------------------- scales
def test_weight_qparams_max_is_choose_qparams_per_channel():
    W = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    a = ar.weight_qparams(W, 3, "max")
    b = ll.choose_qparams(W, 3, symmetric=True, granularity=ll.PerChannel(0))
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@SETTINGS
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 5))
def test_weight_qparams_mse_matches_a_loop_and_beats_max(seed, bits):
    W = torch.randn(4, 12, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
    grid = 20
    qp = ar.weight_qparams(W, bits, "mse", grid=grid)
    qp_max = ar.weight_qparams(W, bits, "max")
    for c in range(W.shape[0]):  # brute force, one channel at a time, with the public quantizer
        w = W[c: c + 1]
        amax = w.abs().max()
        errs = []
        for i in range(1, grid + 1):
            q = ll.qparams_with_range(w, -amax * i / grid, amax * i / grid, bits, symmetric=True)
            errs.append(float(((w - ll.fake_quantize(w, q)) ** 2).sum()))
        best = min(errs)
        got = float(((w - ll.fake_quantize(W, qp)[c: c + 1]) ** 2).sum())
        assert got == pytest.approx(best, rel=1e-5, abs=1e-9)
    assert float(((W - ll.fake_quantize(W, qp)) ** 2).sum()) <= float(((W - ll.fake_quantize(W, qp_max)) ** 2).sum())


def test_weight_qparams_rejects_bad_input():
    W = torch.randn(3, 4)
    with pytest.raises(ValueError, match="num_bits"):
        ar.weight_qparams(W, 1)
    with pytest.raises(ValueError, match="scale_method"):
        ar.weight_qparams(W, 4, "kl")
    with pytest.raises(ValueError, match="grid"):
        ar.weight_qparams(W, 4, "mse", grid=0)


# ----------------------------------------------------------------------------- loss terms
def test_rectified_sigmoid_values_and_inverse():
    V = torch.tensor([-100.0, 0.0, 100.0])
    assert ar.rectified_sigmoid(V).tolist() == [0.0, 0.5, 1.0]
    h = torch.linspace(0, 0.999, 50)
    assert torch.allclose(ar.rectified_sigmoid(ar.inverse_rectified_sigmoid(h)), h, atol=1e-5)
    # stretched beyond [0, 1] and clipped: it reaches 0 and 1 at finite V
    assert ar.rectified_sigmoid(torch.tensor([-2.5, 2.5])).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="zeta"):
        ar.rectified_sigmoid(V, zeta=0.9)
    with pytest.raises(ValueError, match="h must lie"):
        ar.inverse_rectified_sigmoid(torch.tensor([1.5]))


@SETTINGS
@given(h=st.lists(st.floats(0, 1), min_size=1, max_size=20), beta=st.floats(0.5, 30))
def test_round_reg_against_formula(h, beta):
    t = torch.tensor(h, dtype=torch.float64)
    ref = sum(1 - abs(2 * v - 1) ** beta for v in h)
    assert float(ar.round_reg(t, beta)) == pytest.approx(ref, abs=1e-9)
    # it only vanishes on binary h, and is largest (1 per entry) at h = 1/2
    assert float(ar.round_reg(torch.tensor([0.0, 1.0]), beta)) == 0.0
    assert float(ar.round_reg(torch.full((3,), 0.5), beta)) == 3.0


def test_round_reg_rejects_bad_beta():
    for b in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            ar.round_reg(torch.rand(3), b)


def test_beta_schedule():
    cfg = ar.AdaRoundConfig(iters=100, warm_start=0.2)
    assert all(ar.beta_schedule(s, cfg) is None for s in range(20))
    betas = [ar.beta_schedule(s, cfg) for s in range(20, 101)]
    assert betas[0] == pytest.approx(20.0) and betas[-1] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    with pytest.raises(ValueError, match="step"):
        ar.beta_schedule(101, cfg)


def test_gradients_flow_through_h():
    W = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    qp = ar.weight_qparams(W, 4)
    V = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 1.0, 3.0]] * 4, requires_grad=True)
    Wt = ar.soft_weight(W, qp, V)
    Wt.sum().backward()
    s = torch.sigmoid(V.detach())
    inside = (s * 1.2 - 0.1 > 0) & (s * 1.2 - 0.1 < 1)
    codes_free = (torch.floor(W * (1 / qp.scale)) + ar.rectified_sigmoid(V.detach())).le(qp.qmax) & (
        torch.floor(W * (1 / qp.scale)) + ar.rectified_sigmoid(V.detach())).ge(qp.qmin)
    expect = torch.where(inside & codes_free, qp.expand(qp.scale) * 1.2 * s * (1 - s), torch.zeros(()))
    assert torch.allclose(V.grad, expect, atol=1e-6)
    assert bool((V.grad[:, 1:5] != 0).any())  # inside the stretch the gradient is not zero
    assert bool((V.grad[:, [0, 5]] == 0).all())  # beyond it, h is clipped: zero gradient


def test_soft_weight_with_binary_h_is_a_rounding():
    W = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    qp = ar.weight_qparams(W, 3)
    assert torch.allclose(ar.soft_weight(W, qp, torch.full_like(W, -50.0)), ar.round_weight(W, qp, "floor"))
    up = ar.soft_weight(W, qp, torch.full_like(W, 50.0))  # floor + 1: ceil, except where W / S is an integer
    x = W * (1 / qp.scale)
    on_grid = x == torch.round(x)
    assert bool(on_grid.any())  # the largest |w| of each channel sits on the grid (max scaling)
    assert torch.allclose(up[~on_grid], ar.round_weight(W, qp, "ceil")[~on_grid])
    assert torch.allclose(up[on_grid], (torch.clamp(x + 1, qp.qmin, qp.qmax) * qp.scale)[on_grid])
    with pytest.raises(ValueError, match="V must have"):
        ar.soft_weight(W, qp, torch.zeros(2, 2))


# ----------------------------------------------------------------------------- reconstruction loss
@pytest.mark.parametrize("layer", [
    nn.Linear(7, 3),
    nn.Conv2d(2, 3, 3, padding=1),
    nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False),
])
def test_moment_loss_equals_direct_loss(layer):
    torch.manual_seed(0)
    shape = (40, 7) if isinstance(layer, nn.Linear) else (40, layer.in_channels, 7, 8)
    x_f = torch.randn(shape)
    x_q = x_f + 0.1 * torch.randn(shape)  # input of the partly quantized network
    W_t = layer.weight.detach() + 0.05 * torch.randn_like(layer.weight)
    for xf in (None, x_f):
        m = ar.recon_moments(layer, x_q, xf)
        fast = float(ar.recon_loss(W_t, layer.weight.detach(), m))
        slow = float(ar.recon_loss_direct(layer, W_t, x_q, xf))
        assert fast == pytest.approx(slow, rel=1e-4)
    # the target energy is E||W x||^2
    with torch.no_grad():
        y = layer(x_f) - (layer.bias.view(1, -1, *[1] * (x_f.ndim - 2)) if layer.bias is not None else 0)
    assert ar.recon_moments(layer, x_q, x_f).target_energy == pytest.approx(float((y**2).sum()) / 40, rel=1e-4)


def test_recon_rejects_bad_layers_and_shapes():
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ar.recon_moments(nn.Conv1d(2, 2, 3), torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="groups=1"):
        ar.recon_moments(nn.Conv2d(2, 2, 3, groups=2), torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        ar.recon_moments(nn.Linear(3, 2), torch.randn(4, 5))
    with pytest.raises(ValueError, match="x_float"):
        ar.recon_moments(nn.Linear(3, 2), torch.randn(4, 3), torch.randn(5, 3))
    m = ar.recon_moments(nn.Linear(3, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="W_tilde"):
        ar.recon_loss(torch.zeros(2, 4), torch.zeros(2, 3), m)


# ----------------------------------------------------------------------------- the driver
def test_adaround_ends_binary_and_beats_nearest_on_correlated_inputs():
    layer = _linear(8, 16, seed=3)
    x = _correlated_inputs(256, 16, seed=3)
    for bits in (2, 3, 4):
        res = ar.adaround_layer(layer, x, ar.AdaRoundConfig(num_bits=bits, iters=500))
        near_or_far = torch.minimum(res.h, 1 - res.h)
        assert float(near_or_far.max()) <= 1e-3, float(near_or_far.max())
        assert res.loss_adaround <= res.loss_nearest
        # the returned weight is an ordinary fake-quantized weight on the same grid
        codes = res.W_q / res.qp.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert res.loss_adaround == pytest.approx(float(ar.recon_loss_direct(layer, res.W_q, x)), rel=1e-3)


def test_adaround_against_brute_force_on_tiny_layers():
    """AdaRound is a relaxation, not an exact solver: on 1 x 10 layers (1,024 roundings each) it
    should find the optimum most of the time and never land far down the ranking."""
    ranks, nearest_ranks = [], []
    for seed in range(8):
        layer = _linear(1, 10, seed=seed)
        x = _correlated_inputs(200, 10, seed=seed)
        W = layer.weight.detach()
        qp = ar.weight_qparams(W, 3)
        m = ar.recon_moments(layer, x)
        up, losses = ar.all_roundings(W, qp, m)
        assert up.shape == (1024, 10) and losses.shape == (1024,)
        nearest = float(ar.recon_loss(ll.fake_quantize(W, qp), W, m))
        assert min(abs(float(v) - nearest) for v in losses) <= 1e-5 * nearest  # nearest is one of the 2^n
        for i in (0, 1, 517, 1023):  # spot-check the vectorised enumeration against recon_loss itself
            codes = torch.floor(W * (1 / qp.scale)) + up[i].float().reshape(W.shape)
            W_i = torch.clamp(codes, qp.qmin, qp.qmax) * qp.scale
            assert float(losses[i]) == pytest.approx(float(ar.recon_loss(W_i, W, m)), rel=1e-4, abs=1e-7)
        res = ar.adaround_layer(layer, x, ar.AdaRoundConfig(num_bits=3, iters=800), qp=qp)
        ranks.append(int((losses < res.loss_adaround * (1 - 1e-5)).sum()))
        nearest_ranks.append(int((losses < nearest * (1 - 1e-5)).sum()))
    assert max(nearest_ranks) > 0  # nearest is not always optimal
    assert sum(r == 0 for r in ranks) >= 6, ranks
    assert max(ranks) < 0.05 * 1024, ranks
    with pytest.raises(ValueError, match="max_weights"):
        ar.all_roundings(torch.zeros(1, 21), ar.weight_qparams(torch.ones(1, 21), 3), m)


def test_adaround_does_not_modify_the_layer_and_is_deterministic():
    layer = _linear(4, 6, seed=0)
    before = layer.weight.detach().clone()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    cfg = ar.AdaRoundConfig(num_bits=2, iters=60, snapshot_iters=(0, 30), record_every=10)
    a, b = ar.adaround_layer(layer, x, cfg), ar.adaround_layer(layer, x, cfg)
    assert torch.equal(layer.weight, before)
    assert torch.equal(a.W_q, b.W_q) and a.history == b.history
    assert sorted(a.h_snapshots) == [0, 30, 60] and len(a.history) == 6
    # step 0: V was initialised so that the soft weight is W itself (up to clamping)
    x0 = before * (1 / a.qp.scale)
    assert torch.allclose(a.h_snapshots[0], x0 - torch.floor(x0), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_start=2.0, beta_end=20.0), "beta_start must be >= beta_end"),
    (dict(lam=-0.1), "lam"),
    (dict(num_bits=1), "num_bits"),
    (dict(num_bits=9), "num_bits"),
    (dict(iters=0), "iters"),
    (dict(lr=0.0), "lr"),
    (dict(warm_start=1.0), "warm_start"),
    (dict(scale_method="minmax"), "scale_method"),
    (dict(zeta=1.0), "zeta"),
    (dict(snapshot_iters=(5000,)), "snapshot_iters"),
    (dict(record_every=-1), "record_every"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ar.AdaRoundConfig(**kwargs)


def test_adaround_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cfg must be"):
        ar.adaround_layer(nn.Linear(3, 2), torch.randn(4, 3), {"num_bits": 4})
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ar.adaround_layer(nn.ReLU(), torch.randn(4, 3), ar.AdaRoundConfig())


# ----------------------------------------------------------------------------- whole networks
def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def test_quantize_weights_methods():
    net = _tiny_net()
    x = torch.randn(64, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    cfg = ar.AdaRoundConfig(num_bits=2, iters=80)
    out = {m: ar.quantize_weights(net, x, m, cfg, k=5) for m in ar.METHODS}
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))  # the input is untouched
    near = out["nearest"]
    assert near.layer_names == ["0", "3"]
    for name, idx in (("0", 0), ("3", 3)):
        W = net[idx].weight.detach()
        assert torch.equal(near.model[idx].weight, ll.fake_quantize(W, ar.weight_qparams(W, 2)))
    # the first layer sees the same (float) input for every method, so its error orders as the losses do
    assert out["adaround"].calib_rel_error[0] <= near.calib_rel_error[0]
    assert out["best_of_k"].results == [None, None] and out["adaround"].results[0] is not None
    errs = ar.layer_output_errors(net, net, x)
    assert errs == [0.0, 0.0]
    assert len(ar.layer_output_errors(net, near.model, x)) == 2
    x_q, x_f = ar.layer_inputs(net, near.model, x, "3")
    assert x_q.shape == (64, 100) and not torch.equal(x_q, x_f)
    with pytest.raises(ValueError, match="method must be one of"):
        ar.quantize_weights(net, x, "gptq", cfg)
    with pytest.raises(ValueError, match="name must be one of"):
        ar.layer_inputs(net, near.model, x, "fc9")


def test_digits_cnn_shape():
    net = ar.digits_cnn()
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert 35_000 < sum(p.numel() for p in net.parameters()) < 40_000


def test_public_functions_reject_bad_input():
    layer = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="V must be"):
        ar.rectified_sigmoid([0.0, 1.0])
    with pytest.raises(ValueError, match="h must be"):
        ar.round_reg([0.5], 2.0)
    with pytest.raises(ValueError, match="cfg must be"):
        ar.beta_schedule(0, None)
    with pytest.raises(ValueError, match="W_tilde"):
        ar.recon_loss_direct(layer, torch.zeros(3, 3), x)
    with pytest.raises(ValueError, match="max_weights"):
        ar.all_roundings(layer.weight.detach(), ar.weight_qparams(layer.weight.detach(), 3),
                         ar.recon_moments(layer, x), max_weights=0)
    net = _tiny_net()
    with pytest.raises(ValueError, match="same layers"):
        ar.layer_output_errors(net, nn.Sequential(nn.ReLU()), torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="must be nn.Sequential"):
        ar.layer_inputs(layer, layer, x, "0")
    with pytest.raises(ValueError, match="iters"):
        ar.adaround_explorer(layer, x, ar.AdaRoundConfig(), iters=0)
    with pytest.raises(ValueError, match="k must be"):
        ar.quantize_weights(net, torch.randn(2, 1, 5, 5), "best_of_k", ar.AdaRoundConfig(), k=0)
    with pytest.raises(ValueError, match="x_calib"):
        ar.quantize_weights(net, torch.full((2, 1, 5, 5), float("nan")), "nearest", ar.AdaRoundConfig())


def test_layer_output_norm_ratios():
    net = _tiny_net()
    x = torch.randn(8, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    assert ar.layer_output_norm_ratios(net, net, x) == [1.0, 1.0]
    half = _tiny_net()  # the same weights (same seed)
    with torch.no_grad():
        for p in half.parameters():
            p.mul_(0.5)  # weights and biases halved: every layer's output halves, and the next halves again
    assert ar.layer_output_norm_ratios(net, half, x)[0] == pytest.approx(0.5, rel=1e-5)
