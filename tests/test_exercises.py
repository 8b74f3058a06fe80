"""exercises/ is generated from solutions/ by tools/make_exercises.py and must not drift; the solutions pass
their checks and the exercise stubs fail them with the short "not implemented yet" line, not a traceback."""

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
REGENERATE = "run `python tools/make_exercises.py`"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "tools" / "make_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_exercises = load_tool()
SOLUTION_SOURCES = make_exercises.solution_sources()

solution_params = pytest.mark.parametrize(
    "solution_py",
    SOLUTION_SOURCES or [pytest.param(None, marks=pytest.mark.skip(reason="no solutions/NN_name.py yet"))],
    ids=lambda p: p.stem if p else "none",
)


def cells(nb):
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


# ----------------------------------------------------------------------------------------- no drift


@solution_params
def test_committed_exercise_matches_its_solution(solution_py):
    generated = make_exercises.exercise_files(solution_py)
    py_name, ipynb_name = f"{solution_py.stem}.py", f"{solution_py.stem}.ipynb"
    py, ipynb = EXERCISES / py_name, EXERCISES / ipynb_name
    assert py.exists() and ipynb.exists(), f"exercises/{py_name} or {ipynb_name} is missing: {REGENERATE}"
    assert py.read_text(encoding="utf-8") == generated[py_name], f"exercises/{py_name} differs from solutions/: {REGENERATE}"
    committed = nbformat.read(ipynb, as_version=4)
    assert cells(committed) == cells(nbformat.reads(generated[ipynb_name], as_version=4)), (
        f"exercises/{ipynb_name} differs from solutions/: {REGENERATE}"
    )
    executed = [i for i, c in enumerate(committed.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not executed, f"exercises/{ipynb_name}: cells {executed} have outputs; exercises are not executed: {REGENERATE}"


def test_no_exercise_without_a_solution():
    expected = {f"{p.stem}{ext}" for p in SOLUTION_SOURCES for ext in (".py", ".ipynb")}
    present = {p.name for p in EXERCISES.glob("[0-9]*") if p.suffix in (".py", ".ipynb")}
    assert present <= expected, f"exercises/ has files without a solution: {sorted(present - expected)}; delete them"


@solution_params
def test_solution_pair_is_in_sync_and_executed(solution_py):
    ipynb = solution_py.with_suffix(".ipynb")
    assert ipynb.exists(), f"solutions/{ipynb.name} is missing: run `python tools/make_exercises.py --execute`"
    assert cells(jupytext.read(ipynb)) == cells(jupytext.read(solution_py, fmt="py:percent")), (
        f"solutions/{ipynb.name} and {solution_py.name} differ: run `python tools/make_exercises.py --execute`"
    )
    nb = nbformat.read(ipynb, as_version=4)
    missing = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() and c.execution_count is None]
    assert not missing, f"solutions/{ipynb.name}: cells {missing} were never executed (strict nbval would skip them)"


@solution_params
def test_every_solution_has_solution_regions_and_exercises_none(solution_py):
    text = solution_py.read_text(encoding="utf-8")
    assert text.count("### BEGIN SOLUTION") >= 1 and text.count("### BEGIN SOLUTION") == text.count("### END SOLUTION")
    exercise = (EXERCISES / solution_py.name).read_text(encoding="utf-8")
    assert "BEGIN SOLUTION" not in exercise and "BEGIN HIDDEN" not in exercise
    assert exercise.count("raise NotImplementedError(\"fill in the TODO in ") == text.count("### BEGIN SOLUTION")


@solution_params
def test_the_exercise_badge_opens_the_exercise(solution_py):
    stem = solution_py.stem
    solution_badge = make_exercises.colab.badge(stem, "solutions")
    exercise_badge = make_exercises.colab.badge(stem, "exercises")
    assert solution_badge in solution_py.read_text(encoding="utf-8"), "run `python tools/colab.py --write`"
    exercise = make_exercises.exercise_files(solution_py)[f"{stem}.py"]
    assert exercise_badge in exercise and solution_badge not in exercise


# ----------------------------------------------------------------------------------------- the generator


def test_strip_solutions_keeps_the_indentation_and_names_the_function():
    text = (
        "def outer(x):\n"
        "    '''doc'''\n"
        "    ### BEGIN SOLUTION\n"
        "    y = x + 1\n"
        "    ### END SOLUTION\n"
        "    return y\n"
        "\n"
        "class A:\n"
        "    def method(self):\n"
        "        if True:\n"
        "            ### BEGIN SOLUTION\n"
        "            pass\n"
        "            ### END SOLUTION\n"
        "### BEGIN HIDDEN\n"
        "assert outer(1) == 2\n"
        "### END HIDDEN\n"
        "print('kept')\n"
    )
    assert make_exercises.strip_solutions(text) == (
        "def outer(x):\n"
        "    '''doc'''\n"
        "    # YOUR CODE HERE\n"
        '    raise NotImplementedError("fill in the TODO in outer")\n'
        "    return y\n"
        "\n"
        "class A:\n"
        "    def method(self):\n"
        "        if True:\n"
        "            # YOUR CODE HERE\n"
        '            raise NotImplementedError("fill in the TODO in method")\n'
        "print('kept')\n"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "without ### END SOLUTION"),
        ("x = 1\n### END SOLUTION\n", "without its BEGIN"),
        ("### BEGIN SOLUTION\n### BEGIN HIDDEN\n### END HIDDEN\n### END SOLUTION\n", "nested"),
    ],
)
def test_strip_solutions_refuses_bad_markers(text, message):
    with pytest.raises(make_exercises.MarkerError, match=message):
        make_exercises.strip_solutions(text)


# ----------------------------------------------------------------------------------------- solutions pass, stubs fail


def run_source(path):
    """Execute a py:percent notebook as a script; its printed output (an exception would propagate)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), {"__name__": "__notebook__"})
    return out.getvalue()


OK_LINE = re.compile(r"^(check_\w+): OK — ", re.MULTILINE)
NOT_IMPLEMENTED_LINE = re.compile(r"^(check_\w+): not implemented yet: fill in the TODO in \w+$", re.MULTILINE)


@solution_params
def test_solution_passes_and_exercise_stub_says_not_implemented(solution_py):
    solved = run_source(solution_py)
    passed = OK_LINE.findall(solved)
    assert passed, f"solutions/{solution_py.name} printed no OK line:\n{solved}"
    assert "not implemented yet" not in solved

    unsolved = run_source(EXERCISES / solution_py.name)  # raises if a stub escapes as a traceback
    assert not OK_LINE.findall(unsolved), f"exercises/{solution_py.name} passes a check before anything is written:\n{unsolved}"
    assert NOT_IMPLEMENTED_LINE.findall(unsolved) == passed, unsolved
    assert "Traceback" not in unsolved
