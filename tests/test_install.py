"""The course installed the way Colab installs it: `pip install <clone>`, not editable.

qlora_ref then lives in site-packages, away from the clone's models/, data/ and bench/results/; the lessons
must still find them (qlora_ref.course_files). Here the package is installed with `pip install --target` into a
folder put first on PYTHONPATH, so that it, not this checkout's editable install, is what the lessons import.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ref.course_files import ENV_VAR

REPO = Path(__file__).resolve().parent.parent
LESSONS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))

# What the lessons load from the clone, each through its default location.
LOADING = """
import qlora_ref
from qlora_ref.llama import LlamaForCausalLM
from qlora_ref.tasks import corpus_ids
from qlora_ref.train import TrainConfig, load_model
from qlora_ref.course_files import results_dir
from qlora_ref.results import load_measurements

print("package", qlora_ref.__file__)
print("base", sum(p.numel() for p in LlamaForCausalLM.from_pretrained().parameters()))
print("heldout", corpus_ids("heldout").numel())
print("measurements", len(load_measurements(results_dir())))
print("train", type(load_model(TrainConfig(), "cpu", None)[0]).__name__)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding qlora_ref installed non-editable, built from a copy of the package's sources."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "qlora_ref"), str(source)], check=True)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    return target


def run(code: str, site: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    environment.update(PYTHONPATH=str(site), TRITON_INTERPRET="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


def first_code_cell(lesson: Path) -> str:
    """The set-up cell of a lesson (its first code cell in the py:percent source)."""
    parts = re.split(r"^(# %%.*)$", lesson.read_text(), flags=re.MULTILINE)  # text, header, cell, header, ...
    return next(cell for header, cell in zip(parts[1::2], parts[2::2]) if "[markdown]" not in header)


def test_the_lessons_find_the_course_from_a_non_editable_install(site):
    result = run(LOADING, site, REPO / "notebooks")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert Path(lines["package"]).is_relative_to(site), lines["package"]  # the installed copy, not the checkout
    assert int(lines["base"]) > 0 and int(lines["heldout"]) > 0 and int(lines["measurements"]) > 0
    assert lines["train"] == "LlamaForCausalLM"


def test_every_lessons_set_up_cell_runs_from_a_non_editable_install(site):
    # One process for all of them (importing torch and bitsandbytes ten times would take minutes); each cell
    # runs in a namespace of its own, as in a fresh kernel.
    cells = {lesson.stem: first_code_cell(lesson) for lesson in LESSONS}
    code = (f"cells = {cells!r}\n"
            "for name, cell in cells.items():\n"
            "    exec(compile(cell, name, 'exec'), {'__name__': '__main__'})\n"
            "    print(name)\n"
            "import qlora_ref\n"
            "print(qlora_ref.__file__)\n")
    result = run(code, site, REPO / "notebooks")
    assert result.returncode == 0, result.stderr
    *ran, package = result.stdout.splitlines()
    assert cells and ran == list(cells), ran
    assert Path(package).is_relative_to(site), package


def test_outside_a_clone_the_error_says_where_it_looked_and_what_to_set(site, tmp_path):
    result = run("from qlora_ref.llama import LlamaForCausalLM\nLlamaForCausalLM.from_pretrained()", site, tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError") and ENV_VAR in last and str(tmp_path) in last, last


def test_the_environment_variable_names_the_clone_from_anywhere(site, tmp_path):
    result = run(LOADING, site, tmp_path, **{ENV_VAR: str(REPO)})
    assert result.returncode == 0, result.stderr
    wrong = run(LOADING, site, REPO / "notebooks", **{ENV_VAR: str(tmp_path)})
    assert wrong.returncode != 0 and f"{ENV_VAR}={tmp_path} is not a clone of the course" in wrong.stderr
