"""Tests for lecturelib.intervals: every bound checked by sampling the deployed networks (10^4 states
per box), the verifier's promises (no unsound certificate, no fake counterexample), and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib import intervals as iv
from lecturelib import rl

HSET = settings(max_examples=25, deadline=None, derandomize=True)
ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 10_000


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return rl.load_or_train(ROOT / "data" / "cartpole_policy.pt")[0]


@pytest.fixture(scope="module")
def states(policy):
    return rl.rollout(rl.greedy(policy), range(2)).states


@pytest.fixture(scope="module")
def nets(policy):
    calib = rl.rollout(rl.greedy(policy), range(1000, 1004)).states
    return {
        "float": iv.from_float(policy),
        "dynamic": iv.from_dynamic(rl.dynamic_int8(policy)),
        "static": iv.from_static(rl.static_int8(policy, calib)),
        "torchao": iv.from_torchao(rl.torchao_int8(policy)),
        "4-bit": iv.from_lowbit(rl.lowbit_ptq(policy, 4, calib)),
        "2-bit": iv.from_lowbit(rl.lowbit_ptq(policy, 2, calib)),
    }


def samples(lo: torch.Tensor, hi: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n uniform states in each box plus its corners, (N, n + 2^d, d), in the boxes' dtype."""
    g = torch.Generator().manual_seed(seed)
    d = lo.shape[1]
    corners = torch.tensor(list(np.ndindex(*(2,) * d)), dtype=lo.dtype)
    u = torch.cat([corners.expand(len(lo), -1, -1), torch.rand(len(lo), n, d, generator=g, dtype=lo.dtype)], dim=1)
    return (lo[:, None, :] + (hi - lo)[:, None, :] * u).minimum(hi[:, None, :])


# ----------------------------------------------------------------------------- primitives
@HSET
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000), st.floats(0.0, 2.0))
def test_affine_bounds_contain_samples(n_in, n_out, seed, radius):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(n_out, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, generator=g, dtype=torch.float64)
    c = torch.randn(3, n_in, generator=g, dtype=torch.float64)
    lo, hi = c - radius, c + radius
    yl, yu = iv.affine_bounds(W, b, lo, hi)
    x = samples(lo, hi, 2000, seed)
    y = x @ W.T + b
    assert (yl <= yu).all()
    assert (y >= yl[:, None, :]).all() and (y <= yu[:, None, :]).all()
    # exact: a corner attains each bound
    yl0, yu0 = iv.affine_bounds(W, b, lo, hi, slack=False)
    assert torch.allclose(y.amin(1), yl0, atol=1e-9) and torch.allclose(y.amax(1), yu0, atol=1e-9)


@HSET
@given(st.sampled_from(["static", "dynamic", "symmetric"]), st.integers(2, 8), st.integers(0, 10_000),
       st.floats(0.001, 0.5))
def test_quantizer_bounds_contain_samples(kind, bits, seed, width):
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5
    hi = lo + width * torch.rand(4, 6, generator=g, dtype=torch.float64)
    qmin, qmax = rl.qrange(bits)
    if kind == "static":
        q = iv.ActQuant("static", qmin, qmax, scale=0.7 / (qmax - qmin), zero_point=int(torch.randint(qmin, qmax, (1,))))
    else:
        q = iv.ActQuant("dynamic", 0 if kind == "dynamic" else qmin, (qmax - qmin) if kind == "dynamic" else qmax,
                        symmetric=kind == "symmetric")
    ql, qu, dl, du = q.bounds(lo, hi)
    x = samples(lo, hi, 2000, seed)
    y = q.apply(x.reshape(-1, 6)).reshape(x.shape)
    assert (ql <= qu).all() and (dl <= du).all()
    assert (y >= ql[:, None, :] - 1e-12).all() and (y <= qu[:, None, :] + 1e-12).all()
    assert (y - x >= dl[:, None, :] - 1e-12).all() and (y - x <= du[:, None, :] + 1e-12).all()


@pytest.mark.parametrize("name", ["float", "dynamic", "static", "torchao", "4-bit", "2-bit"])
@pytest.mark.parametrize("half_width", [0.002, 0.01, 0.05])
def test_deployed_logits_inside_bounds_at_every_layer(nets, states, name, half_width):
    net = nets[name]
    lo, hi = iv.boxes_around(states[::250], half_width)
    lb = iv.layer_bounds(net, lo, hi)
    for layer in ("input", "pre", "hidden", "logits"):
        low, up = getattr(lb, layer)
        assert (low <= up).all(), layer
    x = samples(lo, hi, N_SAMPLES)
    y = net.rows_logits(x.reshape(-1, 4)).reshape(len(lo), -1, 2).double()
    yl, yu = lb.logits
    assert (y >= yl[:, None, :]).all() and (y <= yu[:, None, :]).all()
    ml, mu = iv.margin_bounds(net, lo, hi)
    m = y[..., 1] - y[..., 0]
    assert (m >= ml[:, None, 1, 0]).all() and (m <= mu[:, None, 1, 0]).all()


@pytest.mark.parametrize("name", ["dynamic", "static", "torchao", "4-bit"])
def test_differential_bounds_contain_sampled_differences(nets, states, name):
    f, g = nets["float"], nets[name]
    lo, hi = iv.boxes_around(states[::100], 0.02)
    db = iv.diff_margin_bounds(f, g, lo, hi)
    x = samples(lo, hi, N_SAMPLES // 4)
    yf = f.rows_logits(x.reshape(-1, 4)).reshape(len(lo), -1, 2).double()
    yg = g.rows_logits(x.reshape(-1, 4)).reshape(len(lo), -1, 2).double()
    mf, mg = yf[..., 1] - yf[..., 0], yg[..., 1] - yg[..., 0]
    assert (mf >= db.f_lower[:, None, 1, 0]).all() and (mf <= db.f_upper[:, None, 1, 0]).all()
    assert (mg >= db.g_lower[:, None, 1, 0]).all() and (mg <= db.g_upper[:, None, 1, 0]).all()
    assert (mg - mf >= db.delta_lower[:, None, 1, 0]).all() and (mg - mf <= db.delta_upper[:, None, 1, 0]).all()


def test_simulation_agrees_with_deployed_modules(nets, states):
    for name in ("dynamic", "static", "torchao", "4-bit"):
        g = nets[name]
        assert torch.equal(g.simulate(states[::10]).argmax(1), g.decide(states[::10])), name


# ----------------------------------------------------------------------------- verifier
def test_identical_networks_never_give_a_counterexample(nets, states):
    f = nets["float"]
    lo, hi = iv.boxes_around(states[::50], 0.03)
    res = iv.certify_many(f, f, lo, hi, iv.CertifyConfig(max_depth=6))
    assert not (res.verdicts == iv.COUNTEREXAMPLE).any()
    assert (res.verdicts == iv.CERTIFIED).any()


@pytest.mark.parametrize("name", ["dynamic", "static", "4-bit"])
def test_certificates_are_sound_and_counterexamples_real(nets, states, name):
    f, g = nets["float"], nets[name]
    lo, hi = iv.boxes_around(states[::25], 0.01)
    res = iv.certify_many(f, g, lo, hi)
    assert iv.check_certificates(f, g, lo, hi, res.verdicts, n_samples=256) == 0
    cex = res.verdicts == iv.COUNTEREXAMPLE
    assert cex.any() and (res.verdicts == iv.CERTIFIED).any()
    x = res.counterexamples[cex]
    assert (f.decide(x) != g.decide(x)).all()
    assert ((x >= lo[cex]) & (x <= hi[cex])).all()
    assert torch.isnan(res.counterexamples[~cex]).all()


def test_sub_box_of_certified_box_is_certified(nets, states):
    f, g = nets["float"], nets["4-bit"]
    lo, hi = iv.boxes_around(states[::10], 0.01)
    res = iv.certify_many(f, g, lo, hi)
    ok = res.verdicts == iv.CERTIFIED
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(int(ok.sum()), 4, generator=gen), torch.rand(int(ok.sum()), 4, generator=gen)
    sub_lo = lo[ok] + (hi[ok] - lo[ok]) * torch.minimum(a, b)
    sub_hi = lo[ok] + (hi[ok] - lo[ok]) * torch.maximum(a, b)
    assert (iv.certify_many(f, g, sub_lo, sub_hi).verdicts == iv.CERTIFIED).all()


def test_box_with_a_known_disagreement_is_never_certified(nets, policy):
    f = nets["float"]
    # g: the float policy with the output bias shifted, so its boundary moves off f's
    g = iv.from_float(policy, "shifted")
    g.b2 = g.b2 + torch.tensor([0.0, 0.3], dtype=torch.float64)
    g.module = None
    x = torch.linspace(-0.3, 0.3, 4001)[:, None] * torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    dis = x[f.simulate(x).argmax(1) != g.simulate(x).argmax(1)]
    assert len(dis) > 0
    lo, hi = dis[:50] - 0.005, dis[:50] + 0.005
    res = iv.certify_many(f, g, lo, hi)
    assert not (res.verdicts == iv.CERTIFIED).any()
    assert (res.verdicts == iv.COUNTEREXAMPLE).all()
    c = iv.certify(f, g, (lo[0], hi[0]))
    assert c.verdict == "COUNTEREXAMPLE" and c.counterexample.shape == (4,)


def test_work_per_box_is_capped(nets, states):
    """A box that can be neither certified nor refuted stops at its own piece budget, as UNKNOWN,
    instead of bisecting without end (the cause of an earlier blow-up); the depth cap holds too,
    and a hard box does not change the verdicts of the easy boxes next to it."""
    f = nets["float"]
    x = torch.linspace(-0.3, 0.3, 4001)[:, None] * torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    m = f.simulate(x)
    on_boundary = x[int((m[:, 1] - m[:, 0]).abs().argmin())]
    # f against itself on a box that f's decision boundary crosses: no piece that touches the
    # boundary can be certified, and no counterexample exists
    lo, hi = (on_boundary - 0.01)[None].repeat(3, 1), (on_boundary + 0.01)[None].repeat(3, 1)
    for max_pieces in (1, 16, 200):
        res = iv.certify_many(f, f, lo, hi, iv.CertifyConfig(max_pieces=max_pieces, max_depth=60))
        assert (res.verdicts == iv.UNKNOWN).all()
        assert res.leaves <= max_pieces * len(lo)
    res = iv.certify_many(f, f, lo, hi, iv.CertifyConfig(max_depth=3, max_pieces=10**6))
    assert (res.verdicts == iv.UNKNOWN).all() and res.leaves <= len(lo) * (1 + 2 + 4 + 8)
    cfg = iv.CertifyConfig(max_pieces=64)
    easy_lo, easy_hi = iv.boxes_around(states[::100], 0.005)
    alone = iv.certify_many(f, f, easy_lo, easy_hi, cfg).verdicts
    mixed = iv.certify_many(f, f, torch.cat([lo, easy_lo]), torch.cat([hi, easy_hi]), cfg).verdicts
    assert (mixed[:3] == iv.UNKNOWN).all() and torch.equal(mixed[3:], alone) and (alone == iv.CERTIFIED).any()


@HSET
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_argmax_invariant_under_softmax(k, seed):
    z = torch.randn(100, k, generator=torch.Generator().manual_seed(seed)) * 10
    assert torch.equal(z.softmax(1).argmax(1), z.argmax(1))


def test_certified_action():
    fl = torch.tensor([[[0.0, 0.3], [-0.5, 0.0]], [[0.0, -0.1], [0.2, 0.0]], [[0.0, 0.3], [-0.4, 0.0]]])
    gl = torch.tensor([[[0.0, 0.1], [-0.2, 0.0]], [[0.0, -0.3], [0.1, 0.0]], [[0.0, -0.01], [-0.2, 0.0]]])
    assert iv.certified_action(fl, gl).tolist() == [0, 1, -1]


def test_plain_ibp_decides_no_more_than_the_verifier(nets, states):
    f, g = nets["float"], nets["dynamic"]
    lo, hi = iv.boxes_around(states[::50], 0.01)
    base = iv.plain_ibp(f, g, lo, hi)
    ours = iv.certify_many(f, g, lo, hi).verdicts
    assert ((base == iv.CERTIFIED) <= (ours == iv.CERTIFIED)).all()
    assert (ours != iv.UNKNOWN).sum() >= (base != iv.UNKNOWN).sum()


def test_study_recipe_is_unsound(nets, states):
    f = nets["float"]
    lo, hi = iv.boxes_around(states[::100], 0.05)
    sl, su = iv.study_bounds(f.W1, f.b1, f.W2, f.b2, lo, hi)
    y = f.simulate(samples(lo, hi, 500).reshape(-1, 4)).reshape(len(lo), -1, 2)
    low, up = torch.minimum(sl, su), torch.maximum(sl, su)
    assert ((y < low[:, None, :]) | (y > up[:, None, :])).any()


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises(nets):
    f, g = nets["float"], nets["4-bit"]
    ok_lo, ok_hi = torch.zeros(1, 4), torch.ones(1, 4)
    with pytest.raises(ValueError, match="lo <= hi"):
        iv.certify(f, g, (torch.ones(4), torch.zeros(4)))
    with pytest.raises(ValueError, match="dimension 4"):
        iv.certify_many(f, g, torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite"):
        iv.certify(f, g, (torch.tensor([0.0, float("nan"), 0.0, 0.0]), torch.ones(4)))
    with pytest.raises(ValueError, match="finite"):
        iv.layer_bounds(f, torch.full((1, 4), -float("inf")), ok_hi)
    with pytest.raises(ValueError, match="pair"):
        iv.certify(f, g, torch.zeros(4))
    with pytest.raises(ValueError, match="half_width"):
        iv.boxes_around(torch.zeros(2, 4), -0.1)
    with pytest.raises(ValueError, match="shape"):
        iv.boxes_around(torch.zeros(2, 5), 0.1)
    with pytest.raises(ValueError, match="float network"):
        iv.diff_margin_bounds(g, f, ok_lo, ok_hi)
    with pytest.raises(ValueError, match="kind"):
        iv.ActQuant("weird", 0, 255)
    with pytest.raises(ValueError, match="scale"):
        iv.ActQuant("static", 0, 255, scale=0.0)
    with pytest.raises(ValueError, match="max_depth"):
        iv.certify_many(f, g, ok_lo, ok_hi, iv.CertifyConfig(max_depth=-1))
    with pytest.raises(ValueError, match="max_pieces"):
        iv.certify_many(f, g, ok_lo, ok_hi, iv.CertifyConfig(max_pieces=0))


def test_explorer_is_built_by_the_helper_and_redraws(nets, states, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lecturelib import explorers as ex

    box = iv.explorer(nets["float"], {"4-bit": nets["4-bit"], "static": nets["static"]}, states[::100])
    assert ex.EXPLORER_CLASS in box._dom_classes
    box.controls["index"].value = 1
    box.controls["half_width"].value = 0.05
    box.controls["variant"].value = "static"
    assert "cannot be drawn" not in capsys.readouterr().out
    plt.close("all")
    with pytest.raises(ValueError, match="nets"):
        iv.explorer(nets["float"], {}, states)
