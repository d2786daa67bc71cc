"""Workbook runner and notebook conventions: execute every notebook headless, report, check.

Scope: three jobs the Makefile calls.

* ``run``: execute notebooks with papermill (FAST mode or full), each in its own folder as
  working directory; collect ``<out>/results/<stem>.json`` that each notebook's last cell
  writes; write ``<out>/executed/*.ipynb``, ``<out>/runs.json`` and one table in
  ``<out>/report.md`` (wall time and key results per notebook, failures marked).
* ``check``: the house conventions for a source notebook, as functions that return a list
  of problems (empty = fine), so tests/test_notebooks.py runs them on every notebook and
  tests/test_harness.py proves each one catches a bad notebook.

    python -m lecturelib.workbook run [--fast] [--out build] [notebooks...]
    python -m lecturelib.workbook check [notebooks...]

Run from the repository root (the default notebooks are ``notebooks/*.ipynb``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from .harness import FAST_ENV, MAX_THREADS, RESULTS_DIR_ENV, markdown_table
from . import figaudit
from .figaudit import AUDIT_ENV as FIGURE_AUDIT_ENV
from .kernel_polls import sliced_kernel_polls

NOTEBOOK_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
"""A notebook file name: ``NN_topic.ipynb``."""
MIN_GRADED_CHECKS = 3
"""Graded test cells each notebook 01 and up must have."""
PARAMETERS = {"FAST": bool, "SEED": int, "RESULTS_DIR": str}
"""Names the parameters cell assigns, with the literal type each must have."""
_ABS_PATH = re.compile(r"^(/[\w.-]+/|~[/\\]|[A-Za-z]:[\\/])")


# ============================================================================= running
@dataclass
class NotebookRun:
    """What happened when one notebook ran."""

    stem: str
    """Notebook file name without ``.ipynb``."""
    ok: bool
    """True if every cell ran and every graded cell passed."""
    seconds: float
    """Wall time of the execution, kernel start included."""
    fast: bool
    """Whether it ran in fast mode."""
    error: str = ""
    """Why it failed (first error), empty when ok."""
    results: dict[str, Any] = field(default_factory=dict)
    """The JSON the notebook saved (empty if it saved none)."""
    slowest_cells: list[str] = field(default_factory=list)
    """The slowest code cells as 'In [n] 12.3 s: first line', so a slow run names its cause."""
    figure_problems: list[str] = field(default_factory=list)
    """Figures drawn without a title or axis labels (lecturelib.figaudit)."""


@contextmanager
def patched_environ(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for kernels started inside the block; restore them after."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_env(fast: bool, results_dir: Path) -> dict[str, str]:
    """Environment for the notebook kernels: mode, results folder, pinned threads, hash seed."""
    threads = str(min(MAX_THREADS, os.cpu_count() or 1))
    return {
        FAST_ENV: "1" if fast else "0",
        RESULTS_DIR_ENV: str(results_dir.resolve()),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        # Idle OpenMP threads sleep instead of spinning: spinning made small models 50x
        # slower whenever another process wanted the CPU.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONHASHSEED": "0",
    }


def run_notebook(path: Path, out: Path, fast: bool, timeout: int | None = None) -> NotebookRun:
    """Execute one notebook with papermill into ``out/executed`` and read its results JSON.

    The kernel starts in the notebook's folder, gets ``FAST`` and ``RESULTS_DIR`` as
    parameters and WORKBOOK_FAST / WORKBOOK_RESULTS_DIR in its environment.
    """
    import papermill

    from .release import graded_failures

    stem = path.stem
    results_dir = out / "results"
    executed = out / "executed" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    results_file = results_dir / f"{stem}.json"
    results_file.unlink(missing_ok=True)  # never report a stale result
    audit_file = out / "figures" / f"{stem}.jsonl"
    audit_file.unlink(missing_ok=True)
    start = time.perf_counter()
    error = ""
    try:
        env = {**kernel_env(fast, results_dir), FIGURE_AUDIT_ENV: str(audit_file.resolve())}
        with patched_environ(env), sliced_kernel_polls():
            papermill.execute_notebook(
                str(path),
                str(executed),
                parameters={"FAST": fast, "RESULTS_DIR": str(results_dir.resolve())},
                cwd=str(path.parent),
                progress_bar=False,
                log_output=False,
                execution_timeout=timeout,
            )
    except papermill.PapermillExecutionError as exc:
        error = f"In [{exc.exec_count}]: {exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel died, bad JSON, timeout: report, keep going
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    slowest = slowest_cells(executed) if executed.is_file() else []
    if not error:
        failed = graded_failures(nbformat.read(executed, as_version=4))
        if failed:
            error = "graded cells failed: " + "; ".join(failed)
    results: dict[str, Any] = {}
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    elif not error:
        error = (
            f"no results: the last cell must call ll.save_results(results, RESULTS_DIR, {stem!r})"
        )
    return NotebookRun(stem, not error, round(seconds, 2), fast, error, results, slowest,
                       figaudit.read(audit_file))


def slowest_cells(executed: Path, top: int = 3) -> list[str]:
    """The ``top`` slowest code cells of a papermill-executed notebook, slowest first."""
    nb = nbformat.read(executed, as_version=4)
    timed = []
    for index, cell in enumerate(nb.cells):
        duration = cell.metadata.get("papermill", {}).get("duration")
        if cell.cell_type == "code" and duration is not None:
            first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
            timed.append((float(duration), f"cell {index} {float(duration):.1f} s: {_short(first, 70)}"))
    return [text for _, text in sorted(timed, reverse=True)[:top]]


def _short(text: str, width: int = 120) -> str:
    """First line of ``text``, at most ``width`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:37] + "..."
    return str(value)


def flatten_results(
    results: dict[str, Any], max_items: int = 4, prefix: str = ""
) -> dict[str, str]:
    """Flatten nested dicts to dotted keys with short printable values.

    Scalars print as they are (floats with 4 significant digits); a list of scalars
    shows its first ``max_items`` and its length; other lists only their length.
    """
    flat: dict[str, str] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_results(value, max_items, f"{name}."))
        elif isinstance(value, list):
            if all(not isinstance(v, (list, dict)) for v in value):
                shown = ", ".join(_fmt(v) for v in value[:max_items])
                more = f", ... (n={len(value)})" if len(value) > max_items else ""
                flat[name] = f"[{shown}{more}]"
            else:
                flat[name] = f"list(n={len(value)})"
        else:
            flat[name] = _fmt(value)
    return flat


def build_report(runs: list[NotebookRun], max_keys: int = 12) -> str:
    """One markdown table: notebook, status, wall time and its key results."""
    if not runs:
        raise ValueError("build_report needs at least one run, got 0")
    modes = {"fast" if r.fast else "full" for r in runs}
    rows = []
    for r in runs:
        flat = flatten_results(r.results)
        shown = [f"{k}={v}" for k, v in list(flat.items())[:max_keys]]
        if len(flat) > max_keys:
            shown.append(f"... (+{len(flat) - max_keys} more)")
        rows.append(
            {
                "notebook": r.stem,
                "status": "ok" if r.ok else f"**FAILED**: {_short(r.error)}",
                "wall time (s)": f"{r.seconds:.1f}",
                "key results": "; ".join(shown) or "-",
            }
        )
    failed = sum(not r.ok for r in runs)
    total = sum(r.seconds for r in runs)
    head = (
        f"# Workbook report ({'/'.join(sorted(modes))} mode)\n\n"
        f"{len(runs)} notebooks, {failed} failed, {total:.1f} s in total.\n\n"
    )
    return head + markdown_table(rows) + "\n"


def run_all(
    paths: list[Path], out: Path, fast: bool, timeout: int | None = None
) -> list[NotebookRun]:
    """Run every notebook, then write ``out/runs.json`` and ``out/report.md``.

    Used in: make workbook, make test.
    """
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for path in paths:
        print(f"[workbook] {path.name} ({'fast' if fast else 'full'}) ...", flush=True)
        run = run_notebook(path, out, fast, timeout)
        print(
            f"[workbook]   {'ok' if run.ok else 'FAILED: ' + run.error} ({run.seconds:.1f} s)",
            flush=True,
        )
        runs.append(run)
    (out / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    (out / "report.md").write_text(build_report(runs))
    return runs


# ============================================================================= checks
def code_cells(nb: Any) -> list[Any]:
    """The notebook's code cells, in order."""
    return [c for c in nb.cells if c.cell_type == "code"]


def parse_cell(source: str) -> ast.Module:
    """Parse a code cell, skipping IPython magics and shell lines (``%``, ``!``)."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def _parse_all(nb: Any) -> tuple[list[ast.Module | None], list[str]]:
    trees, problems = [], []
    for i, cell in enumerate(code_cells(nb)):
        try:
            trees.append(parse_cell(cell.source))
        except SyntaxError as exc:
            trees.append(None)
            problems.append(f"code cell {i} does not parse: {exc.msg} (line {exc.lineno})")
    return trees, problems


def check_filename(name: str) -> list[str]:
    """``NN_topic.ipynb``: two digits, underscore, lower-case letters/digits/underscores."""
    if NOTEBOOK_NAME.match(name):
        return []
    return [f"file name {name!r} must match {NOTEBOOK_NAME.pattern}"]


def check_numbering(names: list[str]) -> list[str]:
    """No two notebooks share a number."""
    seen: dict[str, str] = {}
    problems = []
    for name in sorted(names):
        num = name[:2]
        if num in seen:
            problems.append(f"{name} and {seen[num]} share the number {num}")
        seen.setdefault(num, name)
    return problems


def check_parameters_cell(nb: Any) -> list[str]:
    """The first code cell is tagged ``parameters`` and assigns FAST, SEED, RESULTS_DIR literals.

    papermill must be able to read each of them with its own (line-based) parser.
    """
    cells = code_cells(nb)
    if not cells:
        return ["the notebook has no code cells"]
    first = cells[0]
    problems = []
    if "parameters" not in first.metadata.get("tags", []):
        problems.append("the first code cell is not tagged 'parameters'")
    try:
        tree = parse_cell(first.source)
    except SyntaxError as exc:
        return problems + [f"the parameters cell does not parse: {exc.msg}"]
    values = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    values[t.id] = node.value
    for name, kind in PARAMETERS.items():
        value = values.get(name)
        if value is None:
            problems.append(f"the parameters cell does not assign {name}")
        elif not (isinstance(value, ast.Constant) and type(value.value) is kind):
            problems.append(f"the parameters cell must assign {name} a {kind.__name__} literal")
    rd = values.get("RESULTS_DIR")
    if isinstance(rd, ast.Constant) and isinstance(rd.value, str) and _ABS_PATH.match(rd.value):
        problems.append(f"RESULTS_DIR must be a relative path, got {rd.value!r}")
    seen_by_papermill = {p.name for p in _papermill_parameters(first.source)}
    for name in PARAMETERS:
        if name in values and name not in seen_by_papermill:
            problems.append(
                f"papermill cannot read {name} from the parameters cell "
                "(one assignment per line, no '=' inside a comment)"
            )
    return problems


def _papermill_parameters(source: str) -> list[Any]:
    """The parameters papermill infers from a parameters cell (its own parser, warnings muted)."""
    import logging

    from papermill.translators import PythonTranslator

    log = logging.getLogger("papermill")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return PythonTranslator.inspect({"source": source})
    finally:
        log.setLevel(level)


def _is_ll_call(node: ast.AST, name: str) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "ll"
    )


def check_resolves_fast(nb: Any) -> list[str]:
    """``import lecturelib as ll`` and ``FAST = ll.resolve_fast(FAST)`` before FAST is used."""
    trees, problems = _parse_all(nb)
    if problems:
        return problems
    imported = any(
        isinstance(n, ast.Import)
        and any(a.name == "lecturelib" and a.asname == "ll" for a in n.names)
        for t in trees
        for n in ast.walk(t)
    )
    if not imported:
        problems.append("no 'import lecturelib as ll'")
    for i, tree in enumerate(trees[1:], start=1):
        resolved = any(
            isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
            and n.targets[0].id == "FAST"
            and _is_ll_call(n.value, "resolve_fast")
            for n in tree.body
        )
        if resolved:
            return problems
        if any(isinstance(n, ast.Name) and n.id == "FAST" for n in ast.walk(tree)):
            return problems + [f"code cell {i} uses FAST before 'FAST = ll.resolve_fast(FAST)'"]
    return problems + ["no 'FAST = ll.resolve_fast(FAST)' after the parameters cell"]


def check_no_errors(nb: Any) -> list[str]:
    """No cell carries an error output."""
    return [
        f"code cell {i} has an error output ({o.get('ename')})"
        for i, c in enumerate(code_cells(nb))
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def check_clean_outputs(nb: Any) -> list[str]:
    """Committed sources carry no outputs and no execution counts."""
    return [
        f"code cell {i} has outputs or an execution count; clear them before committing"
        for i, c in enumerate(code_cells(nb))
        if c.get("outputs") or c.get("execution_count") is not None
    ]


def check_no_absolute_paths(nb: Any) -> list[str]:
    """No string literal in code is a machine path (``/home/x/...``, ``~/...``, ``C:\\...``)."""
    trees, problems = _parse_all(nb)
    for i, tree in enumerate(trees):
        for n in ast.walk(tree) if tree else []:
            if (
                isinstance(n, ast.Constant)
                and isinstance(n.value, str)
                and _ABS_PATH.match(n.value)
            ):
                problems.append(
                    f"code cell {i} names a machine path {n.value!r}; "
                    "use a path relative to the notebook"
                )
    return problems


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def pinned_distributions(requirements: str | Path) -> set[str]:
    """Normalised names of the distributions pinned with ``==`` in a requirements file."""
    names = set()
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==", line)
        if match:
            names.add(_norm(match.group(1)))
    return names


def imported_modules(nb: Any) -> list[tuple[int, str]]:
    """(code cell index, top-level module) for every import statement; relative imports as '.'."""
    found = []
    for i, cell in enumerate(code_cells(nb)):
        for n in ast.walk(parse_cell(cell.source)):
            if isinstance(n, ast.Import):
                found += [(i, a.name.split(".")[0]) for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                found.append((i, "." if n.level else (n.module or "").split(".")[0]))
    return found


def check_imports(nb: Any, pinned: set[str]) -> list[str]:
    """Every import is the standard library, ``lecturelib`` or a distribution in ``pinned``."""
    _, problems = _parse_all(nb)
    if problems:
        return problems
    dists = importlib.metadata.packages_distributions()
    for i, module in imported_modules(nb):
        if module == "lecturelib" or module in sys.stdlib_module_names:
            continue
        if module == ".":
            problems.append(f"code cell {i} uses a relative import")
            continue
        owners = {_norm(d) for d in dists.get(module, [])}
        if not owners & pinned:
            where = (
                f"distribution {', '.join(sorted(owners))}"
                if owners
                else "no installed distribution"
            )
            problems.append(
                f"code cell {i} imports {module!r} ({where}), which requirements.txt "
                "does not pin; use lecturelib or a pinned package"
            )
    return problems


def check_saves_results(nb: Any, stem: str) -> list[str]:
    """The last code cell calls ``ll.save_results(..., "<stem>")`` with this notebook's stem."""
    cells = code_cells(nb)
    if not cells:
        return ["the notebook has no code cells"]
    try:
        tree = parse_cell(cells[-1].source)
    except SyntaxError as exc:
        return [f"the last code cell does not parse: {exc.msg}"]
    for n in ast.walk(tree):
        if _is_ll_call(n, "save_results"):
            args = list(n.args[2:3]) + [k.value for k in n.keywords if k.arg == "stem"]
            if any(isinstance(a, ast.Constant) and a.value == stem for a in args):
                return []
            return [
                f"ll.save_results in the last code cell must name the stem {stem!r} as a literal"
            ]
    return [f"the last code cell must call ll.save_results(results, RESULTS_DIR, {stem!r})"]


def check_kernelspec(nb: Any) -> list[str]:
    """Kernel ``python3``, language python (papermill and nbval start that kernel)."""
    spec = nb.metadata.get("kernelspec", {})
    problems = []
    if spec.get("name") != "python3":
        problems.append(f"kernelspec name must be 'python3', got {spec.get('name')!r}")
    language = spec.get("language") or nb.metadata.get("language_info", {}).get("name")
    if language != "python":
        problems.append(f"kernel language must be 'python', got {language!r}")
    return problems


def check_nbgrader(nb: Any, stem: str) -> list[str]:
    """nbgrader markup: valid metadata, unique grade_ids, markers where they belong, enough checks.

    Code solution cells hold ``### BEGIN SOLUTION`` / ``### END SOLUTION``; graded cells
    have points > 0 (else ``validate --invert`` cannot see them fail); notebooks 01 and up
    have at least ``MIN_GRADED_CHECKS`` graded test cells.
    """
    from nbgrader.nbgraderformat import MetadataValidator, ValidationError

    problems = []
    try:
        MetadataValidator().validate_nb(nb)
    except ValidationError as exc:
        problems.append(f"invalid nbgrader metadata: {exc}")
    ids: dict[str, int] = {}
    checks = 0
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader", {})
        src = cell.source
        has_solution_marks = "BEGIN SOLUTION" in src or "END SOLUTION" in src
        if not meta:
            if has_solution_marks or "HIDDEN TESTS" in src:
                problems.append(f"cell {i} has nbgrader markers but no nbgrader metadata")
            continue
        gid = meta.get("grade_id")
        if gid in ids:
            problems.append(f"cell {i} repeats grade_id {gid!r} of cell {ids[gid]}")
        ids.setdefault(gid, i)
        solution, grade = meta.get("solution", False), meta.get("grade", False)
        if (
            solution
            and cell.cell_type == "code"
            and not ("### BEGIN SOLUTION" in src and "### END SOLUTION" in src)
        ):
            problems.append(
                f"solution cell {gid!r} lacks '### BEGIN SOLUTION' / '### END SOLUTION'"
            )
        if has_solution_marks and not solution:
            problems.append(f"cell {gid!r} has solution markers but is not a solution cell")
        if "HIDDEN TESTS" in src and not grade:
            problems.append(f"cell {gid!r} has hidden tests but is not a graded cell")
        if grade and not float(meta.get("points", 0)) > 0:
            problems.append(f"graded cell {gid!r} must have points > 0")
        if grade and not solution and cell.cell_type == "code":
            checks += 1
    if stem[:2] != "00" and checks < MIN_GRADED_CHECKS:
        problems.append(
            f"{checks} graded test cells; notebooks 01 and up need >= {MIN_GRADED_CHECKS}"
        )
    return problems


def check_notebook(path: Path, pinned: set[str]) -> list[str]:
    """Every per-notebook convention above, on the file at ``path``.

    Used in: python -m lecturelib.workbook check (tests/test_notebooks.py runs each check).
    """
    nb = nbformat.read(path, as_version=4)
    stem = path.stem
    return (
        check_filename(path.name)
        + check_kernelspec(nb)
        + check_parameters_cell(nb)
        + check_resolves_fast(nb)
        + check_no_errors(nb)
        + check_clean_outputs(nb)
        + check_no_absolute_paths(nb)
        + check_imports(nb, pinned)
        + check_saves_results(nb, stem)
        + check_nbgrader(nb, stem)
    )


# ============================================================================= CLI
def _notebooks(given: list[str]) -> list[Path]:
    paths = [Path(p) for p in given] or sorted(Path("notebooks").glob("*.ipynb"))
    if not paths:
        raise SystemExit("no notebooks found (run from the repository root)")
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"no such notebook: {p}")
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run`` or ``check``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m lecturelib.workbook", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks headless and write a report")
    run.add_argument("--fast", action="store_true", help="fast mode (FAST=True, WORKBOOK_FAST=1)")
    run.add_argument("--out", default="build", help="output folder (default: build)")
    run.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    run.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    check = sub.add_parser("check", help="check the notebook conventions")
    check.add_argument("--requirements", default="requirements.txt")
    check.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    paths = _notebooks(args.notebooks)
    if args.command == "run":
        runs = run_all(paths, Path(args.out), args.fast, args.timeout)
        print(f"[workbook] report: {Path(args.out) / 'report.md'}")
        return int(any(not r.ok for r in runs))
    pinned = pinned_distributions(args.requirements)
    problems = check_numbering([p.name for p in paths])
    for p in paths:
        problems += [f"{p.name}: {msg}" for msg in check_notebook(p, pinned)]
    print("\n".join(problems) or f"{len(paths)} notebooks follow the conventions")
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
