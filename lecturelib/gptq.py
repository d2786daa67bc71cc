"""GPTQ: second-order (Hessian-aware) weight-only quantization of a linear layer, and its baseline RTN.

Scope: one nn.Linear at a time (its weight W of shape (out, in) is replaced in place), and a whole
model layer after layer (each layer calibrated on the outputs of the already-quantized layers before
it). The integer grid (scale, zero_point per group) comes from ``lecturelib.quantizers``; only the
order and the error feedback differ from round-to-nearest.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (built on OBQ: Frantar & Alistarh 2022, and Optimal
Brain Surgeon: Hassibi & Stork 1993).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizers import PerChannel, PerGroup, check_bits, check_tensor, choose_qparams, fake_quantize

Tensor = torch.Tensor


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of GPTQ (and of the RTN baseline, which uses the same grid)."""

    num_bits: int = 4
    """Bits per weight code (2..8 here)."""
    group_size: int | None = 64
    """Input columns sharing one (scale, zero_point) per output row; None: one per row (per-channel)."""
    damp: float = 0.01
    """Dampening: lambda = damp * mean(diag(H)) is added to the diagonal of H."""
    block_size: int = 128
    """Columns per lazy block: updates inside a block are immediate, to the rest batched."""
    act_order: bool = False
    """Quantize columns in order of decreasing diag(H) (largest activations first)."""
    symmetric: bool = False
    """Symmetric grid (Z = 0) instead of asymmetric min/max."""

    def __post_init__(self) -> None:
        check_bits(self.num_bits, 2, 8)
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"group_size must be None or a positive int, got {g!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ValueError(f"damp must be a float in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")


def _check_matrix(W: Tensor, name: str = "W") -> Tensor:
    check_tensor(W, name)
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float tensor, got shape {tuple(W.shape)} dtype {W.dtype}")
    return W


def _granularity(cfg: GPTQConfig, cols: int) -> PerChannel | PerGroup:
    if cfg.group_size is None:
        return PerChannel(axis=0)
    if cols % cfg.group_size:
        raise ValueError(f"group_size must divide the {cols} input columns, got {cfg.group_size}")
    return PerGroup(axis=1, group_size=cfg.group_size)


def rtn_quantize(W: Tensor, cfg: GPTQConfig) -> Tensor:
    """Round-to-nearest: W_q = fake_quantize(W) with min/max (scale, zero_point) per row and group.

    W_q[r, c] = S[r, g(c)] * (clamp(round(W[r, c] / S) + Z, qmin, qmax) - Z),  g(c) = c // group_size.
    Paper: the baseline of Frantar et al. 2023 (GPTQ), Table 1 "RTN".
    Used in: 10_measure_one_level_deeper.
    """
    _check_matrix(W)
    qp = choose_qparams(W.float(), cfg.num_bits, cfg.symmetric, _granularity(cfg, W.shape[1]))
    return fake_quantize(W.float(), qp).to(W.dtype)


def hessian(X: Tensor) -> Tensor:
    """Layer Hessian of the squared output error: H = 2 X^T X / n for inputs X of shape (n, in).

    The layer loss ||W X - W_q X||^2 (X as columns) has Hessian 2 X X^T with respect to each row
    of W; dividing by the n calibration rows keeps its scale independent of n.
    Paper: Frantar et al. 2023, Sec. 3 (Optimal Brain Quantization).
    Used in: 10_measure_one_level_deeper.
    """
    check_tensor(X, "X")
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X must be a 2-D (n, in) tensor with n >= 1, got shape {tuple(X.shape)}")
    X = X.double()
    return (2.0 / X.shape[0]) * X.T @ X


def column_update(W_rest: Tensor, w: Tensor, q: Tensor, hinv_row: Tensor) -> tuple[Tensor, Tensor]:
    """One GPTQ column step: spread the rounding error of column i over the columns after it.

    err = (w - q) / [H^-1]_ii,   W[:, j] -= err * [H^-1]_ij for j > i
    with H^-1 in its upper Cholesky form U (H^-1 = U^T U), so hinv_row = U[i, i:] (first entry U_ii).
    Returns (updated W_rest of shape (out, k), err of shape (out,)).
    Paper: Frantar et al. 2023, eq. (3) and Sec. 3 step 3 (Cholesky reformulation).
    Used in: 10_measure_one_level_deeper (exercise 2).
    """
    if hinv_row.ndim != 1 or hinv_row.numel() != W_rest.shape[1] + 1:
        raise ValueError(f"hinv_row must have {W_rest.shape[1] + 1} entries (U_ii then U_ij, j > i), got {tuple(hinv_row.shape)}")
    err = (w - q) / hinv_row[0]
    return W_rest - err[:, None] * hinv_row[None, 1:], err


@dataclass
class GPTQResult:
    """What ``gptq_quantize`` did to one weight matrix."""

    W_q: Tensor
    """The quantized (dequantized back to float) weight, original column order."""
    perm: Tensor | None
    """Column order used (act_order), else None."""
    damp_value: float
    """lambda actually added to diag(H)."""


def gptq_quantize(W: Tensor, H: Tensor, cfg: GPTQConfig) -> GPTQResult:
    """GPTQ of one weight matrix W (out, in) with layer Hessian H (in, in); W itself is not changed.

    1. dead inputs (H_ii = 0) get H_ii = 1 and W[:, i] = 0; optional act-order permutation;
    2. H += lambda I with lambda = damp * mean(diag(H));
    3. U = upper Cholesky factor of H^-1 (H^-1 = U^T U);
    4. for each block of ``block_size`` columns, for each column i: (at a group start, choose the
       group's (scale, zero_point) from the current, already error-corrected weights) q = quant(w_i),
       err = (w_i - q) / U_ii, W[:, i+1:block_end] -= err U[i, i+1:block_end]; after the block, one
       matrix product W[:, block_end:] -= Err U[block, block_end:] (the lazy batch update).
    With act_order and groups, groups are runs of consecutive columns in the permuted order.
    Paper: Frantar et al. 2023, Algorithm 1.
    Used in: 10_measure_one_level_deeper.
    """
    _check_matrix(W)
    check_tensor(H, "H")
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not isinstance(cfg, GPTQConfig):
        raise ValueError(f"cfg must be a GPTQConfig, got {type(cfg).__name__}")
    _granularity(cfg, cols)
    W = W.detach().double().clone()
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    lam = float(cfg.damp * torch.diag(H).mean())
    H += lam * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    whole = None
    if cfg.group_size is None:  # one grid per row, chosen once from the original weights
        whole = choose_qparams(W.float(), cfg.num_bits, cfg.symmetric, PerChannel(axis=0))
    Q = torch.zeros_like(W)
    qp = None
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if whole is not None and qp is None:
                qp = whole
                inv_s, s_, z_ = 1.0 / qp.scale[:, 0], qp.scale[:, 0], qp.zero_point[:, 0].float()
            elif whole is None and c % cfg.group_size == 0:  # grid of the next group from the corrected weights
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : cfg.group_size]
                qp = choose_qparams(cur.float(), cfg.num_bits, cfg.symmetric, PerChannel(axis=0))
                inv_s, s_, z_ = 1.0 / qp.scale[:, 0], qp.scale[:, 0], qp.zero_point[:, 0].float()
            w = W1[:, i]
            # the same rounding as quantizers.fake_quantize (x * (1/S), round, +Z, clamp, -Z, *S),
            # inlined for one column: calling it per column would dominate the run time
            codes = torch.clamp(torch.round(w.float() * inv_s) + z_, qp.qmin, qp.qmax)
            q = ((codes - z_) * s_).double()
            Q[:, c] = q
            W1[:, i + 1 :], err = column_update(W1[:, i + 1 :], w, q, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update of every later column
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.float(), perm, lam)


def layer_output_mse(W: Tensor, W_q: Tensor, X: Tensor) -> float:
    """Mean squared layer output error: mean((X W^T - X W_q^T)^2) over calibration rows X (n, in).

    Used in: 10_measure_one_level_deeper.
    """
    _check_matrix(W)
    if W_q.shape != W.shape:
        raise ValueError(f"W_q must have W's shape {tuple(W.shape)}, got {tuple(W_q.shape)}")
    dW = (W.double() - W_q.double()).float()  # the difference first: no cancellation in float32
    return float(((X.float() @ dW.T).double() ** 2).mean())


@dataclass
class LayerReport:
    """Per-layer outcome of ``quantize_model``."""

    name: str
    """Qualified module name."""
    mse_rtn: float
    """Layer output MSE of round-to-nearest on this layer's calibration inputs."""
    mse_gptq: float
    """Layer output MSE of GPTQ on the same inputs."""


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did."""

    method: str
    """'rtn' or 'gptq'."""
    layers: list[LayerReport] = field(default_factory=list)
    """One entry per quantized layer, in model order."""


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the captured layer needs to run."""


def _capture_inputs(model: nn.Module, layer: nn.Linear, batches: list[Tensor]) -> Tensor:
    """The (n, in) inputs ``layer`` sees when ``model`` runs on ``batches``; the forward stops at the layer."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _StopForward

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(b)
                except _StopForward:
                    pass
    finally:
        h.remove()
    if len(seen) != len(batches):
        raise ValueError("names must be layers that the model's forward calls once per batch")
    return torch.cat(seen).float()


def quantize_model(model: nn.Module, calib: list[Tensor], cfg: GPTQConfig, method: str = "gptq",
                   names: list[str] | None = None) -> QuantizeReport:
    """Quantize the weights of the model's nn.Linear layers in place, one after the other.

    Each layer's calibration inputs X are captured with the layers before it already quantized
    (sequential GPTQ), then W <- GPTQ(W, H = 2 X^T X / n) or W <- RTN(W). Both MSEs are reported
    for every layer (RTN is computed on the same X). Biases, embeddings and norms stay float.
    Paper: Frantar et al. 2023, Sec. 4 (layer-by-layer, inputs from the quantized prefix).
    Used in: 10_measure_one_level_deeper.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not calib:
        raise ValueError("calib must be a non-empty list of input batches")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is None:
        names = list(linears)
    unknown = [n for n in names if n not in linears]
    if unknown:
        raise ValueError(f"names must be nn.Linear modules of the model (allowed: {list(linears)}), got {unknown}")
    report = QuantizeReport(method)
    for n in names:
        layer = linears[n]
        X = _capture_inputs(model, layer, calib)
        W = layer.weight.data.float()
        W_rtn = rtn_quantize(W, cfg)
        W_gptq = gptq_quantize(W, hessian(X), cfg).W_q
        report.layers.append(LayerReport(n, layer_output_mse(W, W_rtn, X), layer_output_mse(W, W_gptq, X)))
        layer.weight.data.copy_(W_gptq if method == "gptq" else W_rtn)
    return report
