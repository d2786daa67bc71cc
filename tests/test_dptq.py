"""Tests for lecturelib.dptq: knapsack DP vs brute force, STE, dynamic quantization, hinge losses."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lecturelib as ll
from lecturelib import dptq as D

SET = settings(deadline=None, derandomize=True, max_examples=40)


@SET
@given(L=st.integers(1, 4), opts=st.sampled_from([[3, 4, 5], [2, 3, 5, 8], [4, 6], [3, 4, 5, 6, 7, 8, 9, 10]]),
       seed=st.integers(0, 10_000), frac=st.floats(0, 1))
def test_mckp_equals_brute_force(L, opts, seed, frac):
    scores = torch.rand((L, len(opts)), generator=torch.Generator().manual_seed(seed))
    feas = D.feasible_budgets(L, opts)
    budget = feas[int(frac * (len(feas) - 1))]
    sel = D.mckp_select(scores, opts, budget)
    best, _ = D.brute_force_mckp(scores, opts, budget)
    assert torch.all(sel.sum(-1) == 1)
    assert int(D.selection_bits(sel, opts).sum()) == budget
    assert abs(float((sel * scores).sum()) - best) < 1e-6


def test_mckp_batched_matches_single():
    s = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0))
    opts = [3, 4, 5, 6]
    sel = D.mckp_select(s, opts, 13)
    for i in range(5):
        assert torch.equal(sel[i], D.mckp_select(s[i], opts, 13))


@pytest.mark.parametrize("budget", [8, 22, 13.0])
def test_infeasible_budget_raises(budget):
    with pytest.raises(ValueError, match="budget"):
        D.mckp_select(torch.rand(3, 3), [3, 5, 7], budget)


def test_unreachable_budget_raises():
    with pytest.raises(ValueError, match="budget"):
        D.mckp_select(torch.rand(2, 2), [4, 6], 11)  # sums of two even numbers are even


def test_ste_passes_gradient_to_scores():
    scores = torch.rand(2, 3, 4, requires_grad=True)
    out = D.ste_select(scores, [3, 4, 5, 6], 14)
    assert torch.equal(out.detach(), D.mckp_select(scores, [3, 4, 5, 6], 14))
    g = torch.randn(2, 3, 4)
    (out * g).sum().backward()
    assert torch.allclose(scores.grad, g)


def test_dynamic_quantization_uses_each_examples_range():
    x = torch.randn(4, 3, 5, 5) * torch.tensor([0.1, 1.0, 5.0, 20.0]).reshape(-1, 1, 1, 1)
    for b in (3, 8):
        xq = D.dynamic_fake_quantize(x, b)
        for n in range(4):
            qp = ll.choose_qparams(x[n], b, symmetric=False, signed=False)
            assert torch.allclose(xq[n], ll.fake_quantize(x[n], qp), atol=1e-6)
    # a huge example does not change a small one's quantization
    y = x.clone()
    y[3] *= 100
    assert torch.equal(D.dynamic_fake_quantize(y, 4)[0], D.dynamic_fake_quantize(x, 4)[0])


def test_dynamic_quantization_gradient_reaches_range():
    x = torch.rand(2, 10, requires_grad=True)
    D.dynamic_fake_quantize(x, 3).pow(2).sum().backward()
    g_live = x.grad.clone()
    x.grad = None
    D.dynamic_fake_quantize(x, 3, detach_range=True).pow(2).sum().backward()
    assert not torch.allclose(g_live, x.grad)  # the min/max path adds gradient


def test_hinge_losses():
    t = torch.tensor([[5.0, 3.0, 0.0], [0.0, 1.0, 4.0]])
    p = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3]])
    # robust: row 0 gap 0.3 -> max(0, 0.5 - 0.3) = 0.2; row 1: p[2] - p[1] = 0.1 -> 0.4
    assert D.hinge_robust(p, t, 0.5).item() == pytest.approx(0.3)
    # detrimental: row 0 best other 0.3 - 0.6 = -0.3 -> 0.8; row 1: 0.5 - 0.3 = 0.2 -> 0.3
    assert D.hinge_detrimental(p, t, 0.5).item() == pytest.approx(0.55)
    with pytest.raises(ValueError, match="probs_q"):
        D.hinge_robust(p[:, :2], t, 0.5)


def test_transitory_points():
    r = torch.tensor([1, 1, 1, 0]); d = torch.tensor([1, 1, 0, 1]); dq = torch.tensor([0, 1, 0, 0])
    assert D.transitory_points(r, d, dq) == 25.0


def test_quantpoints_fp_and_onehot():
    torch.manual_seed(0)
    m, names = D.make_model("cnn4")
    m.eval()
    net = D.QuantPoints(m, names, [3, 4, 5, 6, 7, 8, 9, 10]).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(net(x), m(x))
    sel = D.random_selection(3, len(names), net.options, 22, torch.Generator().manual_seed(0))
    assert int(D.selection_bits(sel, net.options).sum(1).unique()) == 22
    assert not torch.allclose(net(x, sel), m(x))
    with pytest.raises(ValueError, match="point_names"):
        D.QuantPoints(m, ["nope"], [3, 4])


def test_bad_inputs():
    with pytest.raises(ValueError, match="options"):
        D.mckp_select(torch.rand(2, 2), [3, 3], 6)
    with pytest.raises(ValueError, match="num_bits"):
        D.dynamic_fake_quantize(torch.rand(2, 2), 1)
    with pytest.raises(ValueError, match="name"):
        D.corrupt(torch.rand(1, 1, 8, 8), "fog", 0.1)
    with pytest.raises(ValueError, match="avg_bits"):
        D.budget_for(4, "Z", [3, 4])
    with pytest.raises(ValueError, match="kind"):
        D.train_pair(torch.nn.Linear(2, 2), ["x"], torch.rand(2, 2), "evil", D.PairConfig())


def test_image_folder_loader(tmp_path):
    from lecturelib import datasets as DS
    DS.make_synthetic_image_folder(tmp_path, classes=["cat", "dog"], per_class=3, size=12, seed=0)
    X, y, classes = DS.load_image_folder(tmp_path, size=8)
    assert classes == ["cat", "dog"]
    assert X.shape == (6, 3, 8, 8) and X.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0 <= X.min() and X.max() <= 1
    with pytest.raises(ValueError, match="root"):
        DS.load_image_folder(tmp_path / "missing", size=8)


def test_predict_really_quantizes():
    torch.manual_seed(0)
    m, names = D.make_model("cnn4")
    net = D.QuantPoints(m.eval(), names, [3, 4]).eval()
    x = torch.rand(64, 1, 8, 8)
    sel = D.random_selection(64, len(names), [3, 4], 12, torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = net(x, sel).argmax(1)
    assert torch.equal(D.predict(net, x, sel, weight_bits=None), direct)
    w0 = m.fc.weight.clone()
    D.predict(net, x, sel, weight_bits=4)
    assert torch.equal(m.fc.weight, w0)  # weights restored


def test_planted_outlier_channel_is_invisible_in_fp_and_collapses_low_bits():
    torch.manual_seed(0)
    m, names = D.make_model("cnn4")
    m.eval()
    x = torch.rand(32, 1, 8, 8)
    planted = D.plant_outlier_channel(m, 50.0).eval()
    with torch.no_grad():
        assert torch.allclose(planted(x), m(x), atol=1e-5)  # zero classifier weight: same logits
    opts = [3, 10]
    net = D.QuantPoints(planted, names, opts).eval()
    sel = torch.zeros(32, len(names), 2)
    sel[:, :, 1] = 1
    with torch.no_grad():
        a_hi = net(x, sel)
        sel[:, -1] = torch.tensor([1.0, 0.0])  # last layer at 3 bits
        a_lo = net(x, sel)
        rec = D.activation_records(net, x, sel)
    real_q = rec[-1][1][:, :-1]  # the real channels of the last quantized activation
    assert float((real_q == 0).float().mean()) == 1.0  # all swallowed by the zero bin
    assert not torch.allclose(a_lo, a_hi)
    assert torch.allclose(m.fc.weight, planted.fc.weight[:, :-1])  # the original is not modified
    with pytest.raises(ValueError, match="value"):
        D.plant_outlier_channel(m, -1.0)
    with pytest.raises(ValueError, match="model"):
        D.plant_outlier_channel(torch.nn.Linear(2, 2), 10.0)


def test_policy_selection_profits():
    torch.manual_seed(0)
    pol = D.PolicyCNN(3, 4).eval()
    x = torch.rand(5, 1, 8, 8)
    opts = [3, 4, 5, 6]
    with torch.no_grad():
        logits = pol(x)
    assert torch.equal(D.policy_selection(pol, x, opts, 13, profit="logits"), D.mckp_select(logits, opts, 13))
    assert torch.equal(D.policy_selection(pol, x, opts, 13, profit="softmax"),
                       D.mckp_select(torch.softmax(logits, -1), opts, 13))
    with pytest.raises(ValueError, match="profit"):
        D.policy_selection(pol, x, opts, 13, profit="argmax")


def _tiny_pair(tmp_path, kind, freeze_bn=True):
    torch.manual_seed(0)
    m, names = D.make_model("cnn4")
    m.eval()
    X = torch.rand(32, 1, 8, 8)
    cfg = D.PairConfig(options=[3, 4, 5], budget=16, epochs=1, batch_size=16, freeze_bn=freeze_bn)
    return m, names, X, cfg


def test_train_or_load_pair_round_trip_and_frozen_bn(tmp_path):
    m, names, X, cfg = _tiny_pair(tmp_path, "robust")
    stats = m.bns[1].running_mean.clone()
    path = tmp_path / "pair.pt"
    pr, loaded = D.train_or_load_pair(m, names, X, "detrimental", cfg, path)
    assert not loaded and path.exists() and len(pr.history) == 1
    assert torch.equal(pr.net.backbone.bns[1].running_mean, stats)  # freeze_bn: statistics untouched
    assert set(pr.history[0]) == set(D.HISTORY_KEYS) and 0 <= pr.history[0]["q_agree"] <= 100
    pr2, loaded2 = D.train_or_load_pair(m, names, X, "detrimental", cfg, path)
    assert loaded2
    assert [h[k] for h in pr2.history for k in D.HISTORY_KEYS] == pytest.approx(
        [h[k] for h in pr.history for k in D.HISTORY_KEYS])  # the training curve travels with the checkpoint
    assert torch.equal(D.pair_selection(pr, X), D.pair_selection(pr2, X))
    assert torch.equal(D.predict(pr.net, X, D.pair_selection(pr, X)), D.predict(pr2.net, X, D.pair_selection(pr2, X)))
    cfg_live = D.PairConfig(options=[3, 4, 5], budget=16, epochs=1, batch_size=16, freeze_bn=False)
    pr3 = D.train_pair(m, names, X, "robust", cfg_live)
    assert not torch.equal(pr3.net.backbone.bns[1].running_mean, stats)
    assert D.config_tag(cfg) != D.config_tag(cfg_live)
    with pytest.raises(ValueError, match="profit"):
        D.train_pair(m, names, X, "robust", D.PairConfig(options=[3, 4, 5], budget=16, profit="probs"))


def test_pair_row_keys_and_ranges(tmp_path):
    m, names, X, cfg = _tiny_pair(tmp_path, "robust")
    y = torch.randint(0, 10, (32,))
    R = D.train_pair(m, names, X, "robust", cfg)
    Dp = D.train_pair(m, names, X, "detrimental", cfg)
    row = D.pair_row(R, Dp, X, y)
    assert set(row) == {"R_fp", "R_drop", "D_fp", "D_drop", "D_random_drop",
                        "distinct_allocations_R", "distinct_allocations_D"}
    assert 0 <= row["R_fp"] <= 100 and 1 <= row["distinct_allocations_D"] <= 32
    other = D.PairConfig(options=[3, 4, 5], budget=15, epochs=1, batch_size=16)
    Dp.cfg = other
    with pytest.raises(ValueError, match="budget"):
        D.pair_row(R, Dp, X, y)


def test_budget_letters_shift_for_option_sets_II_III():
    assert D.budget_for(4, "A", D.OPTION_SETS["I"]) == 16
    assert D.budget_for(4, "A", D.OPTION_SETS["II"]) == 20
    assert D.budget_for(4, "A", D.OPTION_SETS["III"]) == 20  # every layer exactly 5 bits
    assert D.budget_for(6, "B", D.OPTION_SETS["I"]) == 33
    with pytest.raises(ValueError, match="infeasible"):
        D.budget_for(4, 2.0, D.OPTION_SETS["I"])


def test_all_options_quantizer_matches_one_option_at_a_time_values_and_gradients():
    torch.manual_seed(0)
    opts = D.OPTION_SETS["I"]
    x = (torch.randn(5, 3, 4, 4) * torch.tensor([0.1, 1.0, 30.0, 2.0, 0.5]).reshape(-1, 1, 1, 1)).relu()
    x[1] = 0.0  # a constant example
    x.requires_grad_(True)
    qs = D.dynamic_fake_quantize_options(x, opts)
    assert qs.shape == (len(opts),) + x.shape
    w = torch.rand(len(opts))
    (qs * w.reshape(-1, 1, 1, 1, 1)).sum().backward()
    g_all = x.grad.clone()
    x.grad = None
    ref = torch.stack([D.dynamic_fake_quantize(x, b) for b in opts])
    assert torch.equal(qs.detach(), ref.detach())  # bit for bit, every option
    (ref * w.reshape(-1, 1, 1, 1, 1)).sum().backward()
    assert torch.allclose(g_all, x.grad, rtol=1e-5, atol=1e-6)  # the min/max path included
    with pytest.raises(ValueError, match="options"):
        D.dynamic_fake_quantize_options(x, [3, 3])


def test_training_hook_equals_the_per_option_sum_bit_for_bit():
    """The vectorized hook (every option, for the policy's gradient) gives the same outputs and
    gradients as quantizing option by option, so training is unchanged by the speed-up."""
    torch.manual_seed(1)
    m, names = D.make_model("res6")
    m.eval()
    opts = D.OPTION_SETS["I"]
    X = torch.rand(16, 1, 8, 8)
    scores = torch.randn(16, len(names), len(opts), requires_grad=True)
    net = D.QuantPoints(m, names, opts)
    sel = D.ste_select(scores, opts, D.budget_for(len(names), "B", opts))
    out = net(X, sel)
    out.square().sum().backward()
    g_scores, g_w = scores.grad.clone(), m.convs[2].weight.grad.clone()
    # reference: the same network with the sum over options written out
    scores.grad = None
    m.zero_grad()
    m2, _ = D.make_model("res6")
    m2.load_state_dict(m.state_dict())
    m2.eval()
    acts = {}

    def hook_for(l):
        def hook(_m, _i, a):
            w = sel[:, l, :]
            return sum(w[:, k].reshape(-1, 1, 1, 1) * D.dynamic_fake_quantize(a, b) for k, b in enumerate(opts))
        return hook
    mods = dict(m2.named_modules())
    for l, n in enumerate(names):
        acts[n] = mods[n].register_forward_hook(hook_for(l))
    sel = D.ste_select(scores, opts, D.budget_for(len(names), "B", opts))
    out2 = m2(X)
    out2.square().sum().backward()
    assert torch.equal(out, out2)
    assert torch.equal(m2.convs[2].weight.grad, g_w)
    assert torch.equal(scores.grad, g_scores)
