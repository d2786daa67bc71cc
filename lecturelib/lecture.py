"""Numbers printed on the lecture's slides, so notebooks and tests reproduce them from one place.

Source: "Neural Network Quantization (cont'd)", Foundations of Edge AI, lecture 10.
"""

from __future__ import annotations

import torch

W_LECTURE = torch.tensor(
    [
        [2.09, -0.98, 1.48, 0.09],
        [0.05, -0.14, -1.08, 2.12],
        [-0.91, 1.92, 0.0, -1.03],
        [1.87, 0.0, 1.53, 1.49],
    ]
)
"""The 4x4 float weight matrix used on the k-means, granularity and binarization slides.
Used in: 01_linear_quantization, 02_granularity, 06_binary_xnor."""

BITWIDTH_TABLE = {2: (-2, 1), 3: (-4, 3), 4: (-8, 7)}
"""The slide's (q_min, q_max) table for N-bit signed integers. Used in: 01_linear_quantization."""

TWOS_COMPLEMENT_2BIT = {"01": 1, "00": 0, "11": -1, "10": -2}
"""The slide's 2-bit binary -> decimal table. Used in: 01_linear_quantization."""
