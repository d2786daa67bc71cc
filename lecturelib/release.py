"""Student release and validation with nbgrader's own preprocessors, without a gradebook database.

Scope: the part of ``nbgrader generate_assignment`` a course without a grading server
needs, run through nbconvert's ``NotebookExporter``:

    LockCells -> ClearSolutions -> ClearOutput -> CheckCellMetadata -> ComputeChecksums
      -> ClearHiddenTests -> ClearMarkScheme -> ComputeChecksums -> CheckCellMetadata

This is nbgrader 0.9.6's ``GenerateAssignment.preprocessors`` order minus
IncludeHeaderFooter (no header file), InstantiateTests (we write no ``### AUTOTEST``
cells) and SaveCells (it needs the gradebook database). ClearSolutions turns each
``### BEGIN SOLUTION ... ### END SOLUTION`` region into
``# YOUR CODE HERE`` / ``raise NotImplementedError()``; ClearHiddenTests deletes each
``### BEGIN HIDDEN TESTS ... ### END HIDDEN TESTS`` region.

``validate`` runs nbgrader's ``Validator`` (what ``nbgrader validate [--invert]`` runs).
A source notebook passes when no graded cell fails; a student notebook passes
``invert=True`` when no graded cell passes, which proves every check can fail.

    python -m lecturelib.release student --out build/student [--check] [notebooks...]
    python -m lecturelib.release validate [--invert] [--full] notebooks...
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbconvert.exporters import NotebookExporter
from nbconvert.filters import strip_ansi
from nbgrader import utils as nbgrader_utils
from nbgrader.preprocessors import (
    CheckCellMetadata,
    ClearHiddenTests,
    ClearMarkScheme,
    ClearOutput,
    ClearSolutions,
    ComputeChecksums,
    LockCells,
)
from nbgrader.validator import Validator
from traitlets.config import Config

from .kernel_polls import sliced_kernel_polls
from .workbook import kernel_env, patched_environ

EXERCISE_STUB = (
    "# YOUR CODE HERE\n"
    "raise NotImplementedError(\"exercise {grade_id} is not done yet: replace this line with "
    "your code, run the cell, then the check below it (the rest of the notebook does not need it)\")"
)
"""What a cleared solution becomes: it names its exercise, so a skipped one is easy to find."""


class ClearSolutionsNamed(ClearSolutions):
    """nbgrader's ClearSolutions with a stub that names the exercise (its grade_id)."""

    def preprocess_cell(self, cell: Any, resources: Any, cell_index: int) -> Any:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "?")
        self.code_stub = {**self.code_stub, "python": EXERCISE_STUB.format(grade_id=grade_id)}
        return super().preprocess_cell(cell, resources, cell_index)


STUDENT_PREPROCESSORS = (
    LockCells,
    ClearSolutionsNamed,
    ClearOutput,
    CheckCellMetadata,
    ComputeChecksums,
    ClearHiddenTests,
    ClearMarkScheme,
    ComputeChecksums,
    CheckCellMetadata,
)
"""nbgrader's generate_assignment order without the header, autotest and database steps."""
CELL_TIMEOUT = 600
"""Seconds one cell may run during validation (nbgrader's default of 30 is too short)."""


def graded_cells(nb: Any) -> list[Any]:
    """Code cells with ``nbgrader.grade: true`` that are not solution cells (the checks)."""
    return [
        c
        for c in nb.cells
        if c.cell_type == "code"
        and nbgrader_utils.is_grade(c)
        and not nbgrader_utils.is_solution(c)
    ]


def graded_failures(nb: Any) -> list[str]:
    """grade_ids of graded cells in an executed notebook that nbgrader would score below full marks.

    Same rule as nbgrader's autograder: an error or any stderr output scores 0, a last
    expression that is a number is partial credit.
    Used in: make workbook, make test (the fast papermill run).
    """
    failed = []
    for cell in graded_cells(nb):
        score, max_score = nbgrader_utils.determine_grade(cell)
        if score is not None and score < max_score:
            errors = [
                o.get("ename", "stderr")
                for o in cell.get("outputs", [])
                if o.get("output_type") == "error" or o.get("name") == "stderr"
            ]
            why = errors[0] if errors else f"partial credit {score}/{max_score}"
            failed.append(f"{cell.metadata.nbgrader.get('grade_id')} ({why})")
    return failed


def student_notebook(nb: Any) -> Any:
    """The student version of a source notebook (a new NotebookNode; ``nb`` is left alone).

    Used in: make student, tests/test_notebooks.py.
    """
    exporter = NotebookExporter(config=Config())
    for preprocessor in STUDENT_PREPROCESSORS:
        exporter.register_preprocessor(preprocessor, enabled=True)
    body, _ = exporter.from_notebook_node(nb, resources={})
    return nbformat.reads(body, as_version=4)


def student_release(
    sources: list[Path], out: Path, data_dir: Path | None = Path("data")
) -> list[Path]:
    """Write ``out/notebooks/*.ipynb`` (student versions) and copy ``data_dir`` to ``out/data``.

    The layout mirrors the repository, so a notebook's ``../data/...`` paths still work.
    Returns the written notebook paths.
    Used in: make student, tests/test_notebooks.py.
    """
    if not sources:
        raise ValueError("student_release needs at least one source notebook, got 0")
    nb_out = out / "notebooks"
    shutil.rmtree(nb_out, ignore_errors=True)
    nb_out.mkdir(parents=True)
    written = []
    for src in sources:
        target = nb_out / Path(src).name
        nbformat.write(student_notebook(nbformat.read(src, as_version=4)), target)
        written.append(target)
    if data_dir is not None and Path(data_dir).is_dir():
        shutil.rmtree(out / "data", ignore_errors=True)
        shutil.copytree(data_dir, out / "data")
    return written


@dataclass
class ValidationResult:
    """What nbgrader's Validator said about one notebook."""

    path: str
    """The notebook validated."""
    invert: bool
    """True: every graded cell had to fail; False: every graded cell had to pass."""
    passed: bool
    """True if the notebook passed in the requested direction."""
    graded: int
    """Number of graded test cells."""
    messages: list[str]
    """Why it did not pass (cell sources and errors), empty when it passed."""


def validate(
    path: str | Path, invert: bool = False, fast: bool = True, timeout: int = CELL_TIMEOUT
) -> ValidationResult:
    """Run nbgrader's Validator on ``path`` in a fresh kernel (fast mode by default).

    ``invert=True`` on a notebook without graded cells does not pass: it would pass
    vacuously. Results the notebook saves go to a temporary folder.
    Used in: tests/test_notebooks.py (student release), ``make student CHECK=1``.
    """
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    graded = len(graded_cells(nb))
    if invert and graded == 0:
        return ValidationResult(
            str(path),
            invert,
            False,
            0,
            ["no graded cells: an inverted validation would pass vacuously"],
        )
    cfg = Config()
    cfg.Validator.invert = invert
    cfg.Execute.timeout = timeout
    validator = _KeepingValidator(config=cfg)
    with (
        tempfile.TemporaryDirectory() as tmp,
        patched_environ(kernel_env(fast, Path(tmp))),
        sliced_kernel_polls(),
    ):
        found = dict(validator.validate(str(path)))
    if invert and validator.executed is not None:
        cascade = cascade_errors(validator.executed)
        if cascade:
            found["cascade"] = cascade
    messages = []
    for kind, cells in found.items():
        for cell in cells:
            detail = cell.get("raw_error") or cell.get("new_type", "")
            messages.append(
                strip_ansi(f"{kind}: {cell.get('source', '')[:200]}\n{detail}").rstrip()
            )
    return ValidationResult(str(path), invert, not found, graded, messages)


class _KeepingValidator(Validator):
    """nbgrader's Validator that keeps the notebook it executed (``executed``)."""

    executed: Any = None

    def _preprocess(self, nb: Any) -> Any:
        self.executed = super()._preprocess(nb)
        return self.executed


def cascade_errors(nb: Any) -> list[dict[str, str]]:
    """Errors in an executed student notebook outside exercise and check cells.

    On the unsolved release only an exercise cell or its graded check may fail; any other
    cell that fails depends on an exercise and would punish a student who skipped it.
    """
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code" or nbgrader_utils.is_grade(cell) or nbgrader_utils.is_solution(cell):
            continue
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append({"source": cell.source, "raw_error": f"{o.get('ename')}: {o.get('evalue')} "
                            "(an ordinary cell depends on an exercise)"})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``student`` or ``validate``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lecturelib.release")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("student", help="write the student release")
    st.add_argument("--out", default="build/student")
    st.add_argument("--data", default="data", help="folder copied to <out>/data")
    st.add_argument(
        "--check",
        action="store_true",
        help="then validate --invert every student notebook with graded cells",
    )
    st.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    va = sub.add_parser("validate", help="nbgrader validate, fast mode unless --full")
    va.add_argument("--invert", action="store_true")
    va.add_argument("--full", action="store_true")
    va.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "student":
        sources = [Path(p) for p in args.notebooks] or sorted(Path("notebooks").glob("*.ipynb"))
        written = student_release(sources, Path(args.out), Path(args.data))
        print(f"[release] {len(written)} student notebooks in {Path(args.out) / 'notebooks'}")
        if not args.check:
            return 0
        targets = [p for p in written if graded_cells(nbformat.read(p, as_version=4))]
        results = [validate(p, invert=True) for p in targets]
    else:
        results = [validate(p, invert=args.invert, fast=not args.full) for p in args.notebooks]
    for r in results:
        print(
            f"[release] {'ok  ' if r.passed else 'FAIL'} {r.path} (graded cells: {r.graded}, "
            f"invert={r.invert})"
        )
        for m in r.messages:
            print("    " + m.replace("\n", "\n    "))
    return int(not all(r.passed for r in results))


if __name__ == "__main__":
    sys.exit(main())
