#!/usr/bin/env python3
"""Re-execute the course notebooks in place, deterministically (`make notebooks`).

For each lesson in notebooks/ (NN_name.py in jupytext py:percent, the reviewed text, paired with NN_name.ipynb):

1. sync the pair with jupytext: a missing .ipynb is created, otherwise the inputs of the newer file win;
2. execute the .ipynb top to bottom in a fresh kernel running this Python, with cwd = notebooks/,
   the environment KERNEL_ENV and a 600 s limit per cell;
3. write it back without what changes from run to run: random cell ids and widget model ids are replaced by
   ones derived from the content, timing metadata is dropped, stream outputs split at random flush points
   are merged.

Usage:
    python tools/run_notebooks.py              # every notebook
    python tools/run_notebooks.py 01 02_nf4    # names, prefixes or paths

A notebook whose execution fails is not written back; the script exits 1 after trying the others.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import jupytext
import jupytext.cli
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 600

# The kernel's environment. The Makefile exports (and unexports) the same, so that `make test` (nbval) and
# `make lab` see what produced the stored outputs; tests/test_notebook_sources.py checks they agree.
KERNEL_ENV = {"PYTHONHASHSEED": "0"}  # fixes the order of sets of str in printed output
KERNEL_ENV_UNSET = ["MPLBACKEND"]  # so that ipykernel picks its inline backend, whatever the shell has

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

# nbclient lets a cell raise only when it carries this tag; nbval's marker is a comment.
RAISES_TAG = "raises-exception"
RAISES_MARKER = "NBVAL_RAISES_EXCEPTION"


class ThisPythonKernelSpecs(KernelSpecManager):
    """Always run ipykernel with this interpreter (the venv's), whatever kernels are installed elsewhere."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(
            # The kernel's own log stays out of the console (its warning that local TCP is unencrypted, the
            # KeyboardInterrupt of jupyter_client's interrupt-then-shutdown); cell outputs and errors are unaffected.
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--log-level=CRITICAL"],
            display_name=KERNELSPEC["display_name"],
            language="python",
        )


class ThisPythonKernelManager(KernelManager):
    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self):
        return ThisPythonKernelSpecs()


def lesson_stems(names):
    """Stems of the notebooks to run: all lessons, or those matching `names` (stem, prefix or path)."""
    py = {p.stem for p in NOTEBOOKS.glob("*.py") if is_percent_notebook(p)}
    stems = sorted(py | {p.stem for p in NOTEBOOKS.glob("*.ipynb")})
    if not names:
        return stems
    chosen = []
    for name in names:
        key = Path(name).stem if name.endswith((".py", ".ipynb")) else Path(name).name
        matches = [s for s in stems if s == key] or [s for s in stems if s.startswith(key)]
        if not matches:
            sys.exit(f"run_notebooks: no notebook in {NOTEBOOKS} matches {name!r}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def is_percent_notebook(path):
    return any(line.startswith("# %%") for line in path.read_text(encoding="utf-8").splitlines())


def sync_pair(stem):
    """jupytext --sync on the pair (the .py if present, else the .ipynb), so both have the same inputs."""
    source = NOTEBOOKS / f"{stem}.py"
    if not source.exists():
        source = NOTEBOOKS / f"{stem}.ipynb"
    jupytext.cli.jupytext(["--sync", "--quiet", str(source)])


def deterministic_ids(nb):
    """Cell ids from the cell's content (jupytext makes random ones), numbered when a content repeats."""
    seen = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        seen[digest] = seen.get(digest, 0) + 1
        cell.id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def merge_streams(nb):
    """One stream output per run of stdout (stderr) writes: where the kernel split them depends on timing."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            prev = merged[-1] if merged else None
            if out.output_type == "stream" and prev and prev.output_type == "stream" and prev.name == out.name:
                prev.text += out.text
            else:
                merged.append(out)
        cell.outputs = merged


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def deterministic_widget_ids(nb, stem):
    """Replace the random ipywidgets model ids (outputs and saved widget state) by numbered hashes."""
    ids = [
        out.data[WIDGET_VIEW]["model_id"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if WIDGET_VIEW in out.get("data", {})
    ]
    ids += list(nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {}))
    mapping = {}
    for old in ids:
        mapping.setdefault(old, hashlib.sha1(f"{stem}/widget/{len(mapping)}".encode()).hexdigest()[:32])
    if not mapping:
        return nb
    pattern = re.compile("|".join(re.escape(old) for old in mapping))
    text = pattern.sub(lambda m: mapping[m.group()], json.dumps(nb))
    return nbformat.from_dict(json.loads(text))


def execute(stem):
    path = NOTEBOOKS / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    added_tag = []
    for cell in nb.cells:
        if cell.cell_type == "code" and RAISES_MARKER in cell.source:
            tags = cell.metadata.setdefault("tags", [])
            if RAISES_TAG not in tags:
                tags.append(RAISES_TAG)
                added_tag.append(cell)

    client = NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=ThisPythonKernelManager,
        timeout=CELL_TIMEOUT_S,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's cwd
    )
    client.execute()

    for cell in added_tag:
        cell.metadata["tags"].remove(RAISES_TAG)
        if not cell.metadata["tags"]:
            del cell.metadata["tags"]
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    merge_streams(nb)
    deterministic_ids(nb)
    nb = deterministic_widget_ids(nb, stem)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    # Keep the text file at least as new as the .ipynb, as jupytext's Jupyter contents manager expects.
    os.utime(NOTEBOOKS / f"{stem}.py")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all), e.g. 01 or 01_linear_quant.py")
    args = parser.parse_args(argv)

    os.environ.update(KERNEL_ENV)  # inherited by the kernels
    for name in KERNEL_ENV_UNSET:
        os.environ.pop(name, None)
    stems = lesson_stems(args.names)
    if not stems:
        sys.exit(f"run_notebooks: no notebooks in {NOTEBOOKS}")
    failed = []
    for stem in stems:
        start = time.monotonic()
        print(f"{stem}: ", end="", flush=True)
        try:
            sync_pair(stem)
            execute(stem)
        except CellExecutionError as err:
            print(f"FAILED, not written back\n{err}\n", flush=True)
            failed.append(stem)
            continue
        print(f"executed in {time.monotonic() - start:.1f} s", flush=True)
    if failed:
        sys.exit(f"run_notebooks: {len(failed)} failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
