"""The browser run of make test (lecturelib.uitest), checked per notebook.

make test starts the browser run in the background next to pytest (the two share the CPU
better than they run one after the other) and points WORKBOOK_UITEST at the JSON report the
run writes when it ends. This file's name sorts last, so these tests wait for that report
while the rest of pytest has already run. Skipped where chromium is missing.
"""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
UITEST = os.environ.get("WORKBOOK_UITEST", "")
WAIT_S = float(os.environ.get("WORKBOOK_UITEST_WAIT_S", "1800"))


def _report() -> dict:
    path = Path(UITEST)
    deadline = time.monotonic() + WAIT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {WAIT_S:.0f} s: the browser run did not finish")
        time.sleep(2)
    return json.loads(path.read_text())


@pytest.mark.skipif(not UITEST, reason="WORKBOOK_UITEST not set (make test sets it)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_in_jupyterlab(path):
    """No error, every widget rendered, every explorer reacts to a moved control."""
    report = _report()
    if "skipped" in report:
        pytest.skip(report["skipped"])
    runs = {r["stem"]: r for r in report["results"]}
    assert path.stem in runs, f"{path.name} was not opened in JupyterLab"
    run = runs[path.stem]
    assert run["ok"], f"{path.name} in JupyterLab: " + " | ".join(run["errors"])
    assert run["widgets_rendered"] == run["widgets_expected"]
    assert run["explorers_reacting"] == run["explorers"]
