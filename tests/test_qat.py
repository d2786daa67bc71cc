"""Tests for lecturelib.qat: estimators, fake-quant layers, BN folding, LSQ, oscillations, PTQ vs QAT,
and conversion to integer-only layers. References: PyTorch's fake-quant kernels, the LSQ paper's
pseudo-code, finite differences, eval-mode BatchNorm, brute force."""

from functools import cache

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lecturelib import qat as Q
from lecturelib.harness import set_threads
from lecturelib.models import MLP, TrainConfig, load_digits_split, train_classifier
from lecturelib.quantizers import choose_qparams, fake_quantize, qparams_with_range

set_threads(1)  # the models are tiny: one thread is fastest and deterministic

QAT_BEATS_PTQ_SEEDS = (0, 1, 2)
MARGIN_2BIT_MEAN = 0.10
"""At 2 bits QAT must beat PTQ for every seed and scheme, by at least 10 points of test accuracy on average."""
MARGIN_3BIT_MEAN = 0.005
"""At 3 bits QAT must beat PTQ for every seed and scheme, by at least 0.5 points on average."""


@cache
def _digits():
    return load_digits_split(seed=0)


@cache
def _float_model(seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP([64, 64, 10])
    d = _digits()
    train_classifier(model, d.X_train, d.y_train, TrainConfig(epochs=30, lr=3e-3, seed=seed))
    return model


# ----------------------------------------------------------------------------- estimators
@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), lo=st.floats(-3, -0.1), hi=st.floats(0.1, 3))
def test_estimators_share_the_forward_and_differ_in_backward(seed, n, lo, hi):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(64, generator=g) * 2
    qp = qparams_with_range(x0, lo, hi, n)
    up = torch.randn(64, generator=g)
    grads = {}
    for est in Q.ESTIMATORS:
        x = x0.clone().requires_grad_(True)
        y = Q.qat_fake_quantize(x, qp, est)
        assert torch.equal(y.detach(), fake_quantize(x0, qp))
        (y * up).sum().backward()
        grads[est] = x.grad
    # trusted reference for the clipped STE: PyTorch's own fake-quant backward
    x = x0.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(x, qp.scale.reshape(()), qp.zero_point.reshape(()), qp.qmin, qp.qmax)
    (ref * up).sum().backward()
    assert torch.equal(grads["clipped_ste"], x.grad)
    assert torch.count_nonzero(grads["round"]) == 0
    assert torch.equal(grads["ste"], up)


def test_round_estimator_learns_nothing_and_ste_learns():
    d = _digits()
    torch.manual_seed(0)
    model = MLP([64, 16, 10])
    cfg = TrainConfig(epochs=1, lr=1e-2, seed=0)
    stuck = Q.qat(model, d, Q.QuantScheme(4, estimator="round"), cfg)
    moved = Q.qat(model, d, Q.QuantScheme(4, estimator="ste"), cfg)
    assert torch.equal(stuck.model[0].weight, model[0].weight)
    assert torch.equal(stuck.model[2].weight, model[2].weight)
    assert not torch.equal(moved.model[0].weight, model[0].weight)
    assert moved.accuracy > stuck.accuracy + 0.3


def test_quant_linear_forward_is_fake_quant_input_times_fake_quant_weight():
    torch.manual_seed(1)
    lin = nn.Linear(8, 5)
    X = torch.rand(32, 8)
    for weights in Q.WEIGHT_SCHEMES:
        layer = Q.QuantMLP(Q.QuantLinear(lin, Q.QuantScheme(3, weights))).calibrate(X)[0]
        qp_x = qparams_with_range(X, float(X.min()), float(X.max()), 3, symmetric=False, signed=False)
        qp_w = Q.weight_qparams(lin.weight.detach(), 3, weights)
        ref = fake_quantize(X, qp_x) @ fake_quantize(lin.weight.detach(), qp_w).T + lin.bias.detach()
        assert torch.allclose(layer(X), ref, atol=1e-6)
    qp = Q.weight_qparams(lin.weight.detach(), 4, "per_channel_sym")
    assert torch.equal(qp.zero_point, torch.zeros_like(qp.zero_point)) and qp.scale.shape == (5, 1)


def test_activation_ema_follows_the_lecture_formula():
    act = Q.ActQuant(8, ema_alpha=0.25)
    act.r_min.fill_(-1.0)
    act.r_max.fill_(1.0)
    act.train()
    act(torch.tensor([[-3.0, 5.0]]))
    assert act.r_min.item() == pytest.approx(0.25 * -3.0 + 0.75 * -1.0)
    assert act.r_max.item() == pytest.approx(0.25 * 5.0 + 0.75 * 1.0)
    with pytest.raises(ValueError, match="calibrate"):
        Q.ActQuant(4).eval()(torch.ones(2, 2))


# ----------------------------------------------------------------------------- BatchNorm folding
def _random_bn(n: int, g: torch.Generator) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=g))
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.01)
    return bn.eval()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n_in=st.integers(1, 12), n_out=st.integers(1, 12))
def test_fold_batchnorm_equals_eval_mode_batchnorm(seed, n_in, n_out):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin, bn = nn.Linear(n_in, n_out), _random_bn(n_out, g)
    x = torch.randn(20, n_in, generator=g)
    with torch.no_grad():
        assert torch.allclose(Q.fold_batchnorm(lin, bn)(x), bn(lin(x)), atol=1e-5, rtol=1e-5)


def test_fold_mlp_and_folded_qat_layer_match_the_bn_model():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Q.MLPBN([6, 5, 4, 3]).eval()
    with torch.no_grad():
        for i in (1, 4):
            model[i].load_state_dict(_random_bn(model[i].num_features, g).state_dict())
    x = torch.rand(10, 6, generator=g)
    with torch.no_grad():
        assert torch.allclose(Q.fold_mlp(model)(x), model(x), atol=1e-5)
        for fold in (True, False):
            layer = Q.QuantLinear(model[0], Q.QuantScheme(8, fold_bn=fold), model[1])
            W, b = layer.folded()
            assert torch.allclose(x @ W.T + b, model[1](model[0](x)), atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8))
def test_per_channel_symmetric_codes_do_not_change_when_bn_is_folded(seed, n):
    # Folding scales row o by k_o = gamma_o / sigma_o; a symmetric per-channel scale scales with |k_o|,
    # so the integer codes only change sign with k_o (up to float rounding at exact ties).
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 9, generator=g)
    k = torch.rand(6, generator=g) * 4 + 0.1
    q1 = torch.round(W / Q.weight_qparams(W, n, "per_channel_sym").scale)
    q2 = torch.round(W * k[:, None] / Q.weight_qparams(W * k[:, None], n, "per_channel_sym").scale)
    assert (q1 != q2).float().mean() <= 0.02


# ----------------------------------------------------------------------------- LSQ
def _lsq_reference(v, s, qmin, qmax, g):
    """Esser et al. 2020, appendix pseudo-code: gradscale and roundpass with autograd."""
    s_g = (s - s * g).detach() + s * g
    u = torch.clamp(v / s_g, qmin, qmax)
    return ((u.round() - u).detach() + u) * s_g


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), signed=st.booleans(), s=st.floats(0.05, 2.0))
def test_lsq_gradient_matches_the_papers_pseudo_code(seed, bits, signed, s):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v0 = torch.randn(50, generator=gen, dtype=torch.float64) * s * qmax / 2
    up = torch.randn(50, generator=gen, dtype=torch.float64)
    g = Q.lsq_grad_scale(50, qmax)
    out = []
    for fn in (Q.lsq_fake_quantize, _lsq_reference):
        v, st_ = v0.clone().requires_grad_(True), torch.tensor([s], dtype=torch.float64, requires_grad=True)
        y = fn(v, st_, qmin, qmax, g)
        (y * up).sum().backward()
        out.append((y.detach(), v.grad, st_.grad))
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 6), saturated=st.booleans())
def test_lsq_step_gradient_against_finite_differences(seed, bits, saturated):
    # Where v_hat(s) is differentiable (no v / s on a rounding threshold within +-h):
    #   saturated values: v_hat = q_max s (or q_min s), LSQ's gradient is the exact derivative;
    #   inside the range:  the exact derivative is round(v / s), LSQ's is round(v / s) - v / s;
    #   the difference -v / s is the STE's term, and dL/ds carries the factor g.
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s, h = 0.3, 1e-6
    if saturated:
        v = (torch.rand(40, generator=gen, dtype=torch.float64) + 1.5) * s * 2 ** (bits - 1)  # |v / s| > 1.5 |q_min|
        v = v * torch.where(torch.rand(40, generator=gen) < 0.5, -1.0, 1.0).double()
    else:
        v = (torch.rand(40, generator=gen, dtype=torch.float64) * 2 - 1) * s * qmax * 0.95
    assume(torch.equal(torch.round(v / (s + h)), torch.round(v / (s - h))))
    up = torch.randn(40, generator=gen, dtype=torch.float64)
    g = Q.lsq_grad_scale(40, qmax)

    def loss(step: float) -> float:
        return float((Q.lsq_fake_quantize(v, torch.tensor([step], dtype=torch.float64), qmin, qmax, g) * up).sum())

    fd = (loss(s + h) - loss(s - h)) / (2 * h)
    s_t = torch.tensor([s], dtype=torch.float64, requires_grad=True)
    (Q.lsq_fake_quantize(v, s_t, qmin, qmax, g) * up).sum().backward()
    lsq = s_t.grad.item() / g
    ste_term = 0.0 if saturated else float((up * -v / s).sum())
    assert lsq == pytest.approx(fd + ste_term, rel=1e-6, abs=1e-6)


def test_lsq_grad_scale_and_init():
    assert Q.lsq_grad_scale(64 * 64, 7) == pytest.approx(1 / (64 * 64 * 7) ** 0.5)
    q = Q.LSQQuantizer(4, signed=True)
    v = torch.tensor([1.0, -2.0, 3.0, -6.0])
    q(v, v.numel())
    assert q.step.item() == pytest.approx(2 * 3.0 / 7**0.5)  # s = 2 mean|v| / sqrt(q_max)


def test_oscillation_tracker_counts_flips_and_flip_backs():
    lin = nn.Linear(2, 1, bias=True)
    layer = Q.LSQLinear(lin, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.4, 2.0]]))
        layer.w_quant.step.fill_(1.0)
    layer.w_quant.initialized.fill_(True)
    tr = Q.OscillationTracker([layer])
    for w0 in (0.6, 0.4, 0.6, 0.7):  # codes 0 -> 1 -> 0 -> 1 -> 1: three flips, two of them flip-backs
        with torch.no_grad():
            layer.weight[0, 0] = w0
        tr.update()
    assert tr.flip_fraction == [0.5, 0.5, 0.5, 0.0]
    assert tr.oscillation_fraction == [0.0, 0.5, 0.5, 0.0]
    assert tr.oscillations.tolist() == [2, 0]
    assert tr.most_oscillating_latent().tolist() == pytest.approx([0.4, 0.6, 0.4, 0.6, 0.7])


# ----------------------------------------------------------------------------- PTQ vs QAT
def test_qat_beats_ptq_at_2_and_3_bits_across_seeds():
    d = _digits()
    gains = {2: [], 3: []}
    for seed in QAT_BEATS_PTQ_SEEDS:
        model = _float_model(seed)
        for bits in (2, 3):
            for weights in Q.TABLE_SCHEMES:
                scheme = Q.QuantScheme(bits, weights)
                p = Q.ptq(model, d, scheme).accuracy
                q = Q.qat(model, d, scheme, TrainConfig(epochs=3, lr=1e-3, seed=seed)).accuracy
                gains[bits].append(q - p)
    for bits, margin in ((2, MARGIN_2BIT_MEAN), (3, MARGIN_3BIT_MEAN)):
        assert min(gains[bits]) > 0 and sum(gains[bits]) / len(gains[bits]) >= margin, gains


def test_ptq_vs_qat_rows_have_the_issue_keys():
    rows = Q.ptq_vs_qat(_float_model(0), _digits(), bits=(4,), cfg=TrainConfig(epochs=0))
    assert [tuple(r) for r in rows] == [("method", "granularity", "bits", "accuracy")] * 4
    assert {(r["method"], r["granularity"]) for r in rows} == {(m, g) for m in ("PTQ", "QAT") for g in Q.TABLE_SCHEMES}


# ----------------------------------------------------------------------------- convert
@pytest.mark.parametrize("bits", [8, 4])
def test_converted_model_matches_fake_quant_forward_within_one_step(bits):
    d = _digits()
    res = Q.qat(_float_model(0), d, Q.QuantScheme(bits, "per_channel_sym"), TrainConfig(epochs=1, lr=1e-3))
    int_model = Q.convert(res.model)
    X = d.X_test
    fq_codes, int_codes = Q.fake_quant_codes(res.model, X), int_model.hidden_codes(X)
    assert torch.equal(fq_codes[0], int_codes[0])  # the input is quantized the same way
    assert (fq_codes[1] - int_codes[1]).abs().max() <= 1  # hidden codes: within one step
    # logits: the last layer is exact in integers, so they differ only through hidden codes that are
    # one step S_h off: |d logit_o| <= S_h sum_k |W_fq[o, k]|.
    last = res.model.quant_layers()[-1]
    S_h = last.act.qparams(X).scale.item()
    with torch.no_grad():
        bound = S_h * last.quantized_weight()[0].abs().sum(1)
        diff = (res.model(X) - int_model(X)).abs()
    assert bool((diff <= bound + 1e-4).all())
    assert (res.model(X).argmax(1) == int_model(X).argmax(1)).float().mean() >= 0.99


def test_convert_needs_per_channel_symmetric_weights():
    res = Q.ptq(_float_model(0), _digits(), Q.QuantScheme(8, "per_tensor_asym"))
    with pytest.raises(ValueError, match="per_channel_sym"):
        Q.convert(res.model)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"num_bits": 1}, "num_bits"), ({"num_bits": 9}, "num_bits"), ({"weights": "per_row"}, "weights"),
    ({"estimator": "identity"}, "estimator"), ({"ema_alpha": 1.5}, "ema_alpha"), ({"fold_bn": 1}, "fold_bn"),
])
def test_quant_scheme_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.QuantScheme(**kwargs)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    x = torch.randn(4)
    qp = choose_qparams(x, 4)
    with pytest.raises(ValueError, match="estimator"):
        Q.qat_fake_quantize(x, qp, "straight")
    with pytest.raises(ValueError, match="weights"):
        Q.weight_qparams(torch.randn(3, 3), 4, "per_group")
    with pytest.raises(ValueError, match="num_elements"):
        Q.lsq_grad_scale(0, 7)
    with pytest.raises(ValueError, match="qmax"):
        Q.lsq_grad_scale(10, 0)
    with pytest.raises(ValueError, match="s must be"):
        Q.lsq_fake_quantize(x, torch.tensor([-1.0]), -8, 7)
    with pytest.raises(ValueError, match="qmin, qmax"):
        Q.lsq_fake_quantize(x, torch.tensor([1.0]), 3, 7)
    with pytest.raises(ValueError, match="model"):
        Q.prepare(nn.Conv2d(1, 1, 3), Q.QuantScheme(), torch.rand(2, 3))
    with pytest.raises(ValueError, match="scheme"):
        Q.prepare(MLP([4, 2]), "per_channel_sym", torch.rand(2, 4))
    with pytest.raises(ValueError, match="bn"):
        Q.fold_batchnorm(nn.Linear(3, 4), nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="data"):
        Q.ptq(MLP([4, 2]), (torch.rand(2, 4), torch.zeros(2)), Q.QuantScheme())
    with pytest.raises(ValueError, match="sizes"):
        Q.MLPBN([64, 10])
    with pytest.raises(ValueError, match="r_min"):
        Q.plot_ste_mask(x, 4, 1.0, -1.0)
