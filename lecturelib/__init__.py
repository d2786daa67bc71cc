"""lecturelib: the code the Quantization Workbook notebooks use.

    import lecturelib as ll

One module per concept (quantizers, ste, intops, kmeans, models, viz, harness, ...); the
names notebooks use most are re-exported here. Each public function's docstring gives its
formula, its paper and the notebooks it is used in.
"""

from . import harness, kmeans, lecture, models, quantizers, ste, viz
from .harness import *  # noqa: F401,F403  (resolve_fast, seed_everything, save_results, ...)
from .kmeans import KMeansResult, centroid_gradient, finetune_step, kmeans_quantize, kmeans_storage_bits, linear_storage_bits
from .lecture import W_LECTURE
from .models import MLP, TrainConfig, accuracy, load_digits_split, load_or_train, train_classifier
from .quantizers import (
    PerChannel,
    PerGroup,
    PerTensor,
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    qparams_with_range,
    qrange,
    quantization_error,
    quantize,
)
from .ste import ste_fake_quantize
from .viz import plot_quant_grid, quant_explorer, show_matrices
from .explorers import dropdown, explorer, float_slider, int_slider, range_slider

from . import intops  # noqa: E402,F401


def __getattr__(name: str):
    """Import any other submodule on first use, so ``ll.clipping.aciq_alpha`` works without an
    explicit import here (a notebook's own module can be added without touching this file)."""
    import importlib

    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise AttributeError(f"module 'lecturelib' has no attribute or submodule {name!r}") from None
        raise
