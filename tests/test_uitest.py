"""lecturelib.uitest: the real-browser check passes a good notebook and fails broken ones.

The browser tests start one JupyterLab and one headless Chromium for three tiny notebooks
(about a minute); they are skipped where Debian's chromium is not installed.
"""

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from lecturelib import uitest

HAS_CHROMIUM = shutil.which("chromium") is not None


def _nb(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


GOOD = [
    "import lecturelib as ll\nimport matplotlib.pyplot as plt",
    "def draw(n):\n    fig, ax = plt.subplots(figsize=(3, 2))\n    ax.set_title(f'n = {n}')\n"
    "ll.explorer(draw, title='demo', n=ll.int_slider(3, 1, 9))",
    "ll.save_results({'ok': 1}, '.', '91_good')",
]
DEAD = [  # the explorer ignores its control: moving it changes nothing
    "import lecturelib as ll",
    "ll.explorer(lambda n: print('always the same'), n=ll.int_slider(3, 1, 9))",
    "ll.save_results({'ok': 1}, '.', '92_dead')",
]
BROKEN = [
    "x = 1",
    "raise RuntimeError('a deliberate failure')",
    "import lecturelib as ll\nll.save_results({'ok': 1}, '.', '93_broken')",
]


def test_prepare_root_serves_copies_with_data_and_checkpoints_linked(tmp_path):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "data").mkdir()
    src = root / "notebooks" / "91_good.ipynb"
    nbformat.write(_nb(["1"]), src)
    serve = uitest.prepare_root(root, tmp_path / "out", [src])
    assert (serve / "91_good.ipynb").read_text() == src.read_text()
    assert (serve / ".." / "data").resolve() == (root / "data").resolve()
    assert (serve / ".." / "build" / "checkpoints").resolve() == (root / "build" / "checkpoints").resolve()
    settings = tmp_path / "out" / "lab-settings" / "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings"
    assert json.loads(settings.read_text()) == {"autosave": False}


def test_without_chromium_it_skips_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(uitest.shutil, "which", lambda name: None)
    report = uitest.run_all(tmp_path, [], tmp_path / "out", tmp_path / "screens")
    assert "chromium not found" in report["skipped"]
    assert "SKIPPED" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "uitest.json").read_text()) == report


def test_result_line_format():
    r = uitest.UIResult("01_x", ok=True, widgets_rendered=3)
    assert r.line() == "01_x: 3 widgets rendered, 0 errors"


@pytest.mark.skipif(not HAS_CHROMIUM, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_browser_passes_good_and_fails_dead_or_broken(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "data").mkdir()
    paths = []
    for name, cells in (("91_good", GOOD), ("92_dead", DEAD), ("93_broken", BROKEN)):
        paths.append(root / "notebooks" / f"{name}.ipynb")
        nbformat.write(_nb(cells), paths[-1])
    report = uitest.run_all(root, paths, tmp_path / "out", tmp_path / "screens", explorer_timeout=10)
    by = {r["stem"]: r for r in report["results"]}
    good, dead, broken = by["91_good"], by["92_dead"], by["93_broken"]
    assert good["ok"], good["errors"]
    assert good["widgets_rendered"] == good["widgets_expected"] == 1 and good["explorers_reacting"] == 1
    assert Path(good["screenshot"]).is_file()
    assert not dead["ok"] and any("did not change" in e for e in dead["errors"])
    assert not broken["ok"] and any("deliberate failure" in e for e in broken["errors"])
    out = capsys.readouterr().out
    assert "91_good: 1 widgets rendered, 0 errors" in out and "1 passed, 2 failed" in out


@pytest.mark.skipif(not HAS_CHROMIUM, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_sigterm_stops_the_server_and_its_kernels(tmp_path):
    """Killing the runner (a CI timeout) must not leave JupyterLab or kernels behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "data").mkdir()
    nbformat.write(_nb(["import time\ntime.sleep(120)"]), root / "notebooks" / "94_slow.ipynb")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lecturelib.uitest", "--out", str(out), "--screens",
                             str(tmp_path / "screens")], cwd=root)
    log = out / "server.log"
    deadline = time.monotonic() + 120
    while "Kernel started" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "the server or kernel never started"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(out / "notebooks")], capture_output=True, text=True).stdout.split()
    assert [pid for pid in left if int(pid) != os.getpid()] == []
    kernels = subprocess.run(["pgrep", "-f", "ipykernel_launcher"], capture_output=True, text=True).stdout.split()
    serve = str((out / "notebooks").resolve())
    ours = []
    for pid in kernels:
        try:
            if os.readlink(f"/proc/{pid}/cwd") == serve:
                ours.append(pid)
        except OSError:
            pass
    assert ours == [], "kernels of the killed run are still alive"
