"""Tests for lecturelib.harness, lecturelib.workbook and lecturelib.release.

The notebook checkers are fed small in-memory notebooks, good and bad, so each check is
shown to fail when it should. The release pipeline and the runner run on tiny notebooks
in a temporary folder (a few kernel starts, ~30 s in all).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lecturelib import harness, release, workbook
from lecturelib.harness import resolve_fast, save_results, seed_everything, set_threads

ROOT = Path(__file__).resolve().parents[1]
PINNED = workbook.pinned_distributions(ROOT / "requirements.txt")
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


# ============================================================================= resolve_fast
@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", " yes "])
def test_resolve_fast_env_on(monkeypatch, value):
    monkeypatch.setenv("WORKBOOK_FAST", value)
    assert resolve_fast(False) is True


@pytest.mark.parametrize("value", ["", "0", "false", "No"])
def test_resolve_fast_env_off_keeps_parameter(monkeypatch, value):
    monkeypatch.setenv("WORKBOOK_FAST", value)
    assert resolve_fast(False) is False
    assert resolve_fast(True) is True


def test_resolve_fast_unset(monkeypatch):
    monkeypatch.delenv("WORKBOOK_FAST", raising=False)
    assert resolve_fast(False) is False
    assert resolve_fast(True) is True


@pytest.mark.parametrize("value", ["2", "fast", "on", "y"])
def test_resolve_fast_bad_env(monkeypatch, value):
    monkeypatch.setenv("WORKBOOK_FAST", value)
    with pytest.raises(ValueError, match="WORKBOOK_FAST.*'1'.*'no'"):
        resolve_fast(False)


@pytest.mark.parametrize("fast", [1, "True", None])
def test_resolve_fast_rejects_non_bool(monkeypatch, fast):
    monkeypatch.delenv("WORKBOOK_FAST", raising=False)
    with pytest.raises(ValueError, match="fast must be a bool"):
        resolve_fast(fast)


@given(st.text(max_size=8), st.booleans())
def test_resolve_fast_property(value, fast):
    # no monkeypatch fixture under hypothesis: patch os.environ by hand
    old = os.environ.get("WORKBOOK_FAST")
    try:
        if "\x00" in value:
            return
        os.environ["WORKBOOK_FAST"] = value
        key = value.strip().lower()
        if key in ("1", "true", "yes"):
            assert resolve_fast(fast) is True
        elif key in ("", "0", "false", "no"):
            assert resolve_fast(fast) is fast
        else:
            with pytest.raises(ValueError):
                resolve_fast(fast)
    finally:
        if old is None:
            os.environ.pop("WORKBOOK_FAST", None)
        else:
            os.environ["WORKBOOK_FAST"] = old


# ============================================================================= seeds, threads
def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0"])
def test_seed_everything_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        n = set_threads()
        assert n == min(2, os.cpu_count() or 1) and torch.get_num_threads() == n
        for bad in (0, -2, 1.0, True):
            with pytest.raises(ValueError, match="n must be"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


# ============================================================================= save_results
def test_save_results_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBOOK_RESULTS_DIR", raising=False)
    results = {"b": 1, "a": {"acc": 0.5, "bits": [2, 4, 8]}, "ok": True, "name": "x", "none": None}
    path = save_results(results, tmp_path / "new" / "dir", "03_clipping")
    assert path == tmp_path / "new" / "dir" / "03_clipping.json"
    text = path.read_text()
    assert json.loads(text) == results
    assert text == json.dumps(results, indent=2, sort_keys=True) + "\n"


def test_save_results_env_overrides_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBOOK_RESULTS_DIR", str(tmp_path / "env"))
    path = save_results({"x": 1}, tmp_path / "param", "01_linear_quantization")
    assert path == tmp_path / "env" / "01_linear_quantization.json"
    assert not (tmp_path / "param").exists()


def test_save_results_converts_numpy_and_torch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBOOK_RESULTS_DIR", raising=False)
    results = {
        "np_f32": np.float32(0.25),
        "np_i64": np.int64(3),
        "np_bool": np.bool_(True),
        "np_arr": np.arange(3),
        "t_scalar": torch.tensor(1.5),
        "t_int": torch.tensor(7),
        "t_vec": torch.tensor([1.0, 2.0]),
        "t_grad": torch.ones(2, requires_grad=True),
        "tuple": (1, 2),
        "path": Path("a/b"),
    }
    data = json.loads(save_results(results, tmp_path, "00_start_here").read_text())
    assert data == {
        "np_f32": 0.25,
        "np_i64": 3,
        "np_bool": True,
        "np_arr": [0, 1, 2],
        "t_scalar": 1.5,
        "t_int": 7,
        "t_vec": [1.0, 2.0],
        "t_grad": [1.0, 1.0],
        "tuple": [1, 2],
        "path": "a/b",
    }
    assert type(data["np_i64"]) is int and type(data["np_bool"]) is bool


@pytest.mark.parametrize(
    "results, key",
    [
        ({"acc": float("nan")}, "acc"),
        ({"m": {"mse": np.float32("inf")}}, "mse"),
        ({"xs": [1.0, torch.tensor(float("-inf"))]}, r"\['xs'\]\[1\]"),
        ({"t": torch.tensor([0.0, float("nan")])}, "'t'"),
    ],
)
def test_save_results_rejects_non_finite(tmp_path, monkeypatch, results, key):
    monkeypatch.delenv("WORKBOOK_RESULTS_DIR", raising=False)
    with pytest.raises(ValueError, match=key):
        save_results(results, tmp_path, "03_clipping")
    assert not (tmp_path / "03_clipping.json").exists()


@pytest.mark.parametrize(
    "stem",
    ["clipping", "3_clipping", "03-clipping", "03_Clipping", "03_clipping.ipynb", "003_x", ""],
)
def test_save_results_rejects_bad_stem(tmp_path, stem):
    with pytest.raises(ValueError, match="stem"):
        save_results({"x": 1}, tmp_path, stem)


@pytest.mark.parametrize("results", [{1: 2}, {"f": object()}, {"s": {1, 2}}, [1, 2]])
def test_save_results_rejects_non_json(tmp_path, results):
    with pytest.raises(ValueError):
        save_results(results, tmp_path, "03_clipping")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_save_results_round_trip_property(tmp_path_factory, results):
    folder = tmp_path_factory.mktemp("res")
    old = os.environ.pop("WORKBOOK_RESULTS_DIR", None)
    try:
        assert json.loads(save_results(results, folder, "05_qat_ste").read_text()) == results
    finally:
        if old is not None:
            os.environ["WORKBOOK_RESULTS_DIR"] = old


# ============================================================================= env, course map, tables
def test_env_report_fields():
    env = harness.env_report()
    for key in (
        "python",
        "torch",
        "torchvision",
        "numpy",
        "platform",
        "cpu_model",
        "cuda_available",
        "cuda_device",
        "torch_threads",
        "quantized_engines",
        "fbgemm_available",
        "WORKBOOK_FAST",
    ):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["fbgemm_available"] == ("fbgemm" in torch.backends.quantized.supported_engines)
    json.dumps(env)  # plain JSON types only


def test_course_map_numbering():
    stems = [e.stem for e in harness.COURSE_MAP]
    assert [s[:2] for s in stems] == [f"{i:02d}" for i in range(len(stems))]
    assert all(harness.STEM_PATTERN.match(s) for s in stems)
    assert stems[0] == "00_start_here" and len(stems) == 11


def test_course_map_marks_existing_notebooks(tmp_path):
    (tmp_path / "03_clipping.ipynb").write_text("{}")
    assert harness.available_notebooks(tmp_path) == ["03_clipping"]
    table = harness.course_map_markdown(tmp_path)
    rows = table.splitlines()[2:]
    assert len(rows) == len(harness.COURSE_MAP)
    assert rows[3].endswith("| ready |") and all(r.endswith("| planned |") for r in rows[:3])
    assert "status" not in harness.course_map_markdown()


def test_markdown_table():
    assert harness.markdown_table([{"a": 1, "b": "x|y"}]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    with pytest.raises(ValueError, match="at least one row"):
        harness.markdown_table([])
    with pytest.raises(ValueError, match="row 1 has keys"):
        harness.markdown_table([{"a": 1}, {"b": 2}])


# ============================================================================= report
def test_flatten_results_keeps_long_values_short():
    flat = workbook.flatten_results(
        {
            "acc": 0.123456,
            "cfg": {"bits": 4, "deep": {"x": True}},
            "curve": list(range(10)),
            "short": [1.5, 2],
            "table": [{"a": 1}, {"a": 2}],
            "name": "n" * 60,
        }
    )
    assert flat == {
        "acc": "0.1235",
        "cfg.bits": "4",
        "cfg.deep.x": "True",
        "curve": "[0, 1, 2, 3, ... (n=10)]",
        "short": "[1.5, 2]",
        "table": "list(n=2)",
        "name": "n" * 37 + "...",
    }


def test_build_report_marks_failures_and_times():
    runs = [
        workbook.NotebookRun("00_start_here", True, 2.04, True, results={"torch": "2.x", "n": 3}),
        workbook.NotebookRun(
            "01_linear_quantization", False, 7.5, True, error="cell 4: AssertionError: x"
        ),
        workbook.NotebookRun(
            "02_granularity", True, 1.0, True, results={f"k{i}": i for i in range(20)}
        ),
        workbook.NotebookRun("03_clipping", False, 0.0, True, error="E: " + "x" * 200 + "\nmore"),
    ]
    report = workbook.build_report(runs, max_keys=5)
    lines = report.splitlines()
    assert lines[0] == "# Workbook report (fast mode)"
    assert "4 notebooks, 2 failed, 10.5 s in total." in report
    assert "| 03_clipping | **FAILED**: E: " + "x" * 114 + "... | 0.0 | - |" in lines
    assert "| 00_start_here | ok | 2.0 | torch=2.x; n=3 |" in lines
    assert "| 01_linear_quantization | **FAILED**: cell 4: AssertionError: x | 7.5 | - |" in lines
    assert "k4=4; ... (+15 more)" in report and "k5=" not in report
    with pytest.raises(ValueError):
        workbook.build_report([])


# ============================================================================= notebook checkers
def nbg(gid, grade=False, solution=False, locked=False, points=None):
    meta = {
        "grade": grade,
        "solution": solution,
        "locked": locked,
        "grade_id": gid,
        "schema_version": 3,
    }
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


def good_notebook(stem: str = "01_demo") -> nbformat.NotebookNode:
    """A small notebook that follows every convention (three graded checks)."""
    cells = [
        new_markdown_cell("# Demo"),
        new_code_cell(
            'FAST = False\nSEED = 0\nRESULTS_DIR = "../build/results"',
            metadata={"tags": ["parameters"]},
        ),
        new_code_cell(
            "import lecturelib as ll\nimport torch\nimport numpy as np\n"
            "FAST = ll.resolve_fast(FAST)\nll.seed_everything(SEED)"
        ),
        new_code_cell("%matplotlib inline\nfrom collections import Counter\nimport sklearn"),
        new_code_cell(
            "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
            metadata=nbg("f", solution=True),
        ),
        new_code_cell(
            "assert f(1) == 2", metadata=nbg("check1", grade=True, locked=True, points=1)
        ),
        new_code_cell(
            "assert f(2) == 4\n### BEGIN HIDDEN TESTS\nassert f(3) == 6\n### END HIDDEN TESTS",
            metadata=nbg("check2", grade=True, locked=True, points=2),
        ),
        new_code_cell(
            "assert f(0) == 0", metadata=nbg("check3", grade=True, locked=True, points=1)
        ),
        new_code_cell(
            f'x = "data/file.pt"  # relative\nresults = {{"x": 1 if FAST else 2}}\n'
            f'll.save_results(results, RESULTS_DIR, "{stem}")'
        ),
        new_markdown_cell("The end."),
    ]
    return new_notebook(
        cells=cells, metadata={"kernelspec": dict(KERNEL), "language_info": {"name": "python"}}
    )


def _code(nb, i):
    return [c for c in nb.cells if c.cell_type == "code"][i]


def _set_src(i, src):
    def mutate(nb):
        _code(nb, i).source = src

    return mutate


def _no_tag(nb):
    _code(nb, 0).metadata["tags"] = []


def _error_output(nb):
    _code(nb, 1).outputs = [new_output("error", ename="ValueError", evalue="x", traceback=[])]


def _exec_count(nb):
    _code(nb, 1).execution_count = 3


def _stream_output(nb):
    _code(nb, 1).outputs = [new_output("stream", name="stdout", text="hi")]


def _no_resolve(nb):
    _code(nb, 1).source = "import lecturelib as ll"
    _code(nb, 7).source = 'll.save_results({}, RESULTS_DIR, "01_demo")'


def _kernel(nb):
    nb.metadata["kernelspec"]["name"] = "myenv"


def _dup_grade_id(nb):
    _code(nb, 5).metadata["nbgrader"]["grade_id"] = "check1"


def _no_markers(nb):
    _code(nb, 3).source = "def f(x):\n    return 2 * x"


def _markers_outside(nb):
    nb.cells.append(new_markdown_cell("### BEGIN SOLUTION\nsecret\n### END SOLUTION"))


def _hidden_outside(nb):
    _code(nb, 3).source += "\n### BEGIN HIDDEN TESTS\nassert 1\n### END HIDDEN TESTS"


def _two_checks(nb):
    del _code(nb, 6).metadata["nbgrader"]


def _zero_points(nb):
    _code(nb, 4).metadata["nbgrader"]["points"] = 0


def _bad_schema(nb):
    del _code(nb, 4).metadata["nbgrader"]["grade_id"]


CHECKERS = {
    "parameters": workbook.check_parameters_cell,
    "resolves_fast": workbook.check_resolves_fast,
    "no_errors": workbook.check_no_errors,
    "clean_outputs": workbook.check_clean_outputs,
    "no_absolute_paths": workbook.check_no_absolute_paths,
    "imports": lambda nb: workbook.check_imports(nb, PINNED),
    "saves_results": lambda nb: workbook.check_saves_results(nb, "01_demo"),
    "kernelspec": workbook.check_kernelspec,
    "nbgrader": lambda nb: workbook.check_nbgrader(nb, "01_demo"),
}

BAD = [  # (checker, mutation, words the problem must contain)
    ("parameters", _no_tag, "not tagged 'parameters'"),
    ("parameters", _set_src(0, "FAST = False\nSEED = 0"), "does not assign RESULTS_DIR"),
    ("parameters", _set_src(0, 'FAST = 0\nSEED = 0\nRESULTS_DIR = "r"'), "FAST a bool literal"),
    (
        "parameters",
        _set_src(0, 'FAST = False  # WORKBOOK_FAST=1 too\nSEED = 0\nRESULTS_DIR = "r"'),
        "papermill cannot read FAST",
    ),
    ("parameters", _set_src(0, 'FAST = False\nSEED = 0\nRESULTS_DIR = "/home/me/r/"'), "relative"),
    ("resolves_fast", _no_resolve, "no 'FAST = ll.resolve_fast(FAST)'"),
    (
        "resolves_fast",
        _set_src(1, "import lecturelib as ll\nll.seed_everything(SEED)"),
        "code cell 7 uses FAST",
    ),
    (
        "resolves_fast",
        _set_src(1, "import lecturelib as ll\nif FAST:\n    pass"),
        "uses FAST before",
    ),
    (
        "resolves_fast",
        _set_src(1, "import lecturelib\nFAST = ll.resolve_fast(FAST)"),
        "import lecturelib as ll",
    ),
    ("no_errors", _error_output, "error output (ValueError)"),
    ("clean_outputs", _exec_count, "outputs or an execution count"),
    ("clean_outputs", _stream_output, "outputs or an execution count"),
    (
        "no_absolute_paths",
        _set_src(7, 'p = "/home/me/data/x.pt"\nll.save_results({}, p, "01_demo")'),
        "machine path",
    ),
    ("no_absolute_paths", _set_src(2, 'p = f"~/data/{1}"'), "machine path"),
    ("no_absolute_paths", _set_src(2, r'p = "C:\\Users\\me"'), "machine path"),
    ("imports", _set_src(2, "import PIL"), "'PIL'"),
    ("imports", _set_src(2, "from yaml import safe_load"), "'yaml'"),
    ("imports", _set_src(2, "import definitely_not_a_module_xyz"), "no installed distribution"),
    ("imports", _set_src(2, "from . import x"), "relative import"),
    ("imports", _set_src(2, "def g(:\n  pass"), "does not parse"),
    ("saves_results", _set_src(7, "print(1)"), "must call ll.save_results"),
    ("saves_results", _set_src(7, 'll.save_results(results, RESULTS_DIR, "02_other")'), "literal"),
    ("saves_results", _set_src(7, "ll.save_results(results, RESULTS_DIR, STEM)"), "literal"),
    ("kernelspec", _kernel, "'python3'"),
    ("nbgrader", _dup_grade_id, "repeats grade_id 'check1'"),
    ("nbgrader", _no_markers, "lacks '### BEGIN SOLUTION'"),
    ("nbgrader", _markers_outside, "markers but no nbgrader metadata"),
    ("nbgrader", _hidden_outside, "hidden tests but is not a graded cell"),
    ("nbgrader", _two_checks, "2 graded test cells"),
    ("nbgrader", _zero_points, "points > 0"),
    ("nbgrader", _bad_schema, "invalid nbgrader metadata"),
]


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_accepts_good_notebook(name):
    assert CHECKERS[name](good_notebook()) == []


@pytest.mark.parametrize(
    "name, mutate, words", BAD, ids=[f"{b[0]}-{b[1].__name__}-{i}" for i, b in enumerate(BAD)]
)
def test_checker_catches_bad_notebook(name, mutate, words):
    nb = good_notebook()
    mutate(nb)
    problems = CHECKERS[name](nb)
    assert any(words in p for p in problems), problems


def test_nbgrader_check_exempts_notebook_00():
    nb = good_notebook("00_start_here")
    _two_checks(nb)
    assert workbook.check_nbgrader(nb, "00_start_here") == []


def test_check_filename_and_numbering():
    assert workbook.check_filename("03_clipping.ipynb") == []
    for bad in ("3_clipping.ipynb", "03-clipping.ipynb", "03_Clipping.ipynb", "clipping.ipynb"):
        assert workbook.check_filename(bad)
    assert workbook.check_numbering(["01_a.ipynb", "02_b.ipynb"]) == []
    assert workbook.check_numbering(["01_a.ipynb", "01_b.ipynb"]) == [
        "01_b.ipynb and 01_a.ipynb share the number 01"
    ]


def test_pinned_distributions(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("# c\nscikit_learn==1.0  # x\ntorch[extra]==2.0\nloose>=1\n\n")
    assert workbook.pinned_distributions(req) == {"scikit-learn", "torch"}
    assert {"torch", "scikit-learn", "nbgrader"} <= PINNED


def test_check_notebook_on_file(tmp_path):
    path = tmp_path / "01_demo.ipynb"
    nbformat.write(good_notebook(), path)
    assert workbook.check_notebook(path, PINNED) == []
    bad = tmp_path / "1_demo.ipynb"
    nbformat.write(good_notebook("1_demo"), bad)
    assert any("file name" in p for p in workbook.check_notebook(bad, PINNED))


# ============================================================================= release pipeline
def tiny_notebook(checks: tuple[str, ...] = ("assert double(2) == 4", "assert double(-1) == -2")):
    """A lecturelib-free notebook: one exercise, graded checks, the last with hidden tests."""
    cells = [
        new_code_cell("FAST = False", metadata={"tags": ["parameters"]}),
        new_code_cell(
            "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
            metadata=nbg("double", solution=True),
        ),
    ]
    for i, check in enumerate(checks):
        src = check
        if i == len(checks) - 1:
            src += "\n### BEGIN HIDDEN TESTS\nassert double(10) == 20\n### END HIDDEN TESTS"
        cells.append(
            new_code_cell(src, metadata=nbg(f"check{i}", grade=True, locked=True, points=1))
        )
    return new_notebook(cells=cells, metadata={"kernelspec": KERNEL})


def test_student_notebook_clears_solutions_and_hidden_tests():
    source = tiny_notebook()
    before = copy.deepcopy(source)
    student = release.student_notebook(source)
    assert source == before  # the source is left alone
    stub = student.cells[1].source
    assert stub.startswith("def double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError(")
    assert "exercise double is not done yet" in stub
    assert student.cells[3].source == "assert double(-1) == -2"
    text = nbformat.writes(student)
    assert "return 2 * x" not in text and "HIDDEN" not in text and "double(10)" not in text
    for cell in student.cells[1:]:
        assert "checksum" in cell.metadata.nbgrader
    assert student.cells[2].metadata.nbgrader["locked"] is True


def test_student_release_layout(tmp_path):
    src = tmp_path / "src" / "01_tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(tiny_notebook(), src)
    data = tmp_path / "data"
    data.mkdir()
    (data / "w.txt").write_text("1")
    out = tmp_path / "student"
    written = release.student_release([src], out, data)
    assert written == [out / "notebooks" / "01_tiny.ipynb"]
    assert (out / "notebooks" / ".." / "data" / "w.txt").read_text() == "1"
    with pytest.raises(ValueError):
        release.student_release([], out)


def test_validate_invert_passes_on_student_and_fails_on_source(tmp_path):
    src = tmp_path / "src" / "01_tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(tiny_notebook(), src)
    (student,) = release.student_release([src], tmp_path / "student", None)

    inv_student = release.validate(student, invert=True)
    assert inv_student.passed and inv_student.graded == 2, inv_student.messages
    inv_source = release.validate(src, invert=True)
    assert not inv_source.passed and any("double(2)" in m for m in inv_source.messages)
    assert release.validate(src).passed
    plain_student = release.validate(student)
    assert not plain_student.passed and any(
        "NotImplementedError" in m for m in plain_student.messages
    )


def test_validate_invert_catches_a_cascade_from_a_skipped_exercise(tmp_path):
    nb = tiny_notebook()
    nb.cells.append(new_code_cell("y = double(3)  # an ordinary cell that needs the exercise"))
    src = tmp_path / "01_tiny.ipynb"
    nbformat.write(nb, src)
    (student,) = release.student_release([src], tmp_path / "student", None)
    result = release.validate(student, invert=True)
    assert not result.passed
    assert any("cascade" in m and "exercise double is not done yet" in m for m in result.messages), result.messages


def test_validate_invert_catches_a_tautological_check(tmp_path):
    src = tmp_path / "01_tiny.ipynb"
    nbformat.write(tiny_notebook(("assert double(2) == 4", "assert 1 + 1 == 2")), src)
    (student,) = release.student_release([src], tmp_path / "student", None)
    result = release.validate(student, invert=True)
    assert not result.passed and any("1 + 1" in m for m in result.messages)


def test_validate_invert_refuses_notebook_without_checks(tmp_path):
    path = tmp_path / "00_x.ipynb"
    nbformat.write(
        new_notebook(cells=[new_code_cell("x = 1")], metadata={"kernelspec": KERNEL}), path
    )
    result = release.validate(path, invert=True)
    assert not result.passed and "vacuously" in result.messages[0]


def test_graded_failures_follows_nbgrader_rules():
    nb = tiny_notebook(("assert double(2) == 4", "x = 1", "y = 2.0"))
    checks = release.graded_cells(nb)
    assert len(checks) == 3
    assert release.graded_failures(nb) == []  # no outputs: full marks
    checks[0].outputs = [new_output("error", ename="AssertionError", evalue="", traceback=[])]
    checks[1].outputs = [new_output("stream", name="stderr", text="UserWarning: ...")]
    checks[2].outputs = [
        new_output("execute_result", data={"text/plain": "0.5"}, execution_count=1)
    ]
    assert release.graded_failures(nb) == [
        "check0 (AssertionError)",
        "check1 (stderr)",
        "check2 (partial credit 0.5/1.0)",
    ]


# ============================================================================= runner
def test_workbook_run_reports_results_and_failures(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    ok = new_notebook(
        cells=[
            new_code_cell(
                'FAST = False\nRESULTS_DIR = "nowhere"', metadata={"tags": ["parameters"]}
            ),
            new_code_cell(
                "import os, sys\nimport lecturelib as ll\nFAST = ll.resolve_fast(FAST)\n"
                "ll.save_results({'fast': FAST, 'exe': sys.executable, 'cwd': os.getcwd(),\n"
                "  'prefix': sys.prefix, 'threads': os.environ['OMP_NUM_THREADS']}, RESULTS_DIR, '01_ok')"
            ),
        ],
        metadata={"kernelspec": KERNEL},
    )
    bad = new_notebook(
        cells=[
            new_code_cell("FAST = False", metadata={"tags": ["parameters"]}),
            new_code_cell("raise RuntimeError('boom')"),
        ],
        metadata={"kernelspec": KERNEL},
    )
    nbformat.write(ok, nb_dir / "01_ok.ipynb")
    nbformat.write(bad, nb_dir / "02_bad.ipynb")
    out = tmp_path / "build"
    status = workbook.main(
        [
            "run",
            "--fast",
            "--out",
            str(out),
            str(nb_dir / "01_ok.ipynb"),
            str(nb_dir / "02_bad.ipynb"),
        ]
    )
    assert status == 1
    results = json.loads((out / "results" / "01_ok.json").read_text())
    # the kernel is this interpreter (the venv's), runs in the notebook's folder, fast, pinned threads
    assert results["fast"] is True
    assert results["prefix"] == sys.prefix and results["exe"].startswith(sys.prefix)
    assert Path(results["cwd"]).resolve() == nb_dir.resolve()
    assert int(results["threads"]) <= 2
    runs = {r["stem"]: r for r in json.loads((out / "runs.json").read_text())}
    assert runs["01_ok"]["ok"] and not runs["02_bad"]["ok"]
    assert "RuntimeError: boom" in runs["02_bad"]["error"]
    report = (out / "report.md").read_text()
    assert "| 02_bad | **FAILED**: In [3]: RuntimeError: boom |" in report
    assert (out / "executed" / "02_bad.ipynb").is_file()
    assert math.isfinite(runs["01_ok"]["seconds"])


def test_kernel_env_pins_threads_and_stops_spinning(tmp_path):
    env = workbook.kernel_env(True, tmp_path)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["WORKBOOK_FAST"] == "1"
    assert int(env["OMP_NUM_THREADS"]) <= 2 and env["WORKBOOK_RESULTS_DIR"] == str(tmp_path.resolve())


def test_progress_is_silent_outside_jupyter_and_counts_everything(capsys):
    assert list(harness.progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # pytest: not a kernel, stderr not a terminal


def test_progress_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(harness, "_in_jupyter_kernel", lambda: True)  # pretend to be in a kernel
    assert harness.progress(range(3), desc="x").disable is False
    monkeypatch.setenv("WORKBOOK_PROGRESS", "0")
    assert harness.progress(range(3), desc="x").disable is True
