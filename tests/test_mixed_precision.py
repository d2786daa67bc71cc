"""Tests for lecturelib.mixed_precision: costs by hand, the knapsack against brute force, HAQ's
budget enforcement, the fake-quantized model against lecturelib.quantizers, and the searches."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lecturelib as ll
from lecturelib import mixed_precision as mp

HSET = settings(max_examples=60, deadline=None, derandomize=True)
SMALL_BITS = (2, 4, 8)  # a 3 x 3 table per layer keeps the sensitivity fixture fast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids thread hand-off overhead on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mp.DigitsCNN().eval()


@pytest.fixture(scope="module")
def specs(model):
    return mp.layer_specs(model)


@pytest.fixture(scope="module")
def images():
    return torch.rand(24, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fq_model(model, images):
    return mp.FakeQuantModel(model, images[:16])


# ------------------------------------------------------------------------ design space and costs
def test_design_space_is_64_to_the_n():
    assert mp.design_space_size(1) == 64
    assert mp.design_space_size(8) == 64**8 == 281_474_976_710_656
    assert mp.design_space_log10(8) == pytest.approx(math.log10(64**8))
    assert mp.design_space_size(3, 7) == 49**3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_design_space_rejects_bad_layers(bad):
    with pytest.raises(ValueError, match="n_layers"):
        mp.design_space_size(bad)


def test_layer_specs_by_hand(specs):
    by_name = {s.name: s for s in specs}
    assert [s.kind for s in specs] == [
        "conv",
        "depthwise",
        "pointwise",
        "depthwise",
        "pointwise",
        "depthwise",
        "pointwise",
        "linear",
    ]
    # conv1: 8 filters of 1x3x3 on 8x8 outputs
    assert by_name["conv1"].macs == 8 * 1 * 9 * 64 and by_name["conv1"].params == 72
    # dw2: 16 channels, 3x3, stride 2 -> 4x4 outputs, one input channel per filter
    assert by_name["dw2"].out_hw == (4, 4) and by_name["dw2"].macs == 16 * 9 * 16
    # pw3: 32 -> 32, 1x1 on 4x4
    assert by_name["pw3"].macs == 32 * 32 * 16 and by_name["pw3"].params == 1024
    # fc: 512 -> 10
    assert by_name["fc"].macs == 5120 and by_name["fc"].c_in == 512
    assert sum(s.macs for s in specs) == 54016


def test_cost_functions_by_hand(specs):
    assert mp.conv_macs(3, 6, 3, (5, 5)) == 6 * 3 * 9 * 25 == 4050
    assert mp.conv_macs(4, 4, 3, (2, 2), groups=4) == 4 * 1 * 9 * 4
    assert mp.bitops(4608, 4, 8) == 147_456
    assert mp.size_bits(5120, 3) == 15_360
    policy = ((8, 8), (2, 2), (4, 3), (2, 8), (3, 3), (5, 2), (6, 7), (2, 4))
    expected = (
        8 * 8 * 4608
        + 2 * 2 * 4608
        + 4 * 3 * 8192
        + 2 * 8 * 2304
        + 3 * 3 * 8192
        + 5 * 2 * 4608
        + 6 * 7 * 16384
        + 2 * 4 * 5120
    )
    assert mp.policy_bitops(specs, policy) == expected
    assert (
        mp.policy_size_bits(specs, policy)
        == 8 * 72 + 2 * 72 + 4 * 128 + 2 * 144 + 3 * 512 + 5 * 288 + 6 * 1024 + 2 * 5120
    )
    for b in (2, 3, 8):
        assert mp.average_bits(specs, ((b, b),) * 8) == pytest.approx(b)
        assert mp.budget_for_average_bits(specs, b) == b * b * 54016
    table = mp.cost_table(specs)
    assert table.shape == (8, 7, 7) and table[6, 4, 5] == 6 * 7 * 16384
    assert mp.policy_cost(table, policy) == expected
    size = mp.cost_table(specs, "size_bits")
    assert size[7, 0, 6] == 2 * 5120 and (size[:, :, 0] == size[:, :, 6]).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mp.bitops(10, 0, 8), "w_bits"),
        (lambda: mp.bitops(10, 8, 40), "a_bits"),
        (lambda: mp.bitops(-1, 8, 8), "macs"),
        (lambda: mp.size_bits(10, 0), "w_bits"),
        (lambda: mp.conv_macs(3, 4, 3, (2, 2), groups=2), "groups"),
        (lambda: mp.conv_macs(3, 4, 0, (2, 2)), "kernel"),
        (lambda: mp.cost_table([], "bitops"), "specs"),
        (lambda: mp.budget_for_average_bits([], 0.5), "avg_bits"),
    ],
)
def test_cost_functions_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cost_table_rejects_unknown_metric(specs):
    with pytest.raises(ValueError, match="metric must be one of"):
        mp.cost_table(specs, "latency")


# ----------------------------------------------------------------------------- knapsack
def _brute_force(values, costs, capacity):
    best = math.inf
    for picks in itertools.product(*[range(len(v)) for v in values]):
        if sum(c[p] for c, p in zip(costs, picks)) <= capacity:
            best = min(best, sum(v[p] for v, p in zip(values, picks)))
    return best


@st.composite
def mckp_instances(draw):
    n_groups = draw(st.integers(1, 4))
    unit = draw(st.sampled_from([1, 1, 3, 7]))  # common factors exercise the gcd scaling
    values, costs = [], []
    for _ in range(n_groups):
        k = draw(st.integers(1, 4))
        values.append(
            draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=k, max_size=k))
        )
        costs.append([unit * c for c in draw(st.lists(st.integers(0, 12), min_size=k, max_size=k))])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    capacity = draw(st.integers(lo, hi + 5))
    return values, costs, capacity


@HSET
@given(mckp_instances())
def test_knapsack_equals_brute_force(instance):
    values, costs, capacity = instance
    picks, total = mp.mckp_solve(values, [np.array(c) for c in costs], capacity)
    assert sum(c[p] for c, p in zip(costs, picks)) <= capacity
    assert total == pytest.approx(sum(v[p] for v, p in zip(values, picks)), abs=1e-9)
    assert total == pytest.approx(_brute_force(values, costs, capacity), abs=1e-9)


@pytest.mark.parametrize("capacity", [6, 13, 20, 21])
def test_knapsack_gcd_scaling_is_exact(capacity):
    # every cost is a multiple of 7: the table works in units of 7 and must round the capacity down
    values = [[0.0, -1.0, -3.0], [0.0, -2.0]]
    costs = [np.array([0, 7, 21]), np.array([0, 14])]
    picks, total = mp.mckp_solve(values, costs, capacity)
    assert sum(c[p] for c, p in zip(costs, picks)) <= capacity
    assert total == _brute_force(values, [list(c) for c in costs], capacity)


def test_knapsack_rejects_bad_input():
    with pytest.raises(ValueError, match="capacity must be >= 3"):
        mp.mckp_solve([[0.0], [1.0]], [np.array([1]), np.array([2])], 2)
    with pytest.raises(ValueError, match="non-negative integers"):
        mp.mckp_solve([[0.0]], [np.array([1.5])], 2)
    with pytest.raises(ValueError, match="same number"):
        mp.mckp_solve([[0.0]], [], 2)
    with pytest.raises(ValueError, match="finite"):
        mp.mckp_solve([[math.nan]], [np.array([1])], 2)


# ----------------------------------------------------------------------------- budget enforcement
@st.composite
def enforcement_cases(draw):
    n = draw(st.integers(1, 6))
    macs = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    policy = tuple(tuple(draw(st.sampled_from(mp.BITS)) for _ in range(2)) for _ in range(n))
    costs = np.array(
        [[[m * w * a for a in mp.BITS] for w in mp.BITS] for m in macs], dtype=np.int64
    )
    lo, hi = int(costs[:, 0, 0].sum()), int(costs[:, -1, -1].sum())
    budget = draw(st.integers(lo, hi))
    return policy, costs, budget


@HSET
@given(enforcement_cases())
def test_enforce_budget_never_over_budget(case):
    policy, costs, budget = case
    out = mp.enforce_budget(policy, costs, budget)
    assert mp.policy_cost(costs, out) <= budget
    assert all(w2 <= w and a2 <= a for (w, a), (w2, a2) in zip(policy, out))  # only lowers
    if mp.policy_cost(costs, policy) <= budget:
        assert out == policy  # already fits: untouched


def test_enforce_budget_order_is_haq():
    costs = np.array([[[w * a for a in mp.BITS] for w in mp.BITS]] * 2, dtype=np.int64)
    # 2 layers at (8, 8): cost 128. Budget 120: the last layer's activation goes 8 -> 7 (cost 120).
    assert mp.enforce_budget(((8, 8), (8, 8)), costs, 120) == ((8, 8), (8, 7))
    # budget 112: last a 8->7 (120), last w 8->7 (113), first a 8->7 (112)
    assert mp.enforce_budget(((8, 8), (8, 8)), costs, 112) == ((8, 7), (7, 7))
    with pytest.raises(ValueError, match="budget must be >= 8"):
        mp.enforce_budget(((8, 8), (8, 8)), costs, 7)


# ----------------------------------------------------------------------------- fake-quantized model
def test_activation_fast_path_matches_lecturelib_quantizers(fq_model, images):
    for x in fq_model.layer_inputs(images):
        lo = min(float(x.min()), 0.0)
        for b, ratio in [(2, 0.4), (5, 0.8), (8, 1.0)]:
            hi = ratio * float(x.max())
            qp = ll.qparams_with_range(x, lo, hi, b, signed=False)
            fast = fq_model._act_fq(x, mp.FakeQuantModel._act_qparams(lo, hi, b))
            assert torch.equal(fast, ll.fake_quantize(x, qp))


def test_weights_are_per_channel_on_the_grid(fq_model, model):
    for l, layer in enumerate(model.layers):
        W_fq = fq_model.w_fq[l][3]
        for c in range(len(W_fq)):  # 3-bit symmetric: at most 8 distinct values per output channel
            assert len(torch.unique(W_fq[c])) <= 8
        err8 = (fq_model.w_fq[l][8] - layer.weight).abs().max()
        assert err8 <= (layer.weight.abs().amax() / 127) / 2 + 1e-6


def test_float_policy_is_the_float_model(fq_model, model, images):
    with torch.no_grad():
        assert torch.equal(fq_model.logits((None,) * 8, images), model(images))
        out8 = fq_model.logits(((8, 8),) * 8, images)
    assert (out8.argmax(1) == model(images).argmax(1)).float().mean() > 0.9


def test_evaluator_prefix_cache_gives_the_same_numbers(fq_model, images):
    y = torch.arange(len(images)) % 10
    ev = mp.PolicyEvaluator(fq_model, images, y)
    policy = (None, None, None, (3, 4), (2, 2), None, (8, 8), (4, 4))
    acc, ce, kl = ev.evaluate(policy)
    out = fq_model.logits(policy, images)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert ce == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert kl >= 0 and ev.evaluate((None,) * 8)[2] == 0.0
    assert ev.n_evaluations == 2 and ev(policy) == acc and ev.n_evaluations == 2


def test_bad_policies_raise(fq_model, images):
    with pytest.raises(ValueError, match="policy must have 8 entries"):
        fq_model.logits(((4, 4),) * 3, images)
    with pytest.raises(ValueError, match=r"policy\[1\] must be None or \(w_bits, a_bits\)"):
        fq_model.logits(((4, 4), (1, 4)) + ((4, 4),) * 6, images)
    with pytest.raises(ValueError, match="model must be a DigitsCNN"):
        mp.FakeQuantModel(torch.nn.Linear(2, 2), images)


# ----------------------------------------------------------------------------- searches
@pytest.fixture(scope="module")
def search_setup(model, specs, images):
    y = torch.arange(len(images)) % 10
    ev = mp.PolicyEvaluator(mp.FakeQuantModel(model, images[:16], bits=SMALL_BITS), images, y)
    sens = mp.sensitivity_table(ev)
    return ev, sens, mp.cost_table(specs, bits=SMALL_BITS)


def test_sensitivity_table(search_setup):
    ev, sens, _ = search_setup
    assert sens.delta_loss.shape == (8, 3, 3) and (sens.delta_loss >= 0).all()
    assert sens.evaluations == 8 * 9 + 1
    # KL from the float model's outputs, measured one layer at a time
    assert sens.delta_loss[2, 0, 1] == ev.evaluate((None, None, (2, 4)) + (None,) * 5)[2]
    assert sens.value(((2, 4),) + ((8, 8),) * 7) == pytest.approx(
        sens.delta_loss[0, 0, 1] + sum(sens.delta_loss[l, 2, 2] for l in range(1, 8))
    )


@pytest.mark.parametrize("avg_bits", [2.0, 2.3, 3.0, 4.5, 8.0])
def test_searches_meet_the_budget_and_knapsack_is_optimal(search_setup, specs, avg_bits):
    ev, sens, costs = search_setup
    budget = mp.budget_for_average_bits(specs, avg_bits)
    uni = mp.search_uniform(ev, costs, budget, bits=SMALL_BITS)
    greedy = mp.search_greedy(sens, costs, budget)
    knap = mp.search_knapsack(sens, costs, budget)
    for r in (uni, greedy, knap):
        assert r.cost == mp.policy_cost(costs, r.policy, SMALL_BITS) <= budget
    # the knapsack is exact for the additive model: nothing else that fits does better
    assert knap.objective <= greedy.objective + 1e-12
    assert knap.objective <= sens.value(uni.policy) + 1e-12
    assert knap.objective == pytest.approx(sens.value(knap.policy))
    if avg_bits == 8.0:
        assert uni.policy == ((8, 8),) * 8


def test_rl_smoke_within_budget_and_deterministic(specs):
    costs = mp.cost_table(specs)
    budget = mp.budget_for_average_bits(specs, 3.0)
    target = np.array([8, 2, 8, 2, 8, 2, 8, 2, 8, 2, 8, 2, 8, 2, 8, 2])

    def evaluate(policy):  # a toy accuracy: closeness to a target policy
        bits = np.array([b for pair in policy for b in pair])
        return 1.0 - float(np.abs(bits - target).mean()) / 6

    cfg = mp.HAQConfig(episodes=12, warmup=4, hidden=16, batch_size=8, seed=3)
    r1 = mp.search_rl(evaluate, specs, costs, budget, 1.0, cfg)
    r2 = mp.search_rl(evaluate, specs, costs, budget, 1.0, cfg)
    assert r1.policy == r2.policy and r1.history == r2.history
    assert r1.cost <= budget and len(r1.history) == 12
    assert (
        r1.objective == evaluate(r1.policy) == pytest.approx(max(r1.history) / 10 + 1)
    )  # best seen


def test_haq_state_features(specs):
    f = mp.haq_state_features(specs)
    assert f.shape == (8, 8) and f.min() == 0.0 and f.max() == 1.0
    assert list(f[:, 7]) == [float(s.kind == "depthwise") for s in specs]
    assert f[0, 0] == 0.0 and f[7, 0] == 1.0  # layer index normalised


def test_search_rejects_infeasible_budget(search_setup, specs):
    ev, sens, costs = search_setup
    with pytest.raises(ValueError, match="budget must be >= 216064"):
        mp.search_knapsack(sens, costs, 1000)
    with pytest.raises(ValueError, match="budget must be an integer"):
        mp.search_greedy(sens, costs, 3.5)
    with pytest.raises(ValueError, match="same .layers, bits, bits. shape"):
        mp.search_knapsack(sens, mp.cost_table(specs), 10**9)


# ----------------------------------------------------------------------------- latency and slides
def test_latency_lut_runs_without_warnings(model, specs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = mp.measure_latency_lut(model, specs, batch_size=2, repeats=1, inner=1)
    assert [r.name for r in rows] == list(mp.DigitsCNN.NAMES)
    assert all(r.fp32_us > 0 and r.int8_us > 0 and r.speedup > 0 for r in rows)
    with pytest.raises(ValueError, match="batch_size"):
        mp.measure_latency_lut(model, specs, batch_size=0)


def test_slide_tables_are_complete():
    assert {k: len(v) for k, v in mp.HAQ_SLIDE_TABLES.items()} == {
        "model_size": 7,
        "latency": 7,
        "energy": 7,
    }
    for rows in mp.HAQ_SLIDE_TABLES.values():
        assert rows[-1][0] == "Original"
