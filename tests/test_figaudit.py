"""lecturelib.figaudit: figures without titles or axis labels are reported, good ones are not."""

import matplotlib

matplotlib.use("Agg")
import io  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lecturelib import figaudit  # noqa: E402


def _fig(**kw):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 2])
    if kw.get("title"):
        ax.set_title("t")
    if kw.get("x"):
        ax.set_xlabel("x (s)")
    if kw.get("y"):
        ax.set_ylabel("y (ms)")
    return fig, ax


def test_complete_figure_has_no_problems():
    fig, _ = _fig(title=True, x=True, y=True)
    assert figaudit.figure_problems(fig) == []
    plt.close(fig)


def test_missing_title_and_labels_are_named():
    fig, _ = _fig()
    assert figaudit.figure_problems(fig) == ["axes 0: no title", "axes 0: no x label", "axes 0: no y label"]
    plt.close(fig)


def test_suptitle_shared_axes_twins_images_and_word_ticks_count():
    fig, (a, b) = plt.subplots(1, 2, sharey=True)
    for ax in (a, b):
        ax.plot([0, 1], [0, 1])
        ax.set_xlabel("x")
    a.set_ylabel("shared y")
    fig.suptitle("both panels")
    twin = a.twinx()
    twin.plot([0, 1], [3, 4])
    twin.set_ylabel("other y")
    assert figaudit.figure_problems(fig) == []
    fig2, (im, bars) = plt.subplots(1, 2)
    im.imshow(np.eye(3))
    im.axis("off")
    im.set_title("an image needs only a title")
    bars.bar(["fp32", "int8"], [1, 2])
    bars.set_ylabel("ms")
    bars.set_title("word ticks label themselves")
    assert figaudit.figure_problems(fig2) == []
    plt.close("all")


def test_install_records_every_rendered_figure(tmp_path, monkeypatch):
    out = tmp_path / "audit.jsonl"
    monkeypatch.delenv(figaudit.AUDIT_ENV, raising=False)
    assert figaudit.install() is False  # no file named: nothing to do
    try:
        assert figaudit.install(out) is True
        bad, _ = _fig(title=True)
        bad.savefig(io.BytesIO(), format="png")
        good, _ = _fig(title=True, x=True, y=True)
        good.savefig(io.BytesIO(), format="png")
    finally:
        figaudit.uninstall()
        plt.close("all")
    assert figaudit.read(out) == ["axes 0 ('t'): no x label", "axes 0 ('t'): no y label"]
    assert figaudit.read(tmp_path / "missing.jsonl") == []
