"""PyTorch's own QAT toolchains on the workbook's digits MLP, with size and latency measured.

* ``eager_qat``: ``torch.ao.quantization`` eager mode (QuantWrapper, fuse_modules_qat, prepare_qat,
  train, convert) for the fbgemm backend. DEPRECATED: PyTorch 2.x warns that torch.ao.quantization
  will be removed and points to torchao; its warnings are silenced here (stderr fails nbgrader).
* ``torchao_qat``: torchao's maintained API, ``quantize_(model, QATConfig(base, step="prepare"))``
  -> train -> ``quantize_(model, QATConfig(base, step="convert"))`` with
  ``Int8DynamicActivationIntxWeightConfig`` (a base config QATConfig supports on CPU).
* ``serialized_size``, ``measure_latency_ms``, ``toolchain_row``: what a deployed model weighs
  (bytes of its saved state_dict) and how long one forward pass takes (median wall time).

Papers: Krishnamoorthi 2018 (arXiv:1806.08342); Jacob et al., CVPR 2018; FBGEMM (Khudia et al. 2021).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import time
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .models import MLP, DigitsSplit, TrainConfig, accuracy
from .qat import _check_data, fit, mlp_blocks
from .quantizers import check_bits, check_tensor

Tensor = torch.Tensor


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation warnings and torchao's import-time log lines
    (anything on stderr fails nbgrader).

    Ignores Python warnings and raises the ``torch.utils._pytree`` and ``torch.utils.cpp_extension``
    loggers (torchao logs an Enum-registration notice and an extension note there) to ERROR,
    restoring everything afterwards. The one implementation: rl and measure import it.
    Used in: 05_qat_ste, 08_cartpole_consistency, 10_measure_one_level_deeper.
    """
    logs = [logging.getLogger(n) for n in ("torch.utils._pytree", "torch.utils.cpp_extension")]
    old = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, old):
            log.setLevel(level)


# ----------------------------------------------------------------------------- toolchains
def serialized_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a deployed checkpoint weighs.

    Used in: 05_qat_ste.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    buf = io.BytesIO()
    with quiet():
        torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


@torch.inference_mode()
def measure_latency_ms(model: nn.Module, x: Tensor, repeats: int = 200, warmup: int = 20) -> float:
    """Median wall time of one forward pass, in milliseconds (time.perf_counter, after warmup).

    The median over ``repeats`` single calls resists the outliers of a shared CPU; the quantized
    engine is fbgemm while timing. Used in: 05_qat_ste.
    """
    for name, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    check_tensor(x, "x")
    model.eval()
    times = []
    with _engine("fbgemm"):
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def torch_ao_deprecation_warning() -> str:
    """The first line of the DeprecationWarning that ``torch.ao.quantization.prepare_qat`` raises.

    The warning is captured (warnings.catch_warnings(record=True)), never printed, so a notebook can
    show what PyTorch says without writing to stderr. Returns "" if this PyTorch does not warn.
    Used in: 05_qat_ste.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch.ao.quantization as tq

        net = tq.QuantWrapper(nn.Sequential(nn.Linear(2, 2)))
        net.train()
        net.qconfig = tq.get_default_qat_qconfig("fbgemm")
        tq.prepare_qat(net, inplace=True)
    msgs = [str(w.message) for w in caught
            if issubclass(w.category, DeprecationWarning) and "torch.ao.quantization" in str(w.message)]
    return msgs[0].strip().splitlines()[0].strip() if msgs else ""


def eager_qat(model: MLP, data: DigitsSplit, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """DEPRECATED toolchain: ``torch.ao.quantization`` eager-mode QAT, converted for fbgemm.

    QuantWrapper -> fuse_modules_qat (Linear + ReLU) -> qconfig = get_default_qat_qconfig("fbgemm")
    (weights: int8 symmetric per channel; activations: uint8 per tensor, reduce_range, i.e. 7 bits)
    -> prepare_qat -> train -> convert. Returns (fake-quant model, converted int8 model).
    torch.ao.quantization is deprecated in PyTorch 2.x in favour of torchao; its warnings are
    silenced here. Paper: Krishnamoorthi 2018. Used in: 05_qat_ste.
    """
    data = _check_data(data)
    blocks = mlp_blocks(model)
    if any(bn is not None for _, bn, _ in blocks):
        raise ValueError("eager_qat takes an MLP without BatchNorm")
    with quiet(), _engine("fbgemm"):
        import torch.ao.quantization as tq

        net = tq.QuantWrapper(copy.deepcopy(model))
        net.train()
        idx, pairs = 0, []
        for _, _, relu in blocks:
            if relu:
                pairs.append([str(idx), str(idx + 1)])
            idx += 2 if relu else 1
        tq.fuse_modules_qat(net.module, pairs, inplace=True)
        net.qconfig = tq.get_default_qat_qconfig("fbgemm")
        tq.prepare_qat(net, inplace=True)
    fit(net, data.X_train, data.y_train, cfg)
    net.apply(tq.disable_observer)  # freeze the ranges: eval passes must not move them any more
    with quiet(), _engine("fbgemm"):
        converted = tq.convert(copy.deepcopy(net).eval())
    return net.eval(), converted


def torchao_qat(model: MLP, data: DigitsSplit, cfg: TrainConfig, weight_bits: int = 8) -> tuple[nn.Module, nn.Module]:
    """torchao 0.18's maintained QAT API: quantize_(model, QATConfig(base, step="prepare")) -> train
    -> quantize_(model, QATConfig(base, step="convert")).

    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=int<weight_bits>, PerAxis(0)): int8
    activations quantized per token (row) at run time, asymmetric; weights symmetric per output
    channel. Returns (fake-quant model, converted model). On CPU the converted layers hold
    int8 weights (IntxUnpackedToInt8Tensor) but compute through tensor-subclass dispatch.
    Used in: 05_qat_ste.
    """
    check_bits(weight_bits, 2, 8, "weight_bits")
    data = _check_data(data)
    if any(bn is not None for _, bn, _ in mlp_blocks(model)):
        raise ValueError("torchao_qat takes an MLP without BatchNorm")
    with quiet():
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis
        from torchao.quantization.qat import QATConfig

        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{weight_bits}"),
                                                     weight_granularity=PerAxis(0))
        net = copy.deepcopy(model)
        quantize_(net, QATConfig(base, step="prepare"))
    fit(net, data.X_train, data.y_train, cfg)
    with quiet():
        converted = copy.deepcopy(net)
        quantize_(converted, QATConfig(base, step="convert"))
    return net.eval(), converted.eval()


def eager_convert_gap(fq_model: nn.Module, int_model: nn.Module, x: Tensor) -> dict[str, float]:
    """How far torch.ao's converted model is from its own fake-quant forward, in output steps.

    steps = |fq(x) - int(x)| / S_out (S_out: the scale of the last layer's output fake-quant);
    also the largest relative difference between the per-channel weight scales the fake-quant
    forward used and the ones ``convert`` stored (convert recomputes them from the observer).
    Returns {"max_output_steps", "frac_outputs_differ", "max_weight_scale_rel_diff"}.
    Used in: 05_qat_ste.
    """
    check_tensor(x, "x")
    fq_lin = [m for m in fq_model.modules() if hasattr(m, "weight_fake_quant")]
    with quiet():
        from torch.ao.nn.quantized import Linear as QLinear
    int_lin = [m for m in int_model.modules() if isinstance(m, QLinear)]
    if not fq_lin or len(fq_lin) != len(int_lin):
        raise ValueError("fq_model and int_model must be the two models returned by eager_qat")
    with torch.no_grad(), _engine("fbgemm"), quiet():
        steps = (fq_model(x) - int_model(x)).abs() / fq_lin[-1].activation_post_process.scale
        rel = max(float(((a.weight_fake_quant.scale - b.weight().q_per_channel_scales().float()).abs()
                         / b.weight().q_per_channel_scales().float()).max()) for a, b in zip(fq_lin, int_lin))
    return {"max_output_steps": float(steps.max()), "frac_outputs_differ": float((steps > 0.5).float().mean()),
            "max_weight_scale_rel_diff": rel}


def toolchain_row(name: str, model: nn.Module, data: DigitsSplit, repeats: int = 200) -> dict:
    """{name, accuracy, size_bytes, latency_ms}: test accuracy, ``serialized_size``, and
    ``measure_latency_ms`` on one test image (batch 1). Used in: 05_qat_ste.
    """
    data = _check_data(data)
    with _engine("fbgemm"):
        acc = accuracy(model, data.X_test, data.y_test)
    return {"name": name, "accuracy": acc, "size_bytes": serialized_size(model),
            "latency_ms": measure_latency_ms(model, data.X_test[:1], repeats=repeats, warmup=max(5, repeats // 10))}


