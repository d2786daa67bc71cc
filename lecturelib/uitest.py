"""The workbook in a real JupyterLab: run every notebook in headless Chromium and check its widgets.

For each notebook: open it in JupyterLab, *Run → Run All Cells* (fast mode: the server's
environment has WORKBOOK_FAST=1), wait until every code cell has run, then check

* no error output (a traceback or a kernel that died) and the results JSON was written;
* every widget view the notebook displays is rendered and visible (``.jupyter-widgets``);
* every explorer (``ll.explorer``, CSS class ``ll-explorer``) reacts: one control is moved
  with the keyboard or a click, and the explorer's output must change;

and save a screenshot to ``build/screens/<notebook>.png``. One line per notebook, then
``N passed, M failed``. The server runs on 127.0.0.1 with a random token and port, serves a
*copy* of notebooks/ (JupyterLab saves what it runs; the sources stay clean) and is stopped
with its kernels even when a check fails.

    python -m lecturelib.uitest [--out build/uitest] [--screens build/screens] [notebooks...]

Needs Debian's ``chromium`` on PATH and the ``playwright`` package (no browser download:
Chromium is started from ``shutil.which("chromium")``). Without Chromium it prints why and
exits 0 after writing ``{"skipped": reason}``, so ``make test`` runs on machines without it.
Used in: make uitest, make test (tests/test_notebooks.py::test_in_jupyterlab reads its JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
LAB_SETTINGS = {  # no news pop-up, no update check, no autosave of the served copies
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


@dataclass
class UIResult:
    """What one notebook did in the browser."""

    stem: str
    ok: bool = False
    seconds: float = 0.0
    widgets_expected: int = 0
    widgets_rendered: int = 0
    explorers: int = 0
    explorers_reacting: int = 0
    errors: list[str] = field(default_factory=list)
    screenshot: str = ""

    def line(self) -> str:
        return f"{self.stem}: {self.widgets_rendered} widgets rendered, {len(self.errors)} errors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_root(root: Path, out: Path, notebooks: list[Path]) -> Path:
    """Copy the notebooks to ``out/notebooks`` with ``../data`` and ``../build/checkpoints`` linked."""
    serve = out / "notebooks"
    if serve.exists():
        shutil.rmtree(serve)
    serve.mkdir(parents=True)
    for nb in notebooks:
        shutil.copy2(nb, serve / nb.name)
    links = {out / "data": root / "data", out / "build" / "checkpoints": root / "build" / "checkpoints"}
    for link, target in links.items():
        target.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(target.resolve(), target_is_directory=True)
    settings = out / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return serve


@contextmanager
def lab_server(serve: Path, out: Path, jupyter: str) -> Iterator[tuple[str, str]]:
    """JupyterLab on 127.0.0.1 (free port, random token); yields (base URL, token); always stopped."""
    port, token = _free_port(), secrets.token_hex(24)
    env = dict(os.environ, WORKBOOK_FAST="1", WORKBOOK_RESULTS_DIR=str((out / "results").resolve()),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), OMP_WAIT_POLICY="PASSIVE",
               JUPYTERLAB_SETTINGS_DIR=str((out / "lab-settings").resolve()))
    cmd = [jupyter, "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={serve.resolve()}", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(out / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {out / 'server.log'}") from None
                time.sleep(0.5)
        yield base, token
    finally:
        _stop(proc, base, token)
        log.close()


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the kernels down through the API, then the server; kill whatever is left."""
    _shutdown_kernels(base, token)
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


# JavaScript run in the page: read the notebook's state from the DOM.
_STATE_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')]
    .map(e => e.textContent.trim());
  const errors = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
    .filter(e => e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr'
                 && /Traceback|\\w+(Error|Exception)\\b.*:|Kernel (died|Restarting)/.test(e.textContent))
    .map(e => e.textContent.slice(0, 300));
  // A widget view is an output without a mime renderer of its own (ipywidgets mounts a Panel);
  // a widget the front end cannot show falls back to its text repr, e.g. "VBox(children=...".
  const outs = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')];
  const views = outs.filter(e => e.getAttribute('data-mime-type') === null
      || (e.getAttribute('data-mime-type') === 'text/plain' && /^[A-Z][A-Za-z]*\((children|value|layout|description)=/.test(e.textContent.trim())));
  const rendered = views.filter(v => [...v.querySelectorAll('.jupyter-widgets')].some(
      w => { const r = w.getBoundingClientRect(); return w.offsetParent !== null && r.width > 0 && r.height > 0; }));
  const broken = views.filter(v => /Error displaying widget|Loading widget/.test(v.textContent)).length;
  return {prompts, errors, views: views.length, rendered: rendered.length, broken,
          explorers: document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .ll-explorer').length,
          dialog: [...document.querySelectorAll('.jp-Dialog-header')].map(e => e.textContent)};
}"""


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate(_STATE_JS)


def _wait_for_run(page: Any, n_code: int, timeout: float) -> dict[str, Any]:
    """Until every code cell shows a number and none a star (stable for 2 polls), or an error."""
    deadline, stable = time.monotonic() + timeout, 0
    while True:
        st = _state(page)
        done = len(st["prompts"]) == n_code and all(p.startswith("[") and p[1:-2].isdigit() for p in st["prompts"])
        stable = stable + 1 if done else 0
        if stable >= 2 or st["errors"] or st["dialog"]:
            return st
        if time.monotonic() > deadline:
            st["errors"].append(f"timed out after {timeout:.0f} s; prompts: {st['prompts'][-3:]}")
            return st
        time.sleep(1.0)


def _move_control(page: Any, explorer: Any) -> None:
    """Change the explorer's first control the way a student would."""
    control = explorer.locator(".ll-control").first
    handle = control.locator(".noUi-handle")
    if handle.count():
        handle.first.focus()
        value = handle.first.get_attribute("aria-valuenow")
        top = handle.first.get_attribute("aria-valuemax")
        page.keyboard.press("ArrowLeft" if value is not None and value == top else "ArrowRight")
        return
    select = control.locator("select")
    if select.count():
        options = select.first.locator("option").all_text_contents()
        current = select.first.input_value()
        nxt = next((o for o in options if o != current), current)
        select.first.select_option(label=nxt)
        return
    control.locator("input").first.click()


def _output_html(explorer: Any) -> str:
    """What the student sees in the explorer's output: its text and its images (by content)."""
    return explorer.evaluate(
        "e => { const o = e.querySelector('.widget-output');"
        " if (!o) return '';"
        " return o.innerText + [...o.querySelectorAll('img')].map(i => i.src).join('|'); }")


def check_explorers(page: Any, timeout: float) -> tuple[int, list[str]]:
    """Move one control per explorer; count those whose output changed."""
    reacting, errors = 0, []
    explorers = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .ll-explorer")
    for i in range(explorers.count()):
        ex = explorers.nth(i)
        ex.scroll_into_view_if_needed()
        before = _output_html(ex)
        _move_control(page, ex)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            after = _output_html(ex)
            if after and after != before and "Loading" not in after:
                reacting += 1
                if "cannot be drawn" in ex.inner_text():
                    errors.append(f"explorer {i}: {ex.inner_text()[-200:]}")
                break
        else:
            errors.append(f"explorer {i}: its output did not change within {timeout:.0f} s of moving a control")
    return reacting, errors


def run_in_lab(page: Any, base: str, token: str, nb: Path, results_dir: Path, screens: Path,
               timeout: float = 240.0, explorer_timeout: float = 90.0) -> UIResult:
    """Open ``nb`` in JupyterLab, run all cells, check errors, widgets and explorers, screenshot."""
    import nbformat

    res = UIResult(nb.stem)
    n_code = sum(c.cell_type == "code" for c in nbformat.read(nb, as_version=4).cells)
    start = time.perf_counter()
    results_file = results_dir / f"{nb.stem}.json"
    results_file.unlink(missing_ok=True)
    page.goto(f"{base}/lab/tree/{nb.name}?reset&token={token}")  # reset: no tabs from before
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=60_000)
    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('Idle')", timeout=90_000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    st = _wait_for_run(page, n_code, timeout)
    res.errors += [f"error output: {e}" for e in st["errors"]] + [f"dialog: {d}" for d in st["dialog"]]
    if not res.errors and not results_file.is_file():
        res.errors.append(f"no results file {results_file.name}: the last cell did not run")
    res.widgets_expected, res.widgets_rendered, res.explorers = st["views"], st["rendered"], st["explorers"]
    if st["broken"] or res.widgets_rendered < res.widgets_expected:
        res.errors.append(f"{res.widgets_expected - res.widgets_rendered + st['broken']} widget views not rendered")
    if not res.errors:
        res.explorers_reacting, errs = check_explorers(page, timeout=explorer_timeout)
        res.errors += errs
    target = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .ll-explorer")
    if target.count():
        target.first.scroll_into_view_if_needed()
    screens.mkdir(parents=True, exist_ok=True)
    res.screenshot = str(screens / f"{nb.stem}.png")
    page.screenshot(path=res.screenshot)
    res.seconds = round(time.perf_counter() - start, 1)
    res.ok = not res.errors
    # Close the tab and its kernel so the next notebook starts alone.
    page.keyboard.press("Escape")
    return res


def run_all(root: Path, notebooks: list[Path], out: Path, screens: Path, timeout: float = 240.0,
            explorer_timeout: float = 90.0) -> dict[str, Any]:
    """Run every notebook in one server and one browser; return the report (also saved).

    ``timeout``: seconds for Run All per notebook; ``explorer_timeout``: seconds an explorer
    may take to redraw after a control moved."""
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "uitest.json"
    chromium = shutil.which("chromium")
    if chromium is None:
        reason = "chromium not found on PATH (Debian: apt-get install chromium); browser checks skipped"
        report_path.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        print(f"uitest SKIPPED: {reason}")
        return {"skipped": reason}
    from playwright.sync_api import sync_playwright

    serve = prepare_root(root, out, notebooks)
    jupyter = str(Path(sys.executable).with_name("jupyter"))
    results: list[UIResult] = []
    with lab_server(serve, out, jupyter) as (base, token), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            for nb in notebooks:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                try:
                    r = run_in_lab(page, base, token, serve / nb.name, out / "results", screens, timeout,
                                   explorer_timeout)
                except Exception as exc:  # a browser or server failure fails this notebook, not the run
                    r = UIResult(nb.stem, errors=[f"{type(exc).__name__}: {str(exc)[:300]}"])
                finally:
                    page.close()
                    _shutdown_kernels(base, token)
                print(r.line() + ("" if r.ok else "  FAILED: " + " | ".join(r.errors)), flush=True)
                results.append(r)
        finally:
            browser.close()
    passed = sum(r.ok for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    report = {"results": [asdict(r) for r in results], "passed": passed, "failed": len(results) - passed}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _shutdown_kernels(base: str, token: str) -> None:
    try:
        with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as r:
            for k in json.loads(r.read()):
                req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lecturelib.uitest", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=Path("build/uitest"))
    parser.add_argument("--screens", type=Path, default=Path("build/screens"))
    args = parser.parse_args(argv)
    # A SIGTERM (a CI timeout, make's trap) becomes SystemExit, so the finally blocks stop
    # the browser, the kernels and the server instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    root = Path.cwd()
    notebooks = args.notebooks or sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    report = run_all(root, [p.resolve() for p in notebooks], args.out, args.screens)
    return 0 if report.get("skipped") or report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
