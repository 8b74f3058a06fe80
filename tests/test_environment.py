"""pyproject.toml and environment.yml must list the same packages with the same pins.

Compared: pyproject's runtime dependencies + `test` + `lab` extras against environment.yml's conda and pip
dependencies (python, pip and the `-e .` line excluded). conda's `pytorch` counts as pip's `torch`.
"""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "lab")
CONDA_TO_PIP = {"pytorch": "torch"}  # conda package name -> pip distribution name
NOT_PACKAGES = {"python", "pip"}  # environment plumbing, not course dependencies

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*$")


def _normalise_name(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement):
    """'bitsandbytes==0.50.2 ; python_version>"3"' -> ('bitsandbytes', '==0.50.2')"""
    requirement = requirement.split(";", 1)[0].split("#", 1)[0]
    match = _REQ.match(requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    name, spec = match.groups()
    return _normalise_name(name), spec.replace(" ", "")


def _add(found, requirement, where):
    name, spec = _split(requirement)
    if name in found and found[name][0] != spec:
        pytest.fail(f"{name} is pinned two ways: {found[name][0]!r} ({found[name][1]}) and {spec!r} ({where})")
    found[name] = (spec, where)


def pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for req in project["dependencies"]:
        _add(found, req, "dependencies")
    for extra in EXTRAS:
        for req in project["optional-dependencies"][extra]:
            _add(found, req, f"extra {extra!r}")
    return {name: spec for name, (spec, _) in found.items()}


def environment_yml_requirements():
    """Parse the `dependencies:` list of environment.yml (flat list plus one `- pip:` sublist) by hand.

    This keeps pyyaml out of the dependencies. The parser is strict: anything it does not
    understand under `dependencies:` fails the test instead of being skipped.
    """
    found = {}
    in_deps = False
    pip_indent = None  # indentation of the `- pip:` item while inside its sublist
    for lineno, raw in enumerate((ROOT / "environment.yml").read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            in_deps = line == "dependencies:"
            pip_indent = None
            continue
        if not in_deps:
            continue
        item = re.match(r"^(\s*)-\s+(.*)$", line)
        assert item, f"environment.yml:{lineno}: expected a '- package' item, got {raw!r}"
        item_indent, value = len(item.group(1)), item.group(2).strip().strip("'\"")
        if pip_indent is not None and item_indent <= pip_indent:
            pip_indent = None  # left the pip sublist
        if value == "pip:":
            pip_indent = item_indent
            continue
        if pip_indent is not None:
            if value.startswith("-"):  # pip options such as `-e .`
                continue
        else:
            value = value.split("::", 1)[-1]  # channel::package
        name, spec = _split(value)
        name = CONDA_TO_PIP.get(name, name)
        if name in NOT_PACKAGES:
            continue
        assert name not in found, f"environment.yml lists {name} twice"
        found[name] = spec
    assert found, "environment.yml: no dependencies found"
    return found


def test_environment_yml_name():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^name:\s*qlora-course\s*$", text, re.MULTILINE), "environment.yml must be named qlora-course"


def test_pyproject_and_environment_yml_list_the_same_packages():
    pyproject = pyproject_requirements()
    conda = environment_yml_requirements()
    problems = []
    for name in sorted(set(pyproject) - set(conda)):
        problems.append(f"  only in pyproject.toml:  {name}{pyproject[name]}")
    for name in sorted(set(conda) - set(pyproject)):
        problems.append(f"  only in environment.yml: {name}{conda[name]}")
    for name in sorted(set(pyproject) & set(conda)):
        if pyproject[name] != conda[name]:
            problems.append(
                f"  different pins for {name}: pyproject.toml {pyproject[name] or '(none)'!r}, "
                f"environment.yml {conda[name] or '(none)'!r}"
            )
    assert not problems, "pyproject.toml and environment.yml disagree:\n" + "\n".join(problems)
