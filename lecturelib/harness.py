"""Notebook harness: fast/full mode, seeds, threads, results JSON, environment report, course map.

Scope: the few lines every notebook runs before and after its story. The first code
cell of a notebook is the papermill ``parameters`` cell (``FAST``, ``SEED``,
``RESULTS_DIR``); the next one does

    import lecturelib as ll
    FAST = ll.resolve_fast(FAST)       # WORKBOOK_FAST=1 switches every notebook to fast mode
    ll.seed_everything(SEED)

and the last one writes the notebook's key numbers with
``ll.save_results(results, RESULTS_DIR, "NN_topic")``. The runner
(``python -m lecturelib.workbook run``) collects those JSON files into build/report.md.

``COURSE_MAP`` lists the notebooks in lecture order; README.md and notebook 00 both
render it with ``course_map_markdown`` so they cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "COURSE_MAP",
    "CourseEntry",
    "FAST_ENV",
    "RESULTS_DIR_ENV",
    "STEM_PATTERN",
    "available_notebooks",
    "course_map_markdown",
    "env_report",
    "markdown_table",
    "progress",
    "resolve_fast",
    "save_results",
    "seed_everything",
    "set_threads",
    "show_markdown",
    "to_json_safe",
]

FAST_ENV = "WORKBOOK_FAST"
"""Environment variable that switches every notebook to fast mode ("1", "true", "yes")."""
RESULTS_DIR_ENV = "WORKBOOK_RESULTS_DIR"
"""Environment variable that, when set, overrides the ``results_dir`` of ``save_results``."""
STEM_PATTERN = re.compile(r"^\d\d_[a-z0-9_]+$")
"""A notebook stem: two digits, an underscore, lower-case words (``03_clipping``)."""

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
MAX_THREADS = 2
"""Torch threads a notebook uses at most, so numbers and timings repeat across laptops."""


# ----------------------------------------------------------------------------- course map
@dataclass(frozen=True)
class CourseEntry:
    """One notebook of the workbook."""

    stem: str
    """File name without ``.ipynb``, e.g. ``03_clipping``."""
    title: str
    """Short title shown in the map."""
    part: str
    """Where it sits: the start, the lecture, or one of the three case studies."""
    covers: str
    """What it covers, in the lecture's words."""


COURSE_MAP: tuple[CourseEntry, ...] = (
    CourseEntry(
        "00_start_here",
        "Start here",
        "Start",
        "environment check, course map, fast/full mode, how exercises and checks work",
    ),
    CourseEntry(
        "01_linear_quantization",
        "Linear quantization",
        "Lecture",
        "k-means vs linear quantization; r = S(q - Z); quantized fully-connected and conv layers",
    ),
    CourseEntry(
        "02_granularity",
        "PTQ granularity",
        "Lecture",
        "per-tensor, per-channel, group quantization; VS-Quant; MX formats",
    ),
    CourseEntry(
        "03_clipping",
        "Dynamic-range clipping",
        "Lecture",
        "EMA, calibration, MSE with a Laplace prior, OCTAV, KL divergence",
    ),
    CourseEntry("04_adaround", "Rounding", "Lecture", "round-to-nearest vs AdaRound"),
    CourseEntry(
        "05_qat_ste",
        "Quantization-aware training",
        "Lecture",
        "QAT with fake quantization and the straight-through estimator (STE)",
    ),
    CourseEntry(
        "06_binary_xnor",
        "Binary and ternary networks",
        "Lecture",
        "BinaryConnect, BWN, XNOR-Net and popcount, TWN, TTQ",
    ),
    CourseEntry("07_mixed_precision", "Mixed precision", "Lecture", "per-layer bit widths; HAQ"),
    CourseEntry(
        "08_cartpole_consistency",
        "CartPole PTQ/QAT",
        "Case study: a student project",
        "a CartPole policy under dynamic PTQ and QAT; decision consistency checked soundly "
        "with interval networks",
    ),
    CourseEntry(
        "09_dptq_catastrophic_failure",
        "Catastrophic failure in dynamic PTQ",
        "Case study: a paper",
        "robust vs detrimental network/bit-width-policy pairs; distillation, a knapsack "
        "bit budget and QAT; layer and histogram analyses",
    ),
    CourseEntry(
        "10_measure_one_level_deeper",
        "Measure one level deeper",
        "Case study: a benchmarking report",
        "size, latency and accuracy of quantized models measured well; GPTQ vs round-to-nearest",
    ),
)
"""The notebooks in lecture order. Used in: 00_start_here (and README.md)."""


def available_notebooks(notebook_dir: str | Path) -> list[str]:
    """Stems from ``COURSE_MAP`` whose ``<stem>.ipynb`` exists in ``notebook_dir``.

    Used in: 00_start_here.
    """
    folder = Path(notebook_dir)
    return [e.stem for e in COURSE_MAP if (folder / f"{e.stem}.ipynb").is_file()]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render rows (dicts with the same keys) as a GitHub-flavoured markdown table.

    ``|`` inside values is escaped; the header comes from the first row's keys.
    Used in: every notebook (tables of results), lecturelib.workbook (report).
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row, got 0")
    header = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != header:
            raise ValueError(f"row {i} has keys {list(row)}, expected {header}")

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def course_map_markdown(notebook_dir: str | Path | None = None) -> str:
    """The course map as a markdown table; with ``notebook_dir``, a column says which exist yet.

    Used in: 00_start_here (and README.md, checked by tests/test_harness.py).
    """
    present = set(available_notebooks(notebook_dir)) if notebook_dir is not None else None
    rows = []
    for e in COURSE_MAP:
        row = {
            "#": e.stem[:2],
            "notebook": f"`{e.stem}`",
            "part": e.part,
            "covers": f"**{e.title}**: {e.covers}",
        }
        if present is not None:
            row["status"] = "ready" if e.stem in present else "planned"
        rows.append(row)
    return markdown_table(rows)


def show_markdown(text: str) -> None:
    """Display markdown in Jupyter (rendered) or print it elsewhere.

    Used in: every notebook.
    """
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # plain python: print the source
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


# ----------------------------------------------------------------------------- run mode
def resolve_fast(fast: bool) -> bool:
    """Fast mode if the parameter says so or the environment variable WORKBOOK_FAST is on.

    fast_mode = fast or WORKBOOK_FAST in {"1", "true", "yes"} (case-insensitive).
    An unset or empty variable, or "0"/"false"/"no", leaves ``fast`` as it is; any other
    value is a ValueError, so a typo never silently runs the slow version.
    Used in: every notebook.
    """
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be a bool (True/False), got {fast!r}")
    from . import figaudit

    figaudit.install()  # only when WORKBOOK_FIGURE_AUDIT is set (make test)
    raw = os.environ.get(FAST_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw == "" or raw in _FALSE:
        return fast
    allowed = ", ".join(repr(v) for v in _TRUE + _FALSE)
    raise ValueError(
        f"{FAST_ENV} must be one of {allowed} (any case) or unset, got {os.environ[FAST_ENV]!r}"
    )


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and every CUDA device) with ``seed``.

    Used in: every notebook.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PROGRESS_ENV = "WORKBOOK_PROGRESS"
"""Set to 0 to hide the progress bars (e.g. in a terminal log)."""


def _in_jupyter_kernel() -> bool:
    """True inside a running IPython kernel (JupyterLab, papermill, nbval, nbgrader)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """Wrap a training loop's iterable in a tqdm.auto progress bar (a widget in Jupyter).

    Shown in a Jupyter kernel (a widget, not stderr) and in a terminal; hidden when stderr is
    not a terminal outside Jupyter (pytest, scripts, CI logs) and when ``WORKBOOK_PROGRESS=0``.
    The bar stays after the loop with its count and time.
    Used in: every training loop that can take more than a few seconds (models, qat,
    adaround, mixed_precision, rl, dptq).
    """
    from tqdm.auto import tqdm

    interactive = _in_jupyter_kernel() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    hidden = os.environ.get(PROGRESS_ENV, "1") == "0" or not interactive
    return tqdm(iterable, desc=desc, total=total, leave=True, mininterval=0.5, disable=hidden)


def set_threads(n: int | None = None) -> int:
    """Pin PyTorch's intra-op threads to ``n`` (default min(2, CPU count)) and return it.

    Two threads keep timings and float summation order the same on every laptop.
    Used in: every notebook.
    """
    if n is None:
        n = min(MAX_THREADS, os.cpu_count() or 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- results
def to_json_safe(value: Any, key: str = "results") -> Any:
    """Convert numpy/torch scalars and arrays, tuples and paths to plain JSON types.

    Raises ValueError naming ``key`` (a path such as ``results['acc'][2]``) for NaN or
    infinity, for non-string dict keys and for types JSON cannot hold.
    Used in: every notebook (through ``save_results``).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.ndim == 0 else value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key} is {value}; results must be finite numbers")
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{key} has a non-string key {k!r}; JSON keys must be str")
            out[k] = to_json_safe(v, f"{key}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{key} has type {type(value).__name__}, which JSON cannot hold")


def save_results(results: dict, results_dir: str | Path, stem: str) -> Path:
    """Write ``results`` to ``<results_dir>/<stem>.json`` (indent=2, sorted keys) and return the path.

    The environment variable WORKBOOK_RESULTS_DIR, when set, replaces ``results_dir`` (the
    test runs use it so they never overwrite the full-mode results); a relative path is
    relative to the kernel's working directory (the notebook's folder).
    Used in: every notebook (last cell).
    """
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    if not isinstance(stem, str) or not STEM_PATTERN.match(stem):
        raise ValueError(
            f"stem must look like '03_clipping' (two digits, '_', lower-case "
            f"letters/digits/underscores), got {stem!r}"
        )
    folder = Path(os.environ.get(RESULTS_DIR_ENV) or results_dir)
    payload = json.dumps(to_json_safe(results), indent=2, sort_keys=True, allow_nan=False)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(payload + "\n")
    return path


# ----------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_report() -> dict[str, Any]:
    """Versions, CPU/GPU, threads and quantized engines of this kernel, as a flat dict.

    Used in: 00_start_here.
    """
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = "not installed"
    cuda = torch.cuda.is_available()
    engines = list(torch.backends.quantized.supported_engines)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": tv_version,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else "none",
        "torch_threads": torch.get_num_threads(),
        "quantized_engines": ", ".join(engines),
        "fbgemm_available": "fbgemm" in engines,
        FAST_ENV: os.environ.get(FAST_ENV, ""),
    }
