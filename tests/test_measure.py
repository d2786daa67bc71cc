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
    assert measure.op_category("quantized::linear_dynamic") == "int GEMM"
    assert measure.op_category("aten::quantize_per_tensor") == "quantize activations"
    assert measure.op_category("aten::dequantize") == "dequantize"
    assert measure.op_category("aten::addmm") == "float GEMM / conv"
    assert measure.op_category("aten::relu") == "other"


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
