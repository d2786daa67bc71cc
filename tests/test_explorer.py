"""lecturelib.explorer: one helper builds every explorer; each module's explorer builds and redraws."""

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import lecturelib as ll  # noqa: E402
from lecturelib import explorers as ex  # noqa: E402


def test_draw_gets_every_value_now_and_after_each_change():
    calls = []
    box = ex.explorer(lambda a, b: calls.append((a, b)), title="t",
                      a=ex.int_slider(3, 2, 8), b=ex.dropdown(["x", "y"]))
    assert calls == [(3, "x")]
    box.controls["a"].value = 5
    box.controls["b"].value = "y"
    assert calls == [(3, "x"), (5, "x"), (5, "y")]
    assert ex.EXPLORER_CLASS in box._dom_classes
    assert all(ex.CONTROL_CLASS in c._dom_classes for c in box.controls.values())


def test_sliders_update_on_release():
    for w in (ex.int_slider(1, 0, 2), ex.float_slider(0.5, 0, 1, 0.1), ex.range_slider((0, 1), 0, 2, 0.1)):
        assert w.continuous_update is False


def test_a_failing_draw_is_reported_not_raised(capsys):
    def draw(a):
        plt.subplots()
        raise ValueError("no good")

    ex.explorer(draw, a=ex.int_slider(1, 0, 2))
    assert "cannot be drawn: ValueError: no good" in capsys.readouterr().out
    assert plt.get_fignums() == []  # the half-drawn figure is closed


@pytest.mark.parametrize("bad", [dict(), dict(a=3), dict(a=widgets.Output())])
def test_bad_controls_are_rejected(bad):
    with pytest.raises(ValueError, match="control|at least one"):
        ex.explorer(lambda **k: None, **bad)


def test_draw_must_be_callable():
    with pytest.raises(ValueError, match="draw must be callable"):
        ex.explorer(3, a=ex.int_slider(1, 0, 2))


def _redraw_changes_figure(box):
    """Move the first control one step; the explorer must draw again without an error."""
    control = next(iter(box.controls.values()))
    before = len(plt.get_fignums())
    if isinstance(control, widgets.SelectionSlider) or isinstance(control, widgets.Dropdown):
        control.index = (control.index + 1) % len(control.options)
    elif isinstance(control, widgets.FloatRangeSlider):
        lo, hi = control.value
        control.value = (lo, hi - control.step)
    elif isinstance(control, widgets.Checkbox):
        control.value = not control.value
    else:
        control.value = control.value + control.step if control.value + control.step <= control.max else control.min
    return before


def _explorers():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    x = torch.randn(500, generator=g)
    layer = torch.nn.Linear(8, 4)
    return {
        "quant": lambda: ll.quant_explorer(W),
        "group": lambda: ll.granularity.group_size_explorer(W),
        "clip": lambda: ll.clipping.clip_explorer(x.abs()),
        "ste": lambda: ll.qat.ste_mask_explorer(x),
        "twn": lambda: ll.binary.twn_explorer(W),
        "adaround": lambda: ll.adaround.adaround_explorer(
            layer, torch.randn(64, 8, generator=g), ll.adaround.AdaRoundConfig(num_bits=2), iters=5),
    }


@pytest.mark.parametrize("name", list(_explorers()))
def test_module_explorers_are_built_by_the_helper_and_redraw(name, capsys):
    box = _explorers()[name]()
    assert ex.EXPLORER_CLASS in box._dom_classes
    _redraw_changes_figure(box)
    out = capsys.readouterr().out
    assert "cannot be drawn" not in out, out
    plt.close("all")
