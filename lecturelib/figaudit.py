"""Figure audit: every figure a notebook draws has titles and axis labels.

When the environment variable ``WORKBOOK_FIGURE_AUDIT`` names a file, :func:`install` (called
by ``ll.resolve_fast``, which every notebook runs first) wraps matplotlib's
``FigureCanvasBase.print_figure``, the one function every rendered figure passes through
(``plt.show``, the inline backend at the end of a cell, ``savefig``). Each axes that shows
data must have a title (its own or the figure's suptitle) and both axis labels; an axes with
its axis turned off (an image, a heat map with values written in) needs only a title.
Problems are appended to that file as JSON lines; ``make test`` fails a notebook with any.

Used in: lecturelib.harness.resolve_fast, lecturelib.workbook (make test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

AUDIT_ENV = "WORKBOOK_FIGURE_AUDIT"
_INSTALLED = False


def _has_data(ax: Any) -> bool:
    return bool(ax.lines or ax.patches or ax.collections or ax.images or ax.texts or ax.containers)


def figure_problems(fig: Any) -> list[str]:
    """What is missing in ``fig``: one string per axes and missing item."""
    problems = []
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not _has_data(ax):
            continue
        if ax.get_label() == "<colorbar>" or hasattr(ax, "_colorbar"):
            continue
        twins = [t for t in ax.get_shared_x_axes().get_siblings(ax) if t is not ax]
        title = (ax.get_title() or ax.get_title("left") or ax.get_title("right") or suptitle
                 or next((t.get_title() for t in twins if t.get_title()), ""))
        name = f"axes {i} ({title[:50]!r})" if title else f"axes {i}"
        if not title:
            problems.append(f"{name}: no title")
        if ax.axison:
            for axis, which, shared in ((ax.xaxis, "x", ax.get_shared_x_axes()),
                                        (ax.yaxis, "y", ax.get_shared_y_axes())):
                label = axis.get_label_text() or any(
                    (s.xaxis if which == "x" else s.yaxis).get_label_text() for s in shared.get_siblings(ax))
                if not label and axis.get_visible() and len(axis.get_ticklocs()) and not _categorical(axis):
                    problems.append(f"{name}: no {which} label")
    return problems


def _categorical(axis: Any) -> bool:
    """Ticks that are words (method names, variants): they label themselves."""
    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
    return bool(labels) and all(any(c.isalpha() for c in s) for s in labels)


def install(path: str | os.PathLike | None = None) -> bool:
    """Start auditing every rendered figure into ``path`` (default: $WORKBOOK_FIGURE_AUDIT).

    Returns True when the audit is active. Idempotent.
    """
    global _INSTALLED
    target = path or os.environ.get(AUDIT_ENV, "")
    if not target:
        return False
    if _INSTALLED:
        return True
    from matplotlib.backend_bases import FigureCanvasBase

    original = FigureCanvasBase.print_figure
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)

    def print_figure(self: Any, *args: Any, **kwargs: Any) -> Any:
        problems = figure_problems(self.figure)
        if problems:
            where = _cell()
            with out.open("a") as f:
                f.write(json.dumps({"problems": [f"{where}{p}" for p in problems]}) + "\n")
        return original(self, *args, **kwargs)

    FigureCanvasBase.print_figure = print_figure  # type: ignore[method-assign]
    print_figure.__wrapped__ = original  # type: ignore[attr-defined]
    _watch_cells()
    _INSTALLED = True
    return True


def uninstall() -> None:
    """Stop auditing (tests)."""
    global _INSTALLED
    from matplotlib.backend_bases import FigureCanvasBase

    wrapped = getattr(FigureCanvasBase.print_figure, "__wrapped__", None)
    if wrapped is not None:
        FigureCanvasBase.print_figure = wrapped  # type: ignore[method-assign]
    _INSTALLED = False


_CURRENT = {"cell": ""}


def _cell() -> str:
    """'cell «first line»: ' of the cell that drew the figure (recorded by pre_run_cell)."""
    return f"cell «{_CURRENT['cell']}»: " if _CURRENT["cell"] else ""


def _watch_cells() -> None:
    """Remember each cell's first code line before it runs (inline figures render after it)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def pre_run_cell(info: Any) -> None:
        lines = [ln for ln in (info.raw_cell or "").splitlines() if ln.strip() and not ln.startswith("#")]
        _CURRENT["cell"] = lines[0][:70] if lines else ""

    shell.events.register("pre_run_cell", pre_run_cell)


def read(path: str | os.PathLike) -> list[str]:
    """All problems recorded in ``path`` (empty when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [prob for line in p.read_text().splitlines() if line for prob in json.loads(line)["problems"]]
