"""Figures, tables and widgets the notebooks show. Plotting only: no quantization logic lives here."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import torch

from .quantizers import dequantize, fake_quantize, qparams_with_range, qrange

Tensor = torch.Tensor


def plot_quant_grid(w: Tensor, num_bits: int, r_min: float, r_max: float,
                    symmetric: bool = False, ax: plt.Axes | None = None) -> dict[str, float]:
    """Histogram of ``w`` with the 2^N quantization levels of [r_min, r_max] drawn over it.

    Shades what gets clipped and titles the plot with the mean-squared error
    mean((w - Q(w))^2). Returns {"mse", "scale", "zero_point", "clipped_fraction"}.
    Used in: 01_linear_quantization (the bit-width explorer), 03_clipping.
    """
    w = w.detach().flatten().float()
    qp = qparams_with_range(w, r_min, r_max, num_bits, symmetric)
    w_fq = fake_quantize(w, qp)
    mse = float(((w - w_fq) ** 2).mean())
    qmin, qmax = qrange(num_bits, True)
    levels = dequantize(torch.arange(qmin, qmax + 1, dtype=torch.int32), _levels_qp(qp, qmax - qmin + 1))
    lo, hi = float(levels.min()), float(levels.max())
    clipped = float(((w < lo - qp.scale.item() / 2) | (w > hi + qp.scale.item() / 2)).float().mean())
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    ax.hist(w.numpy(), bins=80, color="0.6")
    for lv in levels.tolist():
        ax.axvline(lv, color="tab:blue", lw=0.8 if num_bits <= 5 else 0.3, alpha=0.8)
    ax.axvline(0.0, color="k", lw=1.2, ls="--")
    w_min, w_max = float(w.min()), float(w.max())
    # red: data beyond the range (clipped); yellow: codes no data can reach (wasted)
    for a, b in ((w_min, lo), (hi, w_max)):
        if b > a:
            ax.axvspan(a, b, color="tab:red", alpha=0.15)
    for a, b in ((lo, w_min), (w_max, hi)):
        if b > a:
            ax.axvspan(a, b, color="gold", alpha=0.2)
    ax.set_xlabel("value (blue: the 2^N levels S(q - Z); red: clipped; yellow: unused codes)")
    ax.set_ylabel("count")
    ax.set_title(f"{num_bits}-bit, range [{r_min:.2f}, {r_max:.2f}]: MSE {mse:.2e}, "
                 f"clipped {100 * clipped:.1f}%")
    return {"mse": mse, "scale": qp.scale.item(), "zero_point": int(qp.zero_point.item()),
            "clipped_fraction": clipped}


def _levels_qp(qp: Any, n: int) -> Any:
    """The same scale/zero point, reshaped to dequantize a 1-D list of all n codes."""
    from .quantizers import QParams

    return QParams(qp.scale.reshape(1), qp.zero_point.reshape(1), qp.qmin, qp.qmax, (n,), (n,))


def quant_explorer(w: Tensor, max_bits: int = 8) -> Any:
    """An ipywidgets explorer: bit width and range sliders over a weight histogram and its error.

    Used in: 01_linear_quantization.
    """
    from .explorers import explorer, int_slider, range_slider

    w = w.detach().flatten().float()
    w_lo, w_hi = float(w.min()), float(w.max())
    span = max(abs(w_lo), abs(w_hi))

    def draw(num_bits: int, r_range: tuple[float, float], symmetric: bool) -> None:
        r_min, r_max = r_range
        if symmetric:
            a = max(abs(r_min), abs(r_max))
            r_min, r_max = -a, a
        fig, ax = plt.subplots(figsize=(7, 3))
        plot_quant_grid(w, num_bits, min(r_min, 0.0), max(r_max, 0.0), symmetric, ax=ax)

    import ipywidgets as widgets

    return explorer(
        draw,
        title="Linear quantization of the weights: bits and range",
        num_bits=int_slider(4, 2, max_bits, description="num_bits"),
        r_range=range_slider((w_lo, w_hi), -span * 1.5, span * 1.5, span / 100, description="range"),
        symmetric=widgets.Checkbox(value=False, description="symmetric"),
    )


def show_matrices(mats: dict[str, Tensor], fmt: str = "{:.2f}", cmap: str = "coolwarm") -> plt.Figure:
    """Side-by-side heat maps of small matrices with every value written in its cell.

    Used in: 01_linear_quantization, 02_granularity, 06_binary_xnor.
    """
    if not mats:
        raise ValueError("mats must name at least one matrix")
    vmax = max(float(m.detach().abs().max()) for m in mats.values()) or 1.0
    fig, axes = plt.subplots(1, len(mats), figsize=(2.8 * len(mats), 2.9), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        m = m.detach().float()
        if m.ndim != 2:
            raise ValueError(f"mats[{name!r}] must be 2-D, got shape {tuple(m.shape)}")
        ax.imshow(m.numpy(), cmap=cmap, vmin=-vmax, vmax=vmax)
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(m.shape[0]), torch.arange(m.shape[1])).tolist(),
                             m.flatten().tolist()):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
