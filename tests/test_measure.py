"""Size accounting against len(torch.save bytes), bit packing against a brute-force unpack, latency stats."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lecturelib import gptq, measure


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(37, 11).state_dict(),
    lambda: measure.DigitsCNN().state_dict(),
    lambda: measure.dynamic_int8(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))).state_dict(),
    lambda: {"a": torch.zeros(0), "b": torch.arange(1000, dtype=torch.int16)},
])
def test_size_account_adds_up_to_serialized_length(make):
    data = measure.serialize(make())
    acc = measure.size_account(data)
    assert acc.storage_bytes + acc.pickle_bytes + acc.container_bytes == acc.total == len(data)
    assert acc.container_bytes >= 0


def test_storage_bytes_equal_memory_bytes_of_float_model():
    sd = measure.DigitsCNN().state_dict()
    assert measure.size_account(measure.serialize(sd)).storage_bytes == measure.memory_bytes(sd)
    assert measure.memory_bytes(sd) == 4 * sum(t.numel() for t in sd.values())


@settings(deadline=None, derandomize=True, max_examples=30)
@given(bits=st.integers(1, 8), n=st.integers(0, 50), seed=st.integers(0, 1000))
def test_pack_codes_roundtrip_and_length(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = measure.pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    stream = np.unpackbits(packed.numpy(), bitorder="little")
    back = [sum(int(stream[i * bits + k]) << k for k in range(bits)) for i in range(n)]
    assert back == codes.tolist()


def test_weight_only_state_size():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32))
    st_ = measure.weight_only_state(m, gptq.GPTQConfig(num_bits=3, group_size=16), ["0"])
    assert st_["0.codes"].numel() == 32 * 64 * 3 // 8
    assert st_["0.scale"].shape == (32, 4) and st_["0.scale"].dtype == torch.float16
    assert measure.memory_bytes(st_) == 32 * 64 * 3 // 8 + 32 * 4 * 3 + 32 * 4


def test_latency_sample_percentiles():
    s = measure.measure_latency(lambda: None, reps=200, warmup=3)
    assert s.times_ms.shape == (200,) and s.p50 <= s.p90
    assert s.percentile(50) == pytest.approx(float(np.median(s.times_ms)))


def test_op_category():
    assert measure.op_category("quantized::linear_dynamic") == "int GEMM / conv"
    assert measure.op_category("aten::_int_mm") == "int GEMM / conv"
    assert measure.op_category("aten::quantize_per_tensor") == "quantize activations"
    assert measure.op_category("torchao::quantize_affine") == "quantize activations"
    assert measure.op_category("torchao::choose_qparams_affine") == "quantize activations"
    assert measure.op_category("aten::dequantize") == "dequantize"
    assert measure.op_category("torchao::dequantize_affine") == "dequantize"
    assert measure.op_category("aten::quantized_max_pool2d") == "other"
    assert measure.op_category("aten::addmm") == "float GEMM / conv"
    assert measure.op_category("aten::_to_copy") == "dtype casts"
    assert measure.op_category("aten::relu") == "other"


class _Ev:
    def __init__(self, name, parent=None):
        self.name, self.cpu_parent = name, parent


def test_event_category_counts_children_of_an_int8_step():
    q = _Ev("torchao::quantize_affine")
    assert measure.event_category(_Ev("aten::mul", q)) == "quantize activations"
    assert measure.event_category(_Ev("aten::copy_", _Ev("aten::to", q))) == "quantize activations"
    assert measure.event_category(_Ev("aten::copy_", _Ev("aten::to"))) == "dtype casts"
    assert measure.event_category(_Ev("aten::addmm", _Ev("aten::linear"))) == "float GEMM / conv"


def test_profile_breakdown_adds_up_and_sees_the_dynamic_int8_kernel():
    m = measure.dynamic_int8(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    x = torch.randn(16, 32)
    b = measure.profile_breakdown(lambda: m(x), reps=3, warmup=1)
    assert set(b.ms) == set(measure.CATEGORIES)
    assert sum(b.ms.values()) == pytest.approx(b.total_ms)
    assert b.ms["int GEMM / conv"] > 0 and b.ms["float GEMM / conv"] == 0
    assert any(name == "quantized::linear_dynamic" for name, _ in b.top_ops)


def test_int8_linear_chain_computes_the_layer():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(24, 64)
    parts = measure.int8_linear_parts(layer, x, reps=2, warmup=0)
    assert set(parts.samples) == {"fp32 F.linear", "fbgemm fused int8", "int8 chain", "quantize activations",
                                  "int GEMM (_int_mm)", "dequantize"}
    # int8 with per-tensor activation and per-row weight scales: error of a few percent of |y|
    y = layer(x).detach()
    assert 0 < parts.max_abs_error < 0.05 * float(y.abs().max())


def test_lm_windows_are_shifted_and_spread():
    tokens = torch.arange(1001)
    x, y = measure.lm_windows(tokens, 10)
    assert x.shape == (100, 10) and torch.equal(y, x + 1)
    xs, ys = measure.lm_windows(tokens, 10, max_windows=4)
    assert xs[:, 0].tolist() == [0, 330, 660, 990] and torch.equal(ys, xs + 1)
    assert measure.lm_windows(tokens, 10, max_windows=500)[0].shape == (100, 10)


def test_torchao_failure_is_returned_not_raised():
    m, err = measure.torchao_variant(nn.Linear(8, 8), "Int8WeightOnlyConfig")
    assert (m is None) == bool(err)


def test_bad_inputs():
    with pytest.raises(ValueError, match="reps"):
        measure.measure_latency(lambda: None, reps=0)
    with pytest.raises(ValueError, match="config"):
        measure.torchao_variant(nn.Linear(2, 2), "Int3Config")
    with pytest.raises(ValueError, match="codes"):
        measure.pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="data"):
        measure.size_account(b"not a zip")
    with pytest.raises(ValueError, match="dtype"):
        measure.cast_variant(nn.Linear(2, 2), torch.int8)
    with pytest.raises(ValueError, match="max_windows"):
        measure.lm_windows(torch.arange(100), 10, max_windows=0)
    with pytest.raises(ValueError, match="x must"):
        measure.int8_linear_parts(nn.Linear(4, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="reps"):
        measure.profile_breakdown(lambda: None, reps=0)


def test_evaluate_lm_against_a_direct_computation():
    torch.manual_seed(0)
    lm = measure.TinyLM(measure.LMConfig(ctx=16, d_model=32, n_heads=2, d_ff=64)).eval()
    tokens = torch.randint(0, 128, (16 * 5 + 1,))
    x, y = measure.lm_windows(tokens, 16)
    e = measure.evaluate_lm(lm, x, y, batch=2)
    with torch.no_grad():
        logits = lm(x)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), y.reshape(-1))
    assert e.perplexity == pytest.approx(float(torch.exp(ce)), rel=1e-5)
    assert e.accuracy == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert e.tokens == 80 and e.window_nll.shape == (5,) and e.last_char_correct.shape == (5,)
    assert e.last_char_correct.tolist() == (logits[:, -1].argmax(-1) == y[:, -1]).tolist()


@pytest.mark.parametrize("make", [
    lambda: measure.DigitsCNN(),
    lambda: measure.dynamic_int8(measure.DigitsCNN()),
    lambda: measure.static_int8(measure.DigitsCNN(), torch.rand(32, 64)),
    lambda: measure.weight_only_state(nn.Sequential(nn.Linear(64, 16)), gptq.GPTQConfig(num_bits=3, group_size=16), ["0"]),
])
def test_bytes_by_dtype_adds_up_to_memory_bytes(make):
    obj = make()
    parts = measure.bytes_by_dtype(obj)
    assert sum(parts.values()) == measure.memory_bytes(obj)
    assert list(parts.values()) == sorted(parts.values(), reverse=True)


def test_bytes_by_dtype_of_dynamic_int8():
    m = measure.dynamic_int8(nn.Sequential(nn.Linear(16, 8)))
    # int8 weight, fp32 bias + an (unused) output scale, an int64 output zero point
    assert measure.bytes_by_dtype(m) == {"qint8": 16 * 8, "float32": 8 * 4 + 4, "int64": 8}


def test_measure_interleaved_visits_every_callable_in_turn():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    out = measure.measure_interleaved(fns, reps=7, warmup=2, rounds=3)
    assert {k: len(s.times_ms) for k, s in out.items()} == {"a": 7, "b": 7}
    # warm-up 2 + 3 timed calls of a, then of b; then 2 and 2 per round
    assert "".join(order) == "aaaaa" + "bbbbb" + "aa" + "bb" + "aa" + "bb"
    with pytest.raises(ValueError, match="rounds"):
        measure.measure_interleaved(fns, reps=2, rounds=3)
    with pytest.raises(ValueError, match="fns"):
        measure.measure_interleaved({})


def test_profile_interleaved_keeps_the_least_disturbed_round():
    import time as _time

    calls = {"n": 0}

    def sometimes_slow():
        calls["n"] += 1
        if calls["n"] <= 2:  # the first round is disturbed
            _time.sleep(0.02)

    out = measure.profile_interleaved({"f": sometimes_slow}, reps=2, warmup=0, rounds=2)
    assert calls["n"] == 4 and out["f"].wall_ms < 15
    with pytest.raises(ValueError, match="rounds"):
        measure.profile_interleaved({"f": sometimes_slow}, rounds=0)
