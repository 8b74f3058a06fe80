"""pyproject.toml, the lock (requirements.lock) and environment.yml must agree, and the Makefile must use the lock.

- Every requirement of pyproject.toml (runtime, `test`, `lab`, `hf`) but torch is in the lock, at a version it
  admits; the lock records a digest of those requirements, so editing them without `make lock` fails here.
- torch is not in the lock (it is installed first, or reused), and the lock was resolved for the Makefile's torch.
- environment.yml pins exactly the lock's packages for its Python, plus that torch.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from qlora_ref.environment import lock_differences, locked_pins

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock", ROOT / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def pinned():
    """{canonical name: [(version, marker)]} of requirements.lock."""
    pins = {}
    for name, version, marker in locked_pins(lock.LOCK):
        pins.setdefault(canonicalize_name(name), []).append((version, marker))
    return pins


def pyproject_requirements():
    project = lock.pyproject()["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in lock.EXTRAS:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def environment_yml_pins():
    """{canonical name: version} of environment.yml's pip list, and its conda Python."""
    text = (ROOT / "environment.yml").read_text()
    python = re.search(r"^  - python=(\S+)$", text, re.MULTILINE).group(1)
    pins = {}
    for line in re.findall(r"^      - (.+)$", text, re.MULTILINE):
        line = line.strip('"')
        if line == "-e .":
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"environment.yml: {line!r} is not a pin"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"environment.yml pins {name} twice"
        pins[name] = specifier.version
    return pins, python


def test_the_lock_was_made_from_this_pyproject():
    recorded = re.search(r"^# pyproject requirements sha256: (\w+)$", lock.LOCK.read_text(), re.MULTILINE)
    assert recorded, "requirements.lock has no pyproject digest: regenerate it with `make lock`"
    assert recorded.group(1) == lock.pyproject_digest(), (
        "pyproject.toml's requirements changed since requirements.lock was written: run `make lock`"
    )


def test_every_requirement_is_locked_at_a_version_it_admits():
    pins = pinned()
    problems = []
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in requirements.lock")
        for version, _ in pins.get(name, []):
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{requirement}: the lock has {version}")
    assert not problems, "pyproject.toml and requirements.lock disagree (run `make lock`):\n" + "\n".join(problems)


def test_every_pin_has_hashes_and_torch_is_left_to_the_makefile():
    text = lock.LOCK.read_text()
    pins = pinned()
    assert pins, "requirements.lock pins nothing"
    assert "torch" not in pins and not any(name.startswith(("nvidia-", "cuda-")) for name in pins)
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    unhashed = [block.split()[0] for block in blocks if "--hash=sha256:" not in block]
    assert not unhashed, f"pins without hashes: {unhashed}"
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert torch_spec and torch_spec.group(1) == lock.TORCH, "the Makefile installs another torch than the lock assumes"
    assert f"torch {lock.TORCH} assumed" in text


def test_environment_yml_pins_the_lock_for_its_python():
    env_pins, python = environment_yml_pins()
    assert python == lock.CONDA_PYTHON
    expected = {canonicalize_name(name): version for name, version, marker in locked_pins(lock.LOCK)
                if lock.for_python(marker, python)}
    expected["torch"] = lock.TORCH
    assert env_pins == expected, (
        "environment.yml and requirements.lock disagree (run `make lock`): "
        f"only in environment.yml {sorted(set(env_pins) - set(expected))}, "
        f"only in the lock {sorted(set(expected) - set(env_pins))}, "
        f"different {sorted(n for n in set(env_pins) & set(expected) if env_pins[n] != expected[n])}"
    )


def test_the_makefile_installs_from_the_lock_with_hashes():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements.lock" in makefile
    assert "--require-hashes -r requirements-uv.lock" in makefile
    assert "-e '.[test,lab]'" not in makefile, "the Makefile must not resolve the dependencies afresh"


@pytest.mark.skipif(not (ROOT / ".venv" / ".installed").exists() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the venv that `make` built")
def test_the_venv_has_the_locked_versions():
    wrong = lock_differences(lock.LOCK)
    assert not wrong, "the venv differs from requirements.lock:\n" + "\n".join(wrong)


def test_lock_differences_names_a_wrong_version_a_missing_package_and_skips_other_platforms(tmp_path):
    from importlib.metadata import PackageNotFoundError

    fake = tmp_path / "requirements.lock"
    fake.write_text("# a header\nnumpy==2.4.6 \\\n    --hash=sha256:00 \\\n    # via qlora-ref\n"
                    "colorama==0.4.6 ; sys_platform == 'win32' \\\n    --hash=sha256:11\nsix==1.17.0 \\\n"
                    "    --hash=sha256:22\n")
    versions = {"numpy": "2.3.0", "colorama": "0.1"}

    def installed(name):
        if name not in versions:
            raise PackageNotFoundError(name)
        return versions[name]

    assert locked_pins(fake) == [("numpy", "2.4.6", None), ("colorama", "0.4.6", "sys_platform == 'win32'"),
                                 ("six", "1.17.0", None)]
    assert lock_differences(fake, installed, {"sys_platform": "linux"}) == [
        "numpy 2.3.0, the lock has 2.4.6", "six is not installed, the lock has 1.17.0"]
    assert lock_differences(fake, installed, {"sys_platform": "win32"})[1] == "colorama 0.1, the lock has 0.4.6"
