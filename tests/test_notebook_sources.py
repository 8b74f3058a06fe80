"""Checks on the committed notebooks that strict nbval cannot make by itself.

- every notebooks/NN_name.ipynb has its jupytext pair NN_name.py (py:percent) with the same cells;
- every code cell has been executed: nbval does not compare a cell whose execution_count is null,
  so an unexecuted notebook would silently turn the strict run lax (fix: `make notebooks`);
- no tqdm in cells whose output nbval compares (progress bars never compare equal);
- nothing on stderr in any cell of a lesson or a solution, checked or not;
- no checked cell ends in `;`: nbval runs cells with store_history=False, where IPython's trailing-`;`
  output suppression does not work, so `plt.plot(...);` stores no repr but shows one under nbval;
- `make notebooks` and `make test` give the kernel the same environment;
- every lesson, solution and exercise carries the current Colab badge and first cell (tools/colab.py).
"""

import difflib
import importlib.util
import io
import re
import subprocess
import tokenize
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
UNCHECKED = ("NBVAL_SKIP", "NBVAL_IGNORE_OUTPUT")  # markers of cells whose output nbval does not compare
TQDM_BAR = re.compile(r"\d+%\|")  # as in ' 42%|████▏     | 42/100 [00:01<00:01, 30.1it/s]'

notebook_params = pytest.mark.parametrize(
    "ipynb",
    NOTEBOOKS or [pytest.param(None, marks=pytest.mark.skip(reason="no notebooks/*.ipynb yet"))],
    ids=lambda p: p.name if p else "none",
)


def cells(nb):
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def as_lines(cell_list):
    lines = []
    for i, (kind, source) in enumerate(cell_list):
        lines.append(f"## cell {i} ({kind})")
        lines += source.splitlines()
    return lines


def code_cells(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    return [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]


@notebook_params
def test_paired_py_has_the_same_cells(ipynb):
    py = ipynb.with_suffix(".py")
    assert py.exists(), f"{py.name} is missing: create it with `jupytext --sync notebooks/{ipynb.name}`"
    from_ipynb = cells(jupytext.read(ipynb))
    from_py = cells(jupytext.read(py, fmt="py:percent"))
    if from_ipynb != from_py:
        diff = "\n".join(
            difflib.unified_diff(as_lines(from_ipynb), as_lines(from_py), ipynb.name, py.name, lineterm="")
        )
        pytest.fail(
            f"{ipynb.name} and {py.name} differ (sync them with `jupytext --sync` or `make notebooks`):\n{diff}"
        )


@notebook_params
def test_every_code_cell_was_executed(ipynb):
    missing = [
        i
        for i, cell in code_cells(ipynb)
        if cell.source.strip() and cell.execution_count is None and "NBVAL_SKIP" not in cell.source
    ]
    assert not missing, (
        f"{ipynb.name}: code cells {missing} (0-based) have no execution_count, so strict nbval would skip them. "
        f"Run `make notebooks` and commit the result."
    )


@pytest.mark.parametrize("ipynb", NOTEBOOKS + sorted((ROOT / "solutions").glob("*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_nothing_on_stderr(ipynb):
    """Warnings, library logging and progress bars stay out of the course, even where nbval would not compare."""
    offending = [i for i, cell in code_cells(ipynb)
                 if any(out.output_type == "stream" and out.name == "stderr" for out in cell.outputs)]
    assert not offending, f"{ipynb.parent.name}/{ipynb.name}: cells {offending} (0-based) wrote to stderr"


@notebook_params
def test_no_tqdm_in_checked_cells(ipynb):
    offending = []
    for i, cell in code_cells(ipynb):
        if any(marker in cell.source for marker in UNCHECKED):
            continue
        text = "".join(
            out.get("text", "") if out.output_type == "stream" else str(out.get("data", {}).get("text/plain", ""))
            for out in cell.outputs
        )
        if "tqdm" in cell.source or TQDM_BAR.search(text):
            offending.append(i)
    assert not offending, (
        f"{ipynb.name}: cells {offending} (0-based) use tqdm or show a progress bar in a compared output. "
        f"Keep tqdm out of checked cells, or mark the cell # NBVAL_IGNORE_OUTPUT (or # NBVAL_SKIP)."
    )


def ends_with_semicolon(source):
    """Whether the last token is `;` (IPython's own test for suppressing a cell's output)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    last = next((tok for tok in reversed(tokens) if tok.type not in skip), None)
    return last is not None and last.type == tokenize.OP and last.string == ";"


@notebook_params
def test_no_trailing_semicolon_in_checked_cells(ipynb):
    offending = [
        i
        for i, cell in code_cells(ipynb)
        if "NBVAL_SKIP" not in cell.source and "NBVAL_IGNORE_OUTPUT" not in cell.source
        and ends_with_semicolon(cell.source)
    ]
    assert not offending, (
        f"{ipynb.name}: cells {offending} (0-based) end in ';'. nbval runs cells without history, where IPython "
        f"ignores a trailing ';', so their output would differ under `make test`. End them with `plt.show()`, "
        f"assign the value (`_ = ...`), or call a function that returns None."
    )


def test_make_test_and_make_notebooks_use_the_same_kernel_env():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)
    makefile = (ROOT / "Makefile").read_text()
    exported = dict(re.findall(r"^export\s+(\w+)\s*:?=\s*(\S*)\s*$", makefile, re.MULTILINE))
    unexported = set(re.findall(r"^unexport\s+(\w+)\s*$", makefile, re.MULTILINE))
    for name, value in run_notebooks.KERNEL_ENV.items():
        assert exported.get(name) == value, (
            f"tools/run_notebooks.py sets {name}={value} for the kernel, "
            f"the Makefile exports {name}={exported.get(name)}: make them agree"
        )
    for name in run_notebooks.KERNEL_ENV_UNSET:
        assert name in unexported, f"tools/run_notebooks.py unsets {name} for the kernel: add `unexport {name}` to the Makefile"


def load_colab():
    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    return colab


colab = load_colab()


def test_lessons_solutions_and_exercises_carry_the_current_colab_setup():
    """The Colab badge and first cell of each lesson, solution and exercise are written by tools/colab.py from one
    address (the exercises through tools/make_exercises.py)."""
    assert not colab.problems(), (
        "\n".join(colab.problems()) + "\nrun `python tools/colab.py --write`, then `python tools/make_exercises.py --execute`"
    )


def test_colab_covers_every_solution_and_exercise():
    covered = set(colab.notebooks())
    solutions = {p.stem for p in (ROOT / "solutions").glob("[0-9]*.py")}
    assert solutions and {("solutions", stem) for stem in solutions} <= covered
    assert {("exercises", stem) for stem in solutions} <= covered
    assert {folder for folder, _ in covered} == {"notebooks", "solutions", "exercises"}


def test_colab_check_sees_a_badge_pointing_at_the_wrong_folder_and_a_missing_block():
    stem = sorted(p.stem for p in (ROOT / "solutions").glob("[0-9]*.py"))[0]
    text = (ROOT / "exercises" / f"{stem}.py").read_text(encoding="utf-8")
    assert colab.text_problems(text, stem, "exercises") == []
    solutions_badge = text.replace(colab.badge(stem, "exercises"), colab.badge(stem, "solutions"))
    assert colab.text_problems(solutions_badge, stem, "exercises") == [
        f"exercises/{stem}.py: the first markdown cell lacks the badge {colab.badge(stem, 'exercises')}"
    ]
    no_block = text.replace(colab.colab_block(), colab.BLOCK_START)
    assert [line.split(": ", 1)[1] for line in colab.text_problems(no_block, stem, "exercises")] == [
        "the first code cell lacks the current Colab block (tools/colab.py)"
    ]
    no_device = text.replace(colab.DEVICE_LINES, "")
    assert "lacks lesson 0's two lines" in " ".join(colab.text_problems(no_device, stem, "exercises"))


def test_colab_setup_fills_in_a_new_notebook_and_leaves_current_ones_alone():
    new = (
        "# %% [markdown]\n# # Exercises 8 — Something new\n#\n# **What you will write**\n\n"
        f"# %%\nimport os\nimport sys\n\n{colab.BLOCK_START}\n\nimport torch\n\n{colab.DEVICE_LINES}\n\n"
        "# %% [markdown]\n# ## 1. Next\n"
    )
    written = colab.with_setup(new, "08_new", "solutions")
    assert colab.text_problems(written, "08_new", "solutions") == []
    assert written.startswith(f"# %% [markdown]\n# # Exercises 8 — Something new\n#\n{colab.badge('08_new', 'solutions')}\n#\n")
    assert colab.with_setup(written, "08_new", "solutions") == written
    with pytest.raises(ValueError, match="has no line 'IN_COLAB"):
        colab.with_setup(new.replace(colab.BLOCK_START, ""), "08_new", "solutions")
    for folder, stem in colab.notebooks():
        if folder != "exercises":
            text = (ROOT / folder / f"{stem}.py").read_text(encoding="utf-8")
            assert colab.with_setup(text, stem, folder) == text, f"{folder}/{stem}.py: run `python tools/colab.py --write`"


def test_colab_install_script_keeps_colabs_torch(tmp_path):
    """tools/colab_install.sh, run with a stand-in for Colab's Python: it asks pip for the course, bitsandbytes 0.50.2
    and the torch already installed (so that pip keeps Colab's CUDA build)."""
    python = tmp_path / "python"
    log = tmp_path / "log"
    python.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo 2.8.0+cu126; else echo \"$@\" >> {log}; fi\n")
    python.chmod(0o755)
    subprocess.run(["sh", str(ROOT / "tools" / "colab_install.sh"), str(python)], check=True)
    assert log.read_text().split() == ["-m", "pip", "install", "-q", str(ROOT), "bitsandbytes==0.50.2",
                                       "torch==2.8.0+cu126"]


def test_each_lesson_names_its_modules_as_the_readme_table_does():
    """Each lesson says which modules hold its code, in the order to read them, and which it only uses for its
    demonstrations: the README's lesson table, which ../shared/tools/house.py measures, is the one list."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if re.match(r"\| \d+ ", line)]
    assert len(rows) == len(sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")))
    for row in rows:
        _, notebook, uses, reads = [cell.strip() for cell in row.strip("|").split("|")]
        text = (ROOT / "notebooks" / f"{notebook.strip('`')}.py").read_text(encoding="utf-8")
        cell = re.search(r"# \*\*The code of this lesson\*\*.*?(?=\n\n)", text, re.S)
        assert cell, f"{notebook} does not say which modules hold its code"
        named = re.findall(r"`qlora_ref/([\w/]+\.py)`", cell.group(0))
        assert named == re.findall(r"`([\w/]+\.py)`", reads) + re.findall(r"`([\w/]+\.py)`", uses), notebook
