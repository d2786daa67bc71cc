"""Turn a percent-format draft (``notebooks/drafts/*.py``) into a workbook notebook.

A draft is a plain Python file split into cells by ``# %%`` lines::

    # %% [markdown]                      a markdown cell; its lines start with "# "
    # %% tags=["parameters"]             a code cell with tags
    # %% nbgrader={"solution": true, "grade_id": "ex1"}              an exercise cell
    # %% nbgrader={"grade": true, "grade_id": "ex1_check", "points": 2}   its graded check

The nbgrader metadata is completed the way ``nbgrader generate_assignment`` expects it
(schema 3; graded checks are locked). Outputs are never written: notebooks are committed empty.

    python -m lecturelib.authoring notebooks/drafts/07_mixed_precision.py notebooks/07_mixed_precision.ipynb

Used in: moving a draft into notebooks/ (see notebooks/drafts/README.md).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import nbformat

_HEADER = re.compile(r"^# %%(?P<rest>.*)$")
_KEYVAL = re.compile(r'(\w+)=(\[[^\]]*\]|\{[^}]*\})')
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _parse_header(rest: str, lineno: int) -> tuple[str, dict[str, Any]]:
    """Cell type and metadata from the text after ``# %%``."""
    rest = rest.strip()
    cell_type = "code"
    if rest.startswith("[markdown]"):
        cell_type, rest = "markdown", rest[len("[markdown]"):].strip()
    meta: dict[str, Any] = {}
    for key, value in _KEYVAL.findall(rest):
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno}: {key}= is not valid JSON: {value}") from exc
    leftover = _KEYVAL.sub("", rest).strip()
    if leftover:
        raise ValueError(
            f"line {lineno}: cannot read '{leftover}' in a cell header; allowed: [markdown], "
            'tags=[...], nbgrader={...}'
        )
    return cell_type, meta


def _nbgrader_meta(meta: dict[str, Any], lineno: int) -> dict[str, Any]:
    """Complete an nbgrader dict: solution/grade/locked/schema_version/points."""
    if "grade_id" not in meta:
        raise ValueError(f"line {lineno}: nbgrader metadata needs a grade_id")
    grade, solution = bool(meta.get("grade", False)), bool(meta.get("solution", False))
    if grade and "points" not in meta:
        raise ValueError(f"line {lineno}: a graded cell needs points")
    out = {"grade": grade, "grade_id": meta["grade_id"], "locked": grade and not solution,
           "schema_version": 3, "solution": solution}
    if grade:
        out["points"] = meta["points"]
    return out


def _markdown_source(lines: list[str], lineno: int) -> str:
    body = []
    for i, line in enumerate(lines):
        if line == "#":
            body.append("")
        elif line.startswith("# "):
            body.append(line[2:])
        elif line.strip() == "":
            body.append("")
        else:
            raise ValueError(f"line {lineno + i + 1}: markdown lines must start with '# ', got {line!r}")
    return "\n".join(body).strip("\n")


def percent_to_notebook(text: str) -> nbformat.NotebookNode:
    """Parse a percent-format draft into a notebook with no outputs."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    if not starts:
        raise ValueError("the draft has no '# %%' cell markers")
    cells = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        cell_type, meta = _parse_header(_HEADER.match(lines[start])["rest"], start + 1)
        body = lines[start + 1:end]
        if cell_type == "markdown":
            cell = nbformat.v4.new_markdown_cell(_markdown_source(body, start + 1))
        else:
            cell = nbformat.v4.new_code_cell("\n".join(body).strip("\n"))
        if "tags" in meta:
            cell.metadata["tags"] = meta["tags"]
        if "nbgrader" in meta:
            cell.metadata["nbgrader"] = _nbgrader_meta(meta["nbgrader"], start + 1)
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    # Stable ids, so re-converting an unchanged draft gives an identical file.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    return nb


def convert(src: Path, dst: Path) -> nbformat.NotebookNode:
    """Read ``src`` (percent format), validate, and write ``dst`` (.ipynb)."""
    nb = percent_to_notebook(Path(src).read_text())
    nbformat.validate(nb)
    nbformat.write(nb, str(dst))
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="percent-format draft (.py)")
    parser.add_argument("dst", type=Path, help="notebook to write (.ipynb)")
    args = parser.parse_args(argv)
    nb = convert(args.src, args.dst)
    print(f"{args.dst}: {len(nb.cells)} cells")


if __name__ == "__main__":
    main()
