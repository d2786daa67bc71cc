"""The house conventions, enforced on every notebooks/*.ipynb, and the student release.

The checks themselves live in ``lecturelib.workbook`` (tests/test_harness.py shows each
one catches a bad notebook); here they run on the real notebooks.

What runs the notebooks, and how often (``make test``):

1. ``python -m lecturelib.workbook run --fast --out build/test`` runs each notebook once
   with papermill. It stands in for ``nbgrader validate`` on the source notebooks: papermill
   stops at the first error, and the runner then applies nbgrader's grading rule to the
   executed graded cells (an error, any stderr output or a partial-credit value fails).
   ``test_fast_run`` below turns that run into one test per notebook; it is skipped
   unless ``WORKBOOK_FAST_RUNS`` names its ``runs.json`` (``make test`` sets it).
2. ``pytest --nbval-lax notebooks/`` (same pytest process) runs each notebook again on a
   fresh kernel, in fast mode.
3. ``test_student_checks_fail_unsolved`` builds the student release once in a temporary
   folder and runs ``nbgrader validate --invert`` on each student notebook with graded
   cells: every check must fail on the unsolved version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cache
from pathlib import Path

import nbformat
import pytest

from lecturelib import harness, release, workbook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
PINNED = workbook.pinned_distributions(ROOT / "requirements.txt")
FAST_BUDGET_S = float(os.environ.get("WORKBOOK_FAST_BUDGET_S", "60"))
"""A notebook must run in fast mode within this many seconds (house style: a minute)."""


@cache
def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


CHECKS = {
    "filename": lambda nb, p: workbook.check_filename(p.name),
    "kernelspec": lambda nb, p: workbook.check_kernelspec(nb),
    "parameters_cell": lambda nb, p: workbook.check_parameters_cell(nb),
    "resolves_fast": lambda nb, p: workbook.check_resolves_fast(nb),
    "no_error_outputs": lambda nb, p: workbook.check_no_errors(nb),
    "clean_outputs": lambda nb, p: workbook.check_clean_outputs(nb),
    "no_absolute_paths": lambda nb, p: workbook.check_no_absolute_paths(nb),
    "pinned_imports": lambda nb, p: workbook.check_imports(nb, PINNED),
    "saves_results": lambda nb, p: workbook.check_saves_results(nb, p.stem),
    "nbgrader_markup": lambda nb, p: workbook.check_nbgrader(nb, p.stem),
}


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'notebooks'}"


def test_numbering_is_unique():
    assert workbook.check_numbering([p.name for p in NOTEBOOKS]) == []


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_convention(path, check):
    problems = CHECKS[check](_read(path), path)
    assert problems == [], f"{path.name}:\n  " + "\n  ".join(problems)


def test_readme_course_map_matches_lecturelib():
    readme = (ROOT / "README.md").read_text()
    assert harness.course_map_markdown() in readme, (
        "README.md's course map differs from ll.COURSE_MAP; paste ll.course_map_markdown()"
    )


def test_data_files_are_listed_with_sha256():
    """Every file under data/ appears in data/README.md with its sha256."""
    data = ROOT / "data"
    listing = (data / "README.md").read_text()
    for path in sorted(p for p in data.rglob("*") if p.is_file() and p.name != "README.md"):
        rel = path.relative_to(data).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert rel in listing, f"data/{rel} is not listed in data/README.md"
        assert digest in listing, f"data/{rel}: sha256 {digest} is not in data/README.md"


# ----------------------------------------------------------------------------- fast run (make test)
RUNS = os.environ.get("WORKBOOK_FAST_RUNS", "")


@pytest.mark.skipif(not RUNS, reason="WORKBOOK_FAST_RUNS not set (make test sets it)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_fast_run(path):
    runs_file = Path(RUNS)
    assert runs_file.is_file(), f"{runs_file} is missing: the fast papermill run did not finish"
    runs = {r["stem"]: r for r in json.loads(runs_file.read_text())}
    assert path.stem in runs, f"{path.name} was not run"
    run = runs[path.stem]
    assert run["fast"], "the run was not in fast mode"
    assert run["ok"], f"{path.name} failed in fast mode: {run['error']}"
    assert not run.get("figure_problems"), (
        f"{path.name}: figures need a title and axis labels: {run['figure_problems']}"
    )
    assert run["seconds"] <= FAST_BUDGET_S, (
        f"{path.name} took {run['seconds']:.0f} s in fast mode; the budget is {FAST_BUDGET_S:.0f} s; "
        f"slowest cells: {run.get('slowest_cells')}"
    )


# ----------------------------------------------------------------------------- student release
GRADED = [p for p in NOTEBOOKS if release.graded_cells(_read(p))]


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    release.student_release(NOTEBOOKS, out, ROOT / "data")
    return out / "notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_version_hides_solutions(path, student_dir):
    student = nbformat.read(student_dir / path.name, as_version=4)
    for cell in student.cells:
        assert not re.search(r"(BEGIN|END) (SOLUTION|HIDDEN TESTS)", cell.source), cell.source
        assert not cell.get("outputs")
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            grade_id = cell.metadata["nbgrader"]["grade_id"]
            assert f'raise NotImplementedError("exercise {grade_id} is not done yet' in cell.source


@pytest.mark.parametrize("path", GRADED, ids=[p.stem for p in GRADED])
def test_student_checks_fail_unsolved(path, student_dir):
    result = release.validate(student_dir / path.name, invert=True, fast=True)
    assert result.passed, (
        f"{path.name}: these checks pass on the unsolved student version:\n"
        + "\n".join(result.messages)
    )
