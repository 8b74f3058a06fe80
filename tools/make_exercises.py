#!/usr/bin/env python3
"""Generate exercises/ from solutions/ (nbgrader's convention), and optionally re-execute the solutions.

For each solutions/NN_name.py (jupytext py:percent, the source of truth), write exercises/NN_name.py and
exercises/NN_name.ipynb where:

- the lines between `### BEGIN SOLUTION` and `### END SOLUTION` (markers included) become

      # YOUR CODE HERE
      raise NotImplementedError("fill in the TODO in <function>")

  at the indentation of the BEGIN marker, <function> being the `def` that encloses it;
- the lines between `### BEGIN HIDDEN` and `### END HIDDEN` (markers included) are removed;
- the "Open in Colab" badge is pointed at exercises/NN_name.ipynb (tools/colab.py's with_badge); the rest of
  the Colab set-up is the solution's.

The exercise notebooks are NOT executed (learners run them): no outputs, no execution counts, deterministic
cell ids. tests/test_exercises.py regenerates them in memory and fails when the committed files drift.

Usage:
    python tools/make_exercises.py             # regenerate exercises/ from solutions/
    python tools/make_exercises.py --execute   # first re-execute solutions/*.ipynb in place (like
                                               # `make notebooks`, cwd solutions/), then regenerate
    python tools/make_exercises.py --execute 01 03   # only some solution notebooks are re-executed
"""

import argparse
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN"
END_HIDDEN = "### END HIDDEN"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)")


class MarkerError(ValueError):
    pass


def _load_tool(name):
    """A module of tools/ (not a package): tools/<name>.py, loaded from its path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab = _load_tool("colab")


def _indent(line):
    return line[: len(line) - len(line.lstrip())]


def _enclosing_function(lines, index, indent):
    """Name of the nearest `def` above lines[index] that is less indented than `indent`."""
    for line in reversed(lines[:index]):
        match = DEF.match(line)
        if match and len(match.group(1)) < len(indent):
            return match.group(2)
    return None


def strip_solutions(text, source="<text>"):
    """The exercise version of a solution text (see the module docstring). Raises MarkerError on bad markers."""
    lines = text.splitlines(keepends=True)
    out = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped in (END_SOLUTION, END_HIDDEN):
            raise MarkerError(f"{source}:{i + 1}: {stripped} without its BEGIN")
        if stripped in (BEGIN_SOLUTION, BEGIN_HIDDEN):
            end_marker = END_SOLUTION if stripped == BEGIN_SOLUTION else END_HIDDEN
            j = i + 1
            while j < len(lines) and lines[j].strip() != end_marker:
                if lines[j].strip() in (BEGIN_SOLUTION, BEGIN_HIDDEN):
                    raise MarkerError(f"{source}:{j + 1}: nested {lines[j].strip()} (line {i + 1} is still open)")
                j += 1
            if j == len(lines):
                raise MarkerError(f"{source}:{i + 1}: {stripped} without {end_marker}")
            if stripped == BEGIN_SOLUTION:
                indent = _indent(lines[i])
                name = _enclosing_function(lines, i, indent)
                where = f"fill in the TODO in {name}" if name else "fill in the TODO in this cell"
                out.append(f"{indent}# YOUR CODE HERE\n")
                out.append(f'{indent}raise NotImplementedError("{where}")\n')
            i = j + 1
            continue
        out.append(lines[i])
        i += 1
    return "".join(out)


def deterministic_ids(nb, stem):
    """Cell ids derived from the content (jupytext makes random ones), numbered when a content repeats."""
    seen = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{stem}\n{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        seen[digest] = seen.get(digest, 0) + 1
        cell.id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def exercise_files(solution_py):
    """{file name: text} of the exercise pair generated from one solutions/NN_name.py."""
    text = solution_py.read_text(encoding="utf-8")
    exercise_py = colab.with_badge(strip_solutions(text, solution_py.name), solution_py.stem, "exercises")
    nb = jupytext.reads(exercise_py, fmt="py:percent")
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    deterministic_ids(nb, solution_py.stem)
    nbformat.validate(nb)
    return {
        f"{solution_py.stem}.py": exercise_py,
        f"{solution_py.stem}.ipynb": nbformat.writes(nb) + "\n",
    }


def solution_sources():
    return sorted(p for p in SOLUTIONS.glob("[0-9]*.py") if "# %%" in p.read_text(encoding="utf-8"))


def generate():
    """{path in exercises/: text} for every solution."""
    files = {}
    for py in solution_sources():
        for name, text in exercise_files(py).items():
            files[EXERCISES / name] = text
    return files


def execute_solutions(names):
    """Re-execute solutions/*.ipynb with tools/run_notebooks.py, pointed at solutions/ instead of notebooks/."""
    run_notebooks = _load_tool("run_notebooks")
    run_notebooks.NOTEBOOKS = SOLUTIONS  # its functions read the folder from this module global
    run_notebooks.main(names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute", action="store_true", help="re-execute solutions/*.ipynb in place first")
    parser.add_argument("names", nargs="*", help="with --execute: solution notebooks to run (default: all)")
    args = parser.parse_args(argv)
    if args.names and not args.execute:
        parser.error("names select solution notebooks to execute: use them with --execute")
    if args.execute:
        execute_solutions(args.names)
    files = generate()
    if not files:
        sys.exit(f"make_exercises: no solutions/NN_name.py in {SOLUTIONS}")
    for path, text in files.items():
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old != text:
            path.write_text(text, encoding="utf-8")
            print(f"make_exercises: wrote {path.relative_to(ROOT)}")
    stale = sorted(
        p for p in EXERCISES.glob("[0-9]*") if p.suffix in (".py", ".ipynb") and p not in files
    )
    for path in stale:
        print(f"make_exercises: {path.relative_to(ROOT)} has no solution any more; delete it", file=sys.stderr)
    print(f"make_exercises: exercises/ is up to date ({len(files) // 2} notebooks)")


if __name__ == "__main__":
    main()
