"""GPTQ against its references: RTN (identity Hessian, no damping) and RTN's error (correlated inputs)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lecturelib import gptq
from lecturelib.quantizers import PerGroup, choose_qparams, fake_quantize


@settings(deadline=None, derandomize=True, max_examples=25)
@given(bits=st.integers(2, 8), group=st.sampled_from([None, 4, 8, 16]), block=st.sampled_from([3, 8, 16]),
       act=st.booleans(), seed=st.integers(0, 10_000))
def test_identity_hessian_zero_damping_is_rtn(bits, group, block, act, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 16, generator=g) * torch.rand(6, 1, generator=g) * 3
    cfg = gptq.GPTQConfig(num_bits=bits, group_size=group, damp=0.0, block_size=block, act_order=act)
    got = gptq.gptq_quantize(W, torch.eye(16), cfg).W_q
    assert torch.equal(got, gptq.rtn_quantize(W, cfg))


def test_rtn_uses_the_quantizers_grid():
    W = torch.randn(4, 32)
    cfg = gptq.GPTQConfig(num_bits=3, group_size=8)
    ref = fake_quantize(W, choose_qparams(W, 3, False, PerGroup(axis=1, group_size=8)))
    assert torch.equal(gptq.rtn_quantize(W, cfg), ref)


@settings(deadline=None, derandomize=True, max_examples=12)
@given(bits=st.integers(2, 4), group=st.sampled_from([None, 16]), act=st.booleans(), seed=st.integers(0, 10_000))
def test_gptq_output_error_at_most_rtn_on_correlated_inputs(bits, group, act, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated features
    W = torch.randn(16, 32, generator=g)
    cfg = gptq.GPTQConfig(num_bits=bits, group_size=group, act_order=act, block_size=8)
    W_g = gptq.gptq_quantize(W, gptq.hessian(X), cfg).W_q
    assert gptq.layer_output_mse(W, W_g, X) <= gptq.layer_output_mse(W, gptq.rtn_quantize(W, cfg), X)


def test_column_update_matches_brute_force_obs():
    # OBS: minimise (w - w')^T H (w - w') with w'_i fixed to q  ->  delta = -(w_i - q) / Hinv_ii * Hinv[:, i]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    H = A @ A.T + 5 * torch.eye(5, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    U = torch.linalg.cholesky(Hinv, upper=True)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    q = torch.round(W[:, 0])
    rest, _ = gptq.column_update(W[:, 1:], W[:, 0], q, U[0])
    ref = W - ((W[:, 0] - q) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
    assert torch.allclose(rest, ref[:, 1:])


def test_hessian_formula():
    X = torch.randn(10, 3)
    assert torch.allclose(gptq.hessian(X), (2 / 10) * X.double().T @ X.double())


def test_quantize_model_in_place_and_reports_both():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    calib = [torch.randn(64, 16) @ torch.randn(16, 16)]
    before = m[0].weight.detach().clone()
    rep = gptq.quantize_model(m, calib, gptq.GPTQConfig(num_bits=3, group_size=16), "gptq")
    assert not torch.equal(before, m[0].weight)
    assert [layer.name for layer in rep.layers] == ["0", "2"]
    assert all(layer.mse_gptq <= layer.mse_rtn for layer in rep.layers)


@pytest.mark.parametrize("kw", [dict(num_bits=1), dict(num_bits=9), dict(group_size=0), dict(damp=-0.1),
                                dict(damp=1.5), dict(block_size=0)])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        gptq.GPTQConfig(**kw)


def test_bad_inputs():
    cfg = gptq.GPTQConfig(num_bits=4, group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        gptq.rtn_quantize(torch.randn(2, 8), cfg)
    with pytest.raises(ValueError, match="H must have shape"):
        gptq.gptq_quantize(torch.randn(2, 8), torch.eye(4), gptq.GPTQConfig())
    with pytest.raises(ValueError, match="method"):
        gptq.quantize_model(nn.Linear(2, 2), [torch.randn(1, 2)], gptq.GPTQConfig(group_size=None), "awq")
    with pytest.raises(ValueError, match="X must"):
        gptq.hessian(torch.randn(3))


def test_captured_inputs_are_what_the_layer_sees_and_the_forward_stops_there():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Tanh())
    batches = [torch.randn(5, 8), torch.randn(3, 8)]
    calls = []
    h = m[3].register_forward_hook(lambda *a: calls.append(1))
    X = gptq._capture_inputs(m, m[2], batches)
    h.remove()
    with torch.no_grad():
        want = torch.cat([torch.relu(m[0](b)) for b in batches])
    assert torch.equal(X, want) and calls == []  # the layers after the captured one never ran


def test_quantize_model_rejects_a_layer_the_forward_does_not_call():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="names"):
        gptq.quantize_model(Partial(), [torch.randn(2, 4)], gptq.GPTQConfig(group_size=None), names=["unused"])


def test_layer_output_mse_against_the_direct_formula():
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(6, 10, generator=g), torch.randn(50, 10, generator=g)
    W_q = W + 1e-3 * torch.randn(6, 10, generator=g)
    ref = float(((X.double() @ W.double().T - X.double() @ W_q.double().T) ** 2).mean())
    assert gptq.layer_output_mse(W, W_q, X) == pytest.approx(ref, rel=1e-4)
