"""Tests for lecturelib.qat_toolchains: torch.ao eager QAT (fbgemm) and torchao QATConfig run quietly
and give working int8 models; size and latency measurements."""

import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from lecturelib import qat_toolchains as T
from lecturelib.harness import set_threads

set_threads(1)  # the models are tiny: one thread is fastest and deterministic

SCRIPT = r"""
import json, torch
import lecturelib as ll
from lecturelib import qat_toolchains as T
ll.set_threads(1)
torch.manual_seed(0)
d = ll.load_digits_split(0)
m = ll.MLP([64, 64, 10])
ll.train_classifier(m, d.X_train, d.y_train, ll.TrainConfig(epochs=15, lr=3e-3))
cfg = ll.TrainConfig(epochs=1, lr=1e-3)
out = {"fp32": T.toolchain_row("fp32", m, d, repeats=5)}
fq, conv = T.eager_qat(m, d, cfg)
out["eager_fq"], out["eager_int8"] = T.toolchain_row("fq", fq, d, 5), T.toolchain_row("int8", conv, d, 5)
out["eager_gap"] = T.eager_convert_gap(fq, conv, d.X_test)
fq, conv = T.torchao_qat(m, d, cfg)
out["ao_fq"], out["ao_int8"] = T.toolchain_row("fq", fq, d, 5), T.toolchain_row("int8", conv, d, 5)
out["ao_weight_type"] = type(conv[0].weight).__name__
out["deprecation"] = T.torch_ao_deprecation_warning()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run():
    # A fresh interpreter, so that importing torch.ao.quantization and torchao happens here and
    # any warning or log line they print on the way would show up on stderr.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_toolchains_print_nothing_to_stderr(run):
    _, stderr = run
    assert stderr == ""


def test_toolchains_give_accurate_smaller_int8_models(run):
    out, _ = run
    fp32 = out["fp32"]
    for key in ("eager_fq", "eager_int8", "ao_fq", "ao_int8"):
        assert out[key]["accuracy"] > fp32["accuracy"] - 0.05, (key, out[key], fp32)
        assert out[key]["latency_ms"] > 0
    for key in ("eager_int8", "ao_int8"):
        assert out[key]["size_bytes"] < 0.7 * fp32["size_bytes"], (key, out[key], fp32)
    assert out["ao_weight_type"] == "IntxUnpackedToInt8Tensor"
    # torch.ao: convert recomputes the weight scales from the observer, which lags the ones the last
    # fake-quant forward used; they differ slightly, and so do a minority of the output codes
    assert 0 <= out["eager_gap"]["max_weight_scale_rel_diff"] < 0.05
    assert out["eager_gap"]["frac_outputs_differ"] < 0.5


def test_torch_ao_deprecation_is_captured_not_printed(run):
    out, stderr = run
    assert "deprecated" in out["deprecation"] and "torch.ao.quantization" in out["deprecation"]
    assert stderr == ""


def test_serialized_size_is_the_saved_state_dict():
    m = nn.Linear(10, 3)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert T.serialized_size(m) == len(buf.getvalue())
    assert T.serialized_size(m) == T.serialized_size(m)  # deterministic


def test_measure_latency_ms_and_bad_input():
    m = nn.Linear(4, 2)
    assert 0 < T.measure_latency_ms(m, torch.rand(1, 4), repeats=5, warmup=1) < 1000
    with pytest.raises(ValueError, match="repeats"):
        T.measure_latency_ms(m, torch.rand(1, 4), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        T.measure_latency_ms(m, torch.rand(1, 4), warmup=-1)
    with pytest.raises(ValueError, match="model"):
        T.serialized_size("not a model")
    with pytest.raises(ValueError, match="weight_bits"):
        T.torchao_qat(nn.Sequential(nn.Linear(64, 10)), None, None, weight_bits=1)


def test_toolchains_reject_batchnorm_and_bad_data():
    from lecturelib.models import TrainConfig, load_digits_split
    from lecturelib.qat import MLPBN

    d = load_digits_split(0)
    with pytest.raises(ValueError, match="BatchNorm"):
        T.eager_qat(MLPBN([64, 8, 10]), d, TrainConfig(epochs=0))
    with pytest.raises(ValueError, match="data"):
        T.eager_qat(nn.Sequential(nn.Linear(64, 10)), "digits", TrainConfig(epochs=0))
