"""Tests for lecturelib.granularity: group quantization, VS-Quant and MX against brute-force loops,
effective bits against the lecture's table, and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from lecturelib import granularity as G
from lecturelib.lecture import W_LECTURE

HSET = settings(max_examples=40, deadline=None, derandomize=True)

# no subnormals for the integer schemes: quantizers' constant-block rule (S = |c|) overflows 1/S there
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
# magnitudes over many binades (and exact zeros) so the MX exponent logic is exercised
wide = st.one_of(
    st.just(0.0),
    st.builds(lambda s, m, e: s * m * 2.0**e, st.sampled_from([-1.0, 1.0]), st.floats(1.0, 1.999),
              st.integers(-140, 20)).map(lambda v: float(np.float32(v))),
    finite,
)


def matrices(col_multiple, max_rows=3, max_mult=4, elements=finite):
    shapes = st.tuples(st.integers(1, max_rows), st.integers(1, max_mult).map(lambda k: k * col_multiple))
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=elements)).map(torch.from_numpy)


# ----------------------------------------------------------------------------- data types, formats
@pytest.mark.parametrize("name, bits", [("INT4", 4), ("UINT4", 4), ("INT8", 8), ("FP16", 16), ("BF16", 16),
                                        ("FP32", 32), ("S1M2", 3), ("S1M4", 5), ("S1M7", 8), ("E8M0", 8),
                                        ("E1M0", 1), ("S1E2M1", 4), ("S1E4M3", 8)])
def test_dtype_bits(name, bits):
    assert G.dtype_bits(name) == bits


@pytest.mark.parametrize("bad", ["INT0", "FP8", "S2M3", "X4", "", "int4", 4, None, "INT33"])
def test_dtype_bits_rejects_unknown(bad):
    with pytest.raises(ValueError, match="dtype"):
        G.dtype_bits(bad)


def test_lecture_table_effective_bits():
    # the slide: 4 + 16/N (N >> 16 -> 4), VS-Quant 4 + 4/16 + 16/N -> 4.25, MX4/6/9 = 4, 6, 9
    assert G.effective_bits(G.get_format("per_channel_int4"), channel_size=128) == 4 + 16 / 128
    assert G.effective_bits(G.get_format("per_channel_int4"), channel_size=math.inf) == 4.0
    assert G.effective_bits(G.get_format("vsquant"), channel_size=math.inf) == 4.25
    assert G.effective_bits(G.get_format("vsquant"), channel_size=128) == 4.375
    assert [G.effective_bits(G.get_format(f"mx{k}")) for k in (4, 6, 9)] == [4.0, 6.0, 9.0]
    assert G.effective_bits_expr(G.get_format("mx4")) == "3 + 1/2 + 8/16"
    assert G.effective_bits_expr(G.get_format("vsquant")) == "4 + 4/16 + 16/N"
    assert G.effective_bits_expr(G.get_format("per_channel_int4")) == "4 + 16/N"
    assert [G.get_format(f"mx{k}").name for k in (4, 6, 9)] == ["MX4", "MX6", "MX9"]


@pytest.mark.parametrize("fmt", [G.int_format(4, "tensor"), G.int_format(3, "channel"), G.int_format(4, 16),
                                 G.vsquant_format(), G.mx_format(4)])
@pytest.mark.parametrize("shape", [(3, 32), (5, 64)])
def test_storage_bits_counts_every_scale(fmt, shape):
    rows, n = shape
    assert G.storage_bits(fmt, shape) / (rows * n) == pytest.approx(G.effective_bits(fmt, n, rows * n))


def test_unknown_format_and_missing_sizes():
    with pytest.raises(ValueError, match=r"format must be one of \['mx4', 'mx6', 'mx9', 'per_channel_int4', 'vsquant'\]"):
        G.get_format("mx5")
    with pytest.raises(ValueError, match="format must be one of"):
        G.quantize_format(torch.ones(2, 16), "nvfp4")
    with pytest.raises(ValueError, match="channel_size"):
        G.effective_bits(G.get_format("vsquant"))
    with pytest.raises(ValueError, match="tensor_size"):
        G.effective_bits(G.int_format(4, "tensor"))
    with pytest.raises(ValueError, match="group_size must be a positive int, 'channel' or 'tensor'"):
        G.ScaleLevel(0, "FP16")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        G.ScaleLevel("row", "FP16")
    with pytest.raises(ValueError, match="no simulator"):
        G.quantize_format(torch.ones(2, 16), G.FormatSpec("odd", "UINT4", (G.ScaleLevel(4, "FP16"),)))


# ----------------------------------------------------------------------------- group quantization
def brute_group(W, num_bits, g):
    """Per group: the lecture's S = |r|_max / q_max (constant group: S = |c|, zero: 1); nearest grid point."""
    qmax = 2 ** (num_bits - 1) - 1
    qmin = -qmax - 1
    scales = np.zeros(W.shape, dtype=np.float64)
    best = np.zeros(W.shape, dtype=np.float64)
    Wn = W.numpy().astype(np.float64)
    for r in range(W.shape[0]):
        for c0 in range(0, W.shape[1], g):
            grp = Wn[r, c0:c0 + g]
            if grp.min() == grp.max():
                S = abs(grp[0]) or 1.0
            else:
                S = float(np.float32(max(abs(grp.min()), abs(grp.max())) / qmax))
            grid = S * np.arange(qmin, qmax + 1)
            for k, x in enumerate(grp):
                best[r, c0 + k] = np.abs(grid - x).min()
            scales[r, c0:c0 + g] = S
    return scales, best


def assert_on_grid_and_nearest(W, W_fq, scales, best, qmin, qmax):
    S = torch.from_numpy(scales)
    codes = W_fq.double() / S
    assert torch.allclose(codes, codes.round(), atol=1e-3), "not a grid point"
    assert bool(((codes.round() >= qmin) & (codes.round() <= qmax)).all())
    dist = (W.double() - W_fq.double()).abs()
    assert bool((dist <= torch.from_numpy(best) + 1e-5 * S).all()), "not the nearest grid point"


@HSET
@given(W=matrices(8), num_bits=st.integers(2, 8), data=st.data())
def test_group_quantize_is_nearest_point_of_each_groups_grid(W, num_bits, data):
    g = data.draw(st.sampled_from([d for d in (1, 2, 4, 8, 16, 32) if W.shape[1] % d == 0]))
    W_fq = G.group_fake_quantize(W, num_bits, g)
    scales, best = brute_group(W, num_bits, g)
    assert_on_grid_and_nearest(W, W_fq, scales, best, -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match=r"group_size must divide the row length 12 \(allowed: \[1, 2, 3, 4, 6, 12\]\), got 5"):
        G.group_fake_quantize(torch.randn(2, 12), 4, 5)
    with pytest.raises(ValueError, match="group_size must divide"):
        G.quantize_format(torch.randn(2, 12), G.int_format(4, 8))
    with pytest.raises(ValueError, match="2-D"):
        G.group_fake_quantize(torch.randn(2, 3, 4), 4, 2)
    with pytest.raises(ValueError, match="num_bits"):
        G.group_fake_quantize(torch.randn(2, 4), 1, 2)


def test_group_size_n_is_per_channel_and_group_beats_it_on_the_lecture_matrix():
    per_channel = G.group_fake_quantize(W_LECTURE, 2, 4)
    assert (W_LECTURE - per_channel).norm().item() == pytest.approx(2.08, abs=0.005)
    assert (W_LECTURE - G.group_fake_quantize(W_LECTURE, 2, 2)).norm() < (W_LECTURE - per_channel).norm()


def test_format_per_channel_matches_torch_with_fp16_scales():
    torch.manual_seed(0)
    W = torch.randn(6, 32)
    scale = (W.abs().amax(dim=1) / 7).half().float()
    ref = torch.fake_quantize_per_channel_affine(W, scale, torch.zeros(6, dtype=torch.int32), 0, -8, 7)
    assert torch.equal(G.quantize_format(W, G.int_format(4, "channel")), ref)
    scale_t = (W.abs().max() / 7).half().float()
    ref_t = torch.fake_quantize_per_tensor_affine(W, scale_t.item(), 0, -8, 7)
    assert torch.equal(G.quantize_format(W, G.int_format(4, "tensor")), ref_t)


# ----------------------------------------------------------------------------- VS-Quant
def brute_vsquant(W, num_bits, v, M):
    """Loops over channels and vectors, float32 arithmetic as the paper's max calibration does it."""
    qmax = 2 ** (num_bits - 1) - 1
    rows, n = W.shape
    Wn = W.numpy()
    s_q = np.zeros((rows, n // v), dtype=np.int64)
    gamma = np.zeros(rows, dtype=np.float32)
    scales = np.zeros((rows, n), dtype=np.float64)
    best = np.zeros((rows, n), dtype=np.float64)
    for r in range(rows):
        s_v = [np.float32(np.abs(Wn[r, j * v:(j + 1) * v]).max() / qmax) for j in range(n // v)]
        s_max = max(s_v)
        gam = np.float32(s_max / (2**M - 1)) if s_max > 0 else np.float32(1.0)
        gam = np.float32(np.float16(max(gam, 2.0**-24)))
        gamma[r] = gam
        for j, s in enumerate(s_v):
            s_q[r, j] = min(max(int(np.round(np.float32(s) / gam)), 1), 2**M - 1)
            S = float(np.float32(gam * np.float32(s_q[r, j])))
            grid = S * np.arange(-qmax - 1, qmax + 1)
            for k in range(j * v, (j + 1) * v):
                best[r, k] = np.abs(grid - float(Wn[r, k])).min()
            scales[r, j * v:(j + 1) * v] = S
    return s_q, gamma, scales, best


@HSET
@given(W=matrices(16, max_mult=3), num_bits=st.integers(2, 6), M=st.integers(2, 6))
def test_vsquant_matches_brute_force(W, num_bits, M):
    res = G.vsquant_quantize(W, num_bits, 16, M)
    s_q, gamma, scales, best = brute_vsquant(W, num_bits, 16, M)
    assert torch.equal(res.s_q.long(), torch.from_numpy(s_q))
    assert torch.equal(res.gamma.flatten(), torch.from_numpy(gamma))
    assert_on_grid_and_nearest(W, res.W_fq, scales, best, -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1)
    assert bool(((res.s_q >= 1) & (res.s_q <= 2**M - 1)).all())


def test_vsquant_between_per_channel_and_float_group_scales():
    torch.manual_seed(1)
    W = torch.randn(16, 128) * torch.rand(1, 128) * 3  # columns of very different size
    err = lambda W_fq: (W - W_fq).norm().item()  # noqa: E731
    e_vs = err(G.vsquant_quantize(W).W_fq)
    assert err(G.group_fake_quantize(W, 4, 16)) <= e_vs < err(G.group_fake_quantize(W, 4, 128))
    assert e_vs == err(G.quantize_format(W, "vsquant"))


def test_vsquant_bad_vector_size():
    with pytest.raises(ValueError, match=r"vector_size must divide the row length 24 \(allowed"):
        G.vsquant_quantize(torch.randn(2, 24), 4, 16)


# ----------------------------------------------------------------------------- MX
def brute_mx(W, m, k2, d2, k1, d1):
    """Element by element with math.frexp, and the nearest of all 2^(m+1) - 1 codes (ties to even)."""
    rows, n = W.shape
    out = np.zeros((rows, n), dtype=np.float64)
    bias = 2 ** (d1 - 1) - 1
    cmax = 2**m - 1

    def exp_of(x):
        return math.frexp(abs(x))[1] - 1 if x != 0 else -(10**9)

    for r in range(rows):
        row = [float(v) for v in W[r].tolist()]
        for b0 in range(0, n, k1):
            E = min(max(max(exp_of(x) for x in row[b0:b0 + k1]), -bias), bias)
            for s0 in range(b0, b0 + k1, k2):
                tau = min(max(E - max(exp_of(x) for x in row[s0:s0 + k2]), 0), 2**d2 - 1)
                step = 2.0 ** (E - tau - (m - 1))
                for i in range(s0, s0 + k2):
                    best = min(range(-cmax, cmax + 1), key=lambda c: (abs(row[i] - c * step), c % 2))
                    out[r, i] = best * step
    return torch.from_numpy(out).float()


@HSET
@given(W=matrices(16, elements=wide), m=st.sampled_from([2, 4, 7]))
def test_mx_matches_brute_force(W, m):
    fmt = G.mx_format(m)
    assert torch.equal(G.mx_quantize(W, fmt).W_fq, brute_mx(W, m, 2, 1, 16, 8))


@HSET
@given(W=matrices(8, elements=wide), m=st.integers(1, 5), d1=st.integers(1, 4), d2=st.integers(1, 3))
def test_mx_other_shapes_match_brute_force(W, m, d1, d2):
    # small shared exponents (d1 = 1..4) saturate large values and flush small ones: the clamps
    fmt = G.mx_format(m, subblock=4, block=8, micro_exp_bits=d2, shared_exp_bits=d1)
    assert torch.equal(G.mx_quantize(W, fmt).W_fq, brute_mx(W, m, 4, d2, 8, d1))


@HSET
@given(W=matrices(16, elements=wide), m=st.integers(1, 7))
def test_block_floating_point_is_mx_without_micro_exponent(W, m):
    fmt = G.mx_format(m, micro_exp_bits=0)
    assert fmt.name == f"BFP S1M{m}/16" and G.effective_bits(fmt) == 1 + m + 0.5
    r = G.mx_quantize(W, fmt)
    assert torch.equal(r.W_fq, brute_mx(W, m, 16, 0, 16, 8))
    assert bool((r.micro_exp == 0).all())


def test_mx_worked_example():
    # block of 16: max |x| = 3.0 -> E = 1; pair (0.3, 0.2) has exponents -2, -3 -> tau = 1 (shifted);
    # MX4: step 2^(1 - 0 - 1) = 1 for unshifted pairs, 0.5 for shifted ones; codes up to 3
    x = torch.tensor([[3.0, -1.2, 0.3, 0.2] + [0.0] * 12])
    r = G.mx_quantize(x, "mx4")
    assert r.shared_exp.tolist() == [[1]]
    assert r.micro_exp[0, :2].tolist() == [0, 1]
    assert r.code[0, :4].tolist() == [3, -1, 1, 0]
    assert r.W_fq[0, :4].tolist() == [3.0, -1.0, 0.5, 0.0]
    # 3.9 rounds to 4 steps but saturates at code 3
    assert G.mx_quantize(torch.tensor([[3.9] + [0.0] * 15]), "mx4").W_fq[0, 0].item() == 3.0


def test_mx_represents_its_own_grid_exactly_and_more_bits_help():
    torch.manual_seed(2)
    W = torch.randn(8, 64)
    for name in ("mx4", "mx6", "mx9"):
        W_fq = G.mx_quantize(W, name).W_fq
        assert torch.equal(G.mx_quantize(W_fq, name).W_fq, W_fq)
    errs = [(W - G.mx_quantize(W, name).W_fq).norm().item() for name in ("mx4", "mx6", "mx9")]
    assert errs[0] > errs[1] > errs[2]
    assert torch.equal(G.mx_quantize(torch.zeros(2, 16)).W_fq, torch.zeros(2, 16))


def test_mx_bad_input():
    with pytest.raises(ValueError, match=r"the MX block size k1 must divide the row length 24 \(allowed"):
        G.mx_quantize(torch.randn(2, 24), "mx6")
    with pytest.raises(ValueError, match="an MX format needs"):
        G.mx_quantize(torch.randn(2, 16), G.int_format(4, 16))
    with pytest.raises(ValueError, match="an MX format needs"):
        G.mx_quantize(torch.randn(2, 16), G.mx_format(4, subblock=3, block=16))
    with pytest.raises(ValueError, match="format must be one of"):
        G.mx_quantize(torch.randn(2, 16), "mx8")


# ----------------------------------------------------------------------------- models
def test_fold_batchnorm_matches_eval_composition():
    torch.manual_seed(3)
    lin, bn = nn.Linear(5, 4), nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(7, 5)
    state = torch.get_rng_state()
    assert torch.allclose(G.fold_batchnorm(lin, bn)(x), bn(lin(x)), atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)  # folding draws no random numbers
    seq = nn.Sequential(lin, bn, nn.ReLU(), nn.Linear(4, 2)).eval()
    folded = G.fold_batchnorm_sequential(seq)
    assert [type(m) for m in folded] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.allclose(folded(x), seq(x), atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        G.fold_batchnorm(bn, lin)


def test_quantize_model_weights_leaves_the_model_alone_and_sweeps():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.clone() for p in model.parameters()]
    model_q, stats = G.quantize_model_weights(model, G.int_format(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(model_q[0].weight, G.group_fake_quantize(model[0].weight.detach(), 4, 8, "FP16"))
    assert stats["effective_bits"] == 4 + 16 / 8
    X, y = torch.randn(20, 32), torch.randint(0, 3, (20,))
    rows = G.sweep_formats(model, [G.int_format(8, "channel"), G.mx_format(7)], X, y)
    assert [r["scheme"] for r in rows] == ["per-channel INT8", "MX9"]
    assert set(rows[0]) == {"scheme", "effective_bits", "rel_error", "accuracy"}
    with pytest.raises(ValueError, match="layers must be indices in 0..1"):
        G.quantize_model_weights(model, "mx6", layers=[2])


def test_pareto_front_brute_force():
    pts = [(4.0, 0.3), (4.1, 0.2), (5.0, 0.25), (3.0, 0.5), (6.0, 0.1), (6.0, 0.1)]
    front = G.pareto_front(pts)
    assert sorted(front) == [0, 1, 3, 4, 5]
    assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)
