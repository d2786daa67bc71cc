"""Tests for lecturelib.clipping: closed forms, numerical integration, brute force and PyTorch."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import integrate, special
from torch.ao.quantization.observer import HistogramObserver, MovingAverageMinMaxObserver

from lecturelib import clipping as C
from lecturelib.models import MLP

HSET = settings(
    max_examples=25, deadline=None, derandomize=True
)  # torch's observer is slow on tiny data
BANNER_GAUSS_ALPHA = {2: 1.71, 3: 2.15, 4: 2.55}  # Banner et al. 2019, sec. 3 (Gaussian prior)


def laplace(n, seed=0):
    return C.sample_prior("laplace", n, seed, stratified=False).float()


# ----------------------------------------------------------------------------- ACIQ
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_laplace_matches_lecture(bits):
    assert C.aciq_alpha(bits, "laplace") == pytest.approx(C.LECTURE_LAPLACE_ALPHA[bits], abs=0.01)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_aciq_laplace_solves_stationarity(bits):
    # d/da [2 e^-a + a^2 / (3 4^M)] = 0  <=>  a e^a = 3 * 4^M  <=>  a = W(3 * 4^M)
    assert C.aciq_alpha(bits, "laplace") == pytest.approx(
        special.lambertw(3 * 4.0**bits).real, abs=1e-6
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_gauss_matches_banner(bits):
    assert C.aciq_alpha(bits, "gauss") == pytest.approx(BANNER_GAUSS_ALPHA[bits], abs=0.01)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_aciq_alpha_is_the_minimum_on_a_dense_grid(bits, prior):
    a = np.linspace(0.2, 15, 200_001)
    clip, rnd = C.aciq_expected_mse(a, bits, prior)
    assert C.aciq_alpha(bits, prior) == pytest.approx(a[np.argmin(clip + rnd)], abs=1e-4)


def test_one_sided_model_is_one_more_bit():
    # [0, a] with 2^M intervals has the step of [-a, a] with 2^(M+1) intervals
    assert C.rounding_noise_coef(3, "paper", one_sided=True) == pytest.approx(
        C.rounding_noise_coef(4, "paper")
    )
    assert C.aciq_alpha(3, one_sided=True) == pytest.approx(C.aciq_alpha(4), abs=1e-6)
    assert C.rounding_noise_coef(2, "affine") == pytest.approx(4 / (12 * 9))


@pytest.mark.parametrize(
    "prior, pdf",
    [
        ("laplace", lambda t: 0.5 * math.exp(-abs(t))),
        ("gauss", lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)),
    ],
)
@pytest.mark.parametrize("a", [0.5, 1.7, 4.0])
def test_clipping_error_against_quadrature(prior, pdf, a):
    val, _ = integrate.quad(lambda t: 2 * (t - a) ** 2 * pdf(t), a, np.inf)
    assert float(C.clipping_error(a, prior)) == pytest.approx(val, rel=1e-8)


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
def test_expected_mse_of_levels_against_quadrature(prior):
    pdf = (
        (lambda t: 0.5 * math.exp(-abs(t)))
        if prior == "laplace"
        else (lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi))
    )
    levels = torch.tensor([-1.3, -0.2, 0.4, 2.0], dtype=torch.float64)
    q = lambda t: float(C.quantize_to_levels(torch.tensor([t]), levels)[0])
    pts = [
        -np.inf,
        -1.3,
        -0.75,
        -0.2,
        0.1,
        0.4,
        1.2,
        2.0,
        np.inf,
    ]  # levels and the midpoints between them
    total = sum(
        integrate.quad(lambda t: (t - q(t)) ** 2 * pdf(t), lo, hi)[0]
        for lo, hi in zip(pts[:-1], pts[1:])
    )
    clip, rnd = C.expected_mse_of_levels(levels, prior)
    clip_ref = (
        integrate.quad(lambda t: (t + 1.3) ** 2 * pdf(t), -np.inf, -1.3)[0]
        + integrate.quad(lambda t: (t - 2.0) ** 2 * pdf(t), 2.0, np.inf)[0]
    )
    assert clip == pytest.approx(clip_ref, rel=1e-7)
    assert clip + rnd == pytest.approx(total, rel=1e-7)


@pytest.mark.parametrize("bits", [2, 4])
def test_simulations_agree_with_their_expectations(bits):
    x = C.sample_prior("laplace", 100_000, seed=1)
    a = 2.5
    clip_sim, rnd_sim = C.simulated_mse(x, a, bits, "paper")
    clip, rnd = C.expected_mse_of_levels(C.model_grid_levels(a, bits))
    assert clip_sim == pytest.approx(clip, rel=0.01) and rnd_sim == pytest.approx(rnd, rel=0.01)
    clip_n, rnd_n = C.simulated_mse(x, a, bits, "noise")
    clip_f, rnd_f = C.aciq_expected_mse(a, bits)
    assert clip_n == pytest.approx(float(clip_f), rel=0.01) and rnd_n == pytest.approx(
        float(rnd_f), rel=0.01
    )


def test_model_grid_has_one_level_more_than_the_code():
    for bits in (2, 3, 4):
        lv = C.model_grid_levels(1.0, bits)
        assert lv.numel() == 2**bits + 1 and lv[0] == -1.0 and lv[-1] == 1.0
        assert C.affine_levels(C.ClipRange(0.0, 1.0), bits).numel() == 2**bits
    assert torch.allclose(
        C.affine_levels(C.ClipRange(0.0, 3.0), 2),
        torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64),
    )


def test_sample_prior_moments():
    for stratified in (True, False):
        x = C.sample_prior("laplace", 200_000, 0, stratified)
        assert abs(float(x.mean())) < 0.01 and float(x.abs().mean()) == pytest.approx(1.0, abs=0.01)
        g = C.sample_prior("gauss", 200_000, 0, stratified)
        assert float(g.std()) == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- OCTAV
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["laplace", "relu_gauss", "relu_laplace"])
def test_octav_converges_to_grid_search_optimum(bits, kind):
    x = (
        laplace(20_000, seed=bits)
        if kind != "relu_gauss"
        else torch.randn(20_000, generator=torch.Generator().manual_seed(bits))
    )
    if kind.startswith("relu"):
        x = torch.relu(x)
    res = C.octav(x, bits)
    assert res.converged and len(res.history) <= 20
    assert res.history[0] == pytest.approx(float(x[x != 0].abs().mean()), rel=1e-6)  # s_1 = E|x|
    # the fixed point: s = E[|x| 1{|x|>s}] / (c P(0<|x|<=s) + P(|x|>s))
    a = x.double().abs()
    a = a[a > 0]
    c = C.rounding_noise_coef(bits, "affine", one_sided=kind != "laplace")
    out = a > res.alpha
    assert res.alpha == pytest.approx(
        float(a[out].sum()) / (c * float((~out).sum()) + float(out.sum())), rel=1e-6
    )
    # ... and it lands on the optimum of a grid search of the real quantizer's MSE
    amax = float(a.max())
    grid = np.linspace(amax / 400, amax, 400)
    side = "two" if kind == "laplace" else "pos"
    mse = lambda s: float(
        ((x - C.quantize_with_range(x, C._range_from_alpha(float(s), side), bits)) ** 2).mean()
    )
    errs = [mse(s) for s in grid]
    assert res.alpha == pytest.approx(grid[int(np.argmin(errs))], rel=0.04, abs=amax / 400)
    assert mse(res.alpha) <= 1.01 * min(errs)


def test_octav_objective_is_minimal_near_the_fixed_point():
    x = torch.relu(torch.randn(20_000, generator=torch.Generator().manual_seed(0)))
    res = C.octav(x, 4)
    J = lambda s: C.octav_objective(x, s, 4)
    assert J(res.alpha) < J(0.8 * res.alpha) and J(res.alpha) < J(1.2 * res.alpha)


# ----------------------------------------------------------------------------- KL
def test_kl_on_gaussian_picks_threshold_inside_data_range():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    amax = float(x.abs().max())
    for bits in (4, 8):
        res = C.kl_search(x, bits)
        assert res.num_levels == 2 ** (bits - 1)
        assert 0 < res.threshold <= amax
        assert res.range == C.ClipRange(-res.threshold, res.threshold)
    t8 = C.kl_search(x, 8).threshold
    assert 2.0 < t8 < amax  # clips the far tail, keeps the bulk
    assert C.kl_search(x, 4).threshold < t8  # fewer levels: clip harder


def test_kl_fast_path_equals_explicit_procedure():
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(2, 200))
        levels = int(rng.integers(1, n + 1))
        h = rng.integers(0, 6, n) * (rng.random(n) < 0.6)
        h[int(rng.integers(0, n))] += 1
        cand, d = C.kl_divergences(h, levels)
        slow = [
            C.kl_divergence(
                C.kl_reference_distribution(h, int(i)),
                C.kl_candidate_distribution(h, int(i), levels),
            )
            for i in cand
        ]
        np.testing.assert_allclose(d, slow, rtol=1e-9, atol=1e-12)


def test_kl_start_bin_prevents_the_single_spike_collapse():
    # candidate i = 103 folds everything into the bin of 0.5: P = Q = one spike, KL = 0
    x = torch.tensor([0.5, 5.0, 9.0, 9.0, 10.0])
    low = C.kl_search(x, 2, start_bin=4)
    assert low.divergences.min() < 1e-12 and low.threshold == pytest.approx(103 * 10 / 2048)
    assert C.kl_search(x, 2).threshold > 5.0  # TensorRT's start at 128 bins


def test_kl_reference_and_candidate_by_hand():
    h = np.array([4.0, 0.0, 2.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(C.kl_reference_distribution(h, 4), np.array([4, 0, 2, 4]) / 10)
    # i = 4 into 2 levels: groups {0, 1} (sum 4, one non-zero bin) and {2, 3} (sum 4, two non-zero)
    np.testing.assert_allclose(C.kl_candidate_distribution(h, 4, 2), np.array([4, 0, 2, 2]) / 8)
    assert C.kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(50),
        torch.full((50,), 3.0),
        torch.full((7,), -2.5),
        torch.tensor([-1.5, 1.5, 1.5, -1.5]),
    ],
)
def test_kl_degenerate_histograms_are_exact(x):
    rng = C.kl_range(x, 8)
    assert rng.lo <= 0 <= rng.hi
    symmetric = rng.lo < 0 < rng.hi  # +-c: KL's range is symmetric, so is its quantizer (TensorRT)
    assert torch.equal(C.quantize_with_range(x, rng, 8, symmetric), x)


def test_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="num_levels"):
        C.kl_search(torch.randn(100), 8, bins=64)
    with pytest.raises(ValueError, match="bins"):
        C.kl_search(torch.randn(100), 4, bins=1)
    with pytest.raises(ValueError, match="finite"):
        C.kl_search(torch.tensor([1.0, float("nan")]))


# ----------------------------------------------------------------------------- simple estimators
def test_ema_matches_torch_moving_average_observer():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, generator=g) * (1 + 0.1 * k) + 0.05 * k for k in range(30)]
    for alpha in (0.01, 0.3, 1.0):
        ref = MovingAverageMinMaxObserver(averaging_constant=alpha)
        for b in batches:
            ref(b)
        got = C.ema_range(batches, alpha)
        assert got.lo == pytest.approx(min(float(ref.min_val), 0.0), rel=1e-6)
        assert got.hi == pytest.approx(max(float(ref.max_val), 0.0), rel=1e-6)


def test_ema_observer_tracks_several_alphas_and_history():
    obs = C.EMAObserver([0.5, 0.1], history=3)
    obs.train()
    for v in (1.0, 3.0, 2.0, 5.0):
        obs(torch.tensor([-v, v]))
    assert obs.range(0.5).hi == pytest.approx(((1 * 0.5 + 3 * 0.5) * 0.5 + 2 * 0.5) * 0.5 + 5 * 0.5)
    assert obs.range(0.1).hi == pytest.approx(((1 * 0.9 + 0.3) * 0.9 + 0.2) * 0.9 + 0.5)
    assert obs.batch_max.tolist() == [1.0, 3.0, 2.0] and int(obs.steps) == 4
    obs.eval()
    obs(torch.tensor([100.0]))
    assert int(obs.steps) == 4
    with pytest.raises(ValueError, match="alpha must be one of"):
        obs.range(0.3)


def test_insert_ema_observers_keeps_the_function_and_saves_state():
    torch.manual_seed(0)
    mlp = MLP([4, 5, 3])
    model = C.insert_ema_observers(mlp, [0.1])
    X = torch.randn(8, 4)
    assert torch.equal(model(X), mlp(X))
    model.train()
    model(X)
    (obs,) = C.ema_observers(model)
    assert obs.range(0.1).hi == pytest.approx(float(torch.relu(mlp[0](X)).max().detach()))
    copy = C.insert_ema_observers(MLP([4, 5, 3]), [0.1])
    copy.load_state_dict(model.state_dict())
    assert C.ema_observers(copy)[0].range(0.1) == obs.range(0.1)


def test_mean_minmax_and_percentile_against_brute_force():
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    per_sample = C.mean_minmax_range(x)
    assert per_sample.lo == pytest.approx(float(x.min(1).values.mean()))
    assert per_sample.hi == pytest.approx(float(x.max(1).values.mean()))
    per_batch = C.mean_minmax_range(x, batch_size=4)  # batches of 4, 4, 2 samples
    his = [float(x[i : i + 4].max()) for i in (0, 4, 8)]
    assert per_batch.hi == pytest.approx(sum(his) / 3)
    assert C.mean_minmax_range(x, batch_size=10) == C.minmax_range(x)
    p = C.percentile_range(x, 90.0)
    assert p.hi == pytest.approx(float(np.percentile(x.numpy(), 90.0)), rel=1e-6)
    assert C.percentile_range(x, 100.0) == C.minmax_range(x)


@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, True)])
def test_mse_range_is_the_best_shrunken_range(bits, symmetric):
    x = laplace(5_000)
    lo0, hi0 = C.minmax_range(x)

    def mse(r):  # one candidate at a time, through qparams_with_range
        return float(
            ((x.double() - C.quantize_with_range(x, r, bits, symmetric).double()) ** 2).mean()
        )

    best = C.mse_range(x, bits, n_grid=150, symmetric=symmetric)  # > 64: several batches
    brute = min((C.ClipRange(lo0 * t, hi0 * t) for t in np.linspace(1 / 150, 1, 150)), key=mse)
    assert best == brute or mse(best) == pytest.approx(mse(brute), rel=1e-12)
    assert mse(best) < mse(C.ClipRange(lo0, hi0))


def test_histogram_observer_searches_l2_for_256_levels():
    x = torch.relu(torch.randn(20_000, generator=torch.Generator().manual_seed(0)))
    ranges = {b: C.histogram_observer_range(x, b) for b in (2, 4, 8)}
    assert ranges[2] == ranges[4] == ranges[8]  # dst_nbins = 2^8 whatever quant_max is
    obs = HistogramObserver(quant_min=0, quant_max=255)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert (
        float(scale) == pytest.approx((ranges[8].hi - ranges[8].lo) / 255, rel=1e-5)
        and int(zp) == 0
    )
    import inspect

    src = inspect.getsource(HistogramObserver._compute_quantization_error) + inspect.getsource(
        HistogramObserver._get_norm
    )
    assert "log" not in src and "L2" in inspect.getsource(HistogramObserver._get_norm)


# ----------------------------------------------------------------------------- every estimator
finite = st.floats(
    -1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)
samples = st.tuples(st.integers(1, 12), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.float32, s, elements=finite)
)


@HSET
@given(samples, st.sampled_from([2, 3, 4, 8]), st.sampled_from(["raw", "relu", "neg"]))
def test_every_estimator_contains_zero(a, bits, kind):
    x = torch.from_numpy(a)
    if kind == "relu":
        x = torch.relu(x)
    elif kind == "neg":
        x = -x.abs()
    for name, est in C.ESTIMATORS.items():
        r = est(x, bits)
        assert r.lo <= 0.0 <= r.hi, (name, r)
        assert math.isfinite(r.lo) and math.isfinite(r.hi), (name, r)
        x_fq = C.quantize_with_range(x, r, bits)
        assert bool(torch.isfinite(x_fq).all()), name
    r = C.ema_range(list(x), 0.1)
    assert r.lo <= 0.0 <= r.hi


@pytest.mark.parametrize("name", list(C.ESTIMATORS))
def test_estimators_are_exact_on_zeros(name):
    x = torch.zeros(4, 3)
    r = C.ESTIMATORS[name](x, 4)
    assert r.lo <= 0 <= r.hi and torch.equal(C.quantize_with_range(x, r, 4), x)


# ----------------------------------------------------------------------------- the network
def test_fake_quant_forward_and_evaluation():
    torch.manual_seed(0)
    model = C.insert_ema_observers(MLP([6, 8, 8, 3]))
    X, y = torch.rand(20, 6), torch.randint(0, 3, (20,))
    acts = C.hidden_activations(model, X)
    assert len(acts) == 2 and acts[0].shape == (20, 8)
    ranges = [C.minmax_range(a) for a in acts]
    with torch.no_grad():
        ref = model(X)
    assert torch.allclose(
        C.fake_quant_forward(model, X, ranges, 16, weight_bits=16), ref, atol=1e-3
    )
    ev = C.evaluate_ranges(model, X, y, ranges, 3, acts)
    by_hand = np.mean(
        [float(((a - C.quantize_with_range(a, r, 3)) ** 2).mean()) for a, r in zip(acts, ranges)]
    )
    assert ev.act_mse == pytest.approx(by_hand)
    assert 0.0 <= ev.accuracy <= 1.0
    with pytest.raises(ValueError, match="one range per ReLU"):
        C.fake_quant_forward(model, X, ranges[:1], 4)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: C.aciq_alpha(1), "num_bits must be an integer in 2..16"),
        (lambda: C.aciq_alpha(4, "cauchy"), "prior must be one of 'laplace', 'gauss'"),
        (lambda: C.rounding_noise_coef(4, "midrise"), "grid must be one of 'paper', 'affine'"),
        (
            lambda: C.percentile_range(torch.ones(3), 40.0),
            r"percentile must be a number in \(50, 100\]",
        ),
        (lambda: C.mean_minmax_range(torch.ones(3), 0), "batch_size must be an integer >= 1"),
        (lambda: C.EMAObserver([0.0]), r"alphas must be a non-empty list of numbers in \(0, 1\]"),
        (lambda: C.ema_range([], 0.1), "batches must contain at least one tensor"),
        (lambda: C.minmax_range(torch.empty(0)), "x must be non-empty"),
        (lambda: C.mse_range(torch.ones(3), 4, n_grid=0), "n_grid must be an integer >= 1"),
        (lambda: C.octav(torch.ones(3), 4, max_iter=0), "max_iter must be an integer >= 1"),
        (
            lambda: C.histogram_observer_range(torch.ones(3), 9),
            "num_bits must be an integer in 2..8",
        ),
        (
            lambda: C.simulated_mse(torch.ones(3), 1.0, 4, "dither"),
            "kind must be one of 'paper', 'noise'",
        ),
        (lambda: C.model_grid_levels(0.0, 4), "alpha must be > 0"),
        (lambda: C.range_qparams(torch.ones(3), C.ClipRange(0.5, 1.0), 4), "lo <= 0 <= hi"),
        (lambda: C.calibrate([torch.ones(3)], "entropy", 4), "estimator must be one of"),
        (
            lambda: C.quantize_to_levels(torch.ones(3), torch.tensor([1.0, 0.0])),
            "strictly increasing",
        ),
        (lambda: C.minmax_range(torch.tensor([1, 2])), "floating-point"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
