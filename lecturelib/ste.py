"""Straight-through estimator (STE) for fake quantization.

Quantization is piecewise constant, so dQ(W)/dW = 0 almost everywhere and nothing would
train. The STE passes the gradient through as if Q were the identity, but only inside the
clip range (where clamp is not active):

    forward:  x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z)
    backward: dL/dx = dL/dx_fq * 1[q_min <= round(x / S) + Z <= q_max]

Papers: Bengio, Leonard & Courville, "Estimating or propagating gradients through stochastic
neurons for conditional computation", 2013; Hinton, Coursera lecture 2012 (the lecture's STE slide).
"""

from __future__ import annotations

import torch

from .quantizers import QParams, fake_quantize_with_mask

Tensor = torch.Tensor


class FakeQuantizeSTE(torch.autograd.Function):
    """Fake-quantize in the forward pass; gradient 1 inside the clip range and 0 outside."""

    @staticmethod
    def forward(ctx, x: Tensor, qp: QParams) -> Tensor:  # type: ignore[override]
        x_fq, mask = fake_quantize_with_mask(x, qp)
        ctx.save_for_backward(mask)
        return x_fq.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad_out * mask.to(grad_out.dtype), None


def ste_fake_quantize(x: Tensor, qp: QParams) -> Tensor:
    """Differentiable fake quantization with the straight-through estimator.

    x_fq = S (clamp(round(x / S) + Z, q_min, q_max) - Z);  dx_fq/dx = 1 inside the clip range, else 0.
    The scale and zero point are constants here (no gradient reaches them).
    Paper: Bengio et al. 2013; Jacob et al. 2018 (simulated quantization in training).
    Used in: 01_linear_quantization, 05_qat_ste.
    """
    return FakeQuantizeSTE.apply(x, qp)
