"""One ipywidgets explorer for every notebook: controls on top, one output below, redrawn on change.

Every explorer in the workbook is built by :func:`explorer`, so they look and behave alike:

* a bold title line, then the controls (one row, wrapping), then a single Output area;
* sliders update when released (``continuous_update=False``), so dragging does not queue
  dozens of redraws;
* the output is redrawn from scratch on every change: ``draw(**values)`` prints, shows
  tables or draws a matplotlib figure, and the helper shows any figure left open;
* an exception inside ``draw`` is shown in the output as one red line and does not
  break the explorer (an observer's exception would otherwise vanish into the log);
* the box carries the CSS class ``ll-explorer`` and each control ``ll-control``, which the
  real-browser test (``make uitest``) uses to find and move them.

    ll.explorer(lambda num_bits, clip: plot(W, num_bits, clip),
                num_bits=ll.int_slider(4, 2, 8), clip=ll.float_slider(1.0, 0.1, 1.0, 0.05),
                title="Clip and bits")

Used in: every notebook with an explorer (01-09) through the modules' ``*_explorer`` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt

EXPLORER_CLASS = "ll-explorer"
CONTROL_CLASS = "ll-control"
_STYLE = {"description_width": "initial"}


def int_slider(value: int, min: int, max: int, step: int = 1, description: str = "") -> Any:
    """An IntSlider that updates when released."""
    import ipywidgets as widgets

    return widgets.IntSlider(value=value, min=min, max=max, step=step, description=description,
                             continuous_update=False, style=_STYLE)


def float_slider(value: float, min: float, max: float, step: float, description: str = "",
                 readout_format: str = ".2f", width: str = "420px") -> Any:
    """A FloatSlider that updates when released."""
    import ipywidgets as widgets

    return widgets.FloatSlider(value=value, min=min, max=max, step=step, description=description,
                               readout_format=readout_format, continuous_update=False,
                               style=_STYLE, layout=widgets.Layout(width=width))


def range_slider(value: tuple[float, float], min: float, max: float, step: float,
                 description: str = "", readout_format: str = ".2f", width: str = "520px") -> Any:
    """A FloatRangeSlider that updates when released."""
    import ipywidgets as widgets

    return widgets.FloatRangeSlider(value=list(value), min=min, max=max, step=step,
                                    description=description, readout_format=readout_format,
                                    continuous_update=False, style=_STYLE,
                                    layout=widgets.Layout(width=width))


def dropdown(options: list[Any], value: Any = None, description: str = "") -> Any:
    """A Dropdown (first option by default)."""
    import ipywidgets as widgets

    return widgets.Dropdown(options=options, value=options[0] if value is None else value,
                            description=description, style=_STYLE)


def explorer(draw: Callable[..., Any], title: str = "", **controls: Any) -> Any:
    """A VBox: ``title``, the ``controls`` (name -> widget) and an Output that ``draw`` fills.

    ``draw`` is called with every control's value as a keyword argument, once now and again
    after each change. Returns the box (display it as a cell's last expression).
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise ValueError(f"draw must be callable, got {type(draw).__name__}")
    if not controls:
        raise ValueError("explorer needs at least one control, e.g. num_bits=ll.int_slider(4, 2, 8)")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise ValueError(f"control {name!r} must be an ipywidgets value widget, got {type(control).__name__}")
    out = widgets.Output(layout=widgets.Layout(min_height="60px"))

    def redraw(*_: Any) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                draw(**{name: c.value for name, c in controls.items()})
                if plt.get_fignums():
                    plt.show()
            except Exception as exc:  # shown to the student, never swallowed silently
                plt.close("all")
                print(f"\x1b[31mthis setting cannot be drawn: {type(exc).__name__}: {exc}\x1b[0m")

    for control in controls.values():
        control.add_class(CONTROL_CLASS)
        control.observe(redraw, names="value")
    children = []
    if title:
        children.append(widgets.HTML(f"<b>{title}</b>"))
    children.append(widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")))
    children.append(out)
    box = widgets.VBox(children)
    box.add_class(EXPLORER_CLASS)
    box.redraw = redraw  # tests and notebooks can force a redraw
    box.output = out
    box.controls = controls
    redraw()
    return box
