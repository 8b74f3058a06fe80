#!/usr/bin/env python3
"""Write the lock: requirements.lock, requirements-uv.lock and environment.yml, from pyproject.toml (`make lock`).

requirements.lock pins every package that `make lab` and `make test` install, at one version each (per Python
version where a package has no release for them all), with the sha256 of every file PyPI has for it, so that
pip and uv refuse anything else. Two things are left out on purpose:

- torch, which `make` installs first or reuses (Colab's, a conda env's), and the CUDA libraries that come with
  a CUDA build of it (nvidia-*, cuda-*): a CPU-only machine must not download them. The resolution still
  assumes TORCH below, so torch's other dependencies (sympy, networkx, ...) and triton are pinned to versions
  that torch accepts.
- uv, the installer, pinned in requirements-uv.lock: `make` installs it with pip, then the lock with it.

One requirement of pyproject.toml overrides torch's own: a CUDA build of torch 2.13.0 pins triton 3.7.1, whose
interpreter rounds tl.fma twice; the course's kernels are checked bit for bit in the interpreter, so the lock
takes pyproject's triton (>=3.8). On a GPU machine `make` installs it over the one torch brought; the course
uses triton directly, not through torch.compile, which is what that pin is for.

The resolution is universal (one file for Linux, macOS and Windows, every Python that pyproject.toml admits) and sees PyPI as it was
at AS_OF: running this again gives the same lock until AS_OF, TORCH, UV or pyproject.toml change. AS_OF is the
day of the last CI run that passed before the lock existed (2026-11-22): the next day's transformers 5.25.0
added a dependency on `kernels`, which fetches compiled kernels from the Hugging Face hub, and the course runs
offline. Move AS_OF forward deliberately, re-run `make test`, and commit the lock with the outputs it gives.

environment.yml (conda) installs the same pins with pip, on conda's Python 3.11: conda's pip cannot be told
--no-deps, so there the hashes are not checked. tests/test_environment.py checks that the three files agree.

    make lock            # or: .venv/bin/python tools/lock.py
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_ref.environment import locked_pins

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
UV_LOCK = ROOT / "requirements-uv.lock"
ENVIRONMENT = ROOT / "environment.yml"

AS_OF = "2026-11-23T00:00:00Z"  # PyPI as it was at the end of 2026-11-22
TORCH = "2.13.0"  # the Makefile's TORCH_SPEC; tests/test_environment.py checks they agree
UV = "0.13.9"
EXTRAS = ("test", "lab", "hf")
OVERRIDES = ("triton",)  # pyproject's requirement on these replaces every other one, torch's included
CONDA_PYTHON = "3.11"


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_digest() -> str:
    """sha256 of pyproject.toml's requirements (dependencies, the extras, requires-python, the build system's),
    the lock's input.

    The lock records it; tests/test_environment.py recomputes it, so a changed requirement fails the tests
    until the lock is regenerated.
    """
    project = pyproject()["project"]
    inputs = {
        "requires-python": project["requires-python"],
        "dependencies": project["dependencies"],
        "optional-dependencies": {extra: project["optional-dependencies"][extra] for extra in EXTRAS},
        "build-system": pyproject()["build-system"]["requires"],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def header(what: str) -> str:
    return (
        f"# {what}\n"
        f"# Written by tools/lock.py (`make lock`); do not edit. PyPI as of {AS_OF}, torch {TORCH} assumed.\n"
        f"# pyproject requirements sha256: {pyproject_digest()}\n"
    )


def oldest_python() -> str:
    """"3.11" from pyproject's requires-python ">=3.11"."""
    requires = pyproject()["project"]["requires-python"]
    assert requires.startswith(">="), f"tools/lock.py reads requires-python as '>=X.Y', got {requires!r}"
    return requires[2:]


def uv(*args: str, cwd: str) -> None:
    exe = Path(sys.executable).with_name("uv")
    subprocess.run([str(exe if exe.exists() else "uv"), *args], check=True, cwd=cwd)


def overrides():
    """pyproject's requirements on the OVERRIDES packages, as written there."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    every = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return [r for r in every if Requirement(r).name in OVERRIDES]


def left_out(name: str) -> bool:
    """torch and the CUDA libraries a CUDA build of it brings: never installed by the lock."""
    return name == "torch" or name.startswith(("nvidia-", "cuda-"))


def resolve(tmp: str, *inputs: str) -> str:
    """`uv pip compile` of `inputs` in the folder tmp: universal, hashed, PyPI as of AS_OF, one version a package.

    uv runs in tmp and is given relative names, so that the lock's "via" comments name no temporary folder.
    """
    uv("pip", "compile", "--quiet", "--universal", "--generate-hashes", "--no-header",
       "--python-version", oldest_python(), "--fork-strategy", "fewest", "--exclude-newer", AS_OF,
       "-o", "resolved.txt", *inputs, cwd=tmp)
    return Path(tmp, "resolved.txt").read_text()


def compile_lock(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "torch.txt").write_text(f"torch=={TORCH}\n")
        # The build system too: `make` installs the course with --no-build-isolation, from the lock.
        Path(tmp, "build-system.txt").write_text("\n".join(pyproject()["build-system"]["requires"]) + "\n")
        Path(tmp, "overrides.txt").write_text("\n".join(overrides()) + "\n")
        extras = [arg for extra in EXTRAS for arg in ("--extra", extra)]
        inputs = [str(ROOT / "pyproject.toml"), "build-system.txt", *extras, "-c", "torch.txt",
                  "--overrides", "overrides.txt"]
        names = [line.split("==")[0] for line in resolve(tmp, *inputs).splitlines() if line[:1].isalnum()]
        emit_not = [arg for name in names if left_out(name) for arg in ("--no-emit-package", name)]
        out.write_text(header("Every package of `make lab` and `make test` but torch (see tools/lock.py).")
                       + resolve(tmp, *inputs, *emit_not))


def compile_uv_lock(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "uv.txt").write_text(f"uv=={UV}\n")
        out.write_text(header("The installer that installs requirements.lock.") + resolve(tmp, "uv.txt"))


def for_python(marker, python: str) -> bool:
    """Whether a requirement with `marker` can apply on this Python version, on some platform."""
    if marker is None:
        return True
    from packaging.markers import Marker

    platforms = [
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
        {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
    ]
    versions = {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython"}
    return any(Marker(marker).evaluate(platform | versions) for platform in platforms)


def environment_yml() -> str:
    lines = [
        "# conda env create -f environment.yml && conda activate qlora-course",
        "# Written by tools/lock.py (`make lock`) from requirements.lock: the same pins, for conda's Python "
        f"{CONDA_PYTHON}.",
        "# conda supplies Python; pip installs torch and the locked packages (hashes are not checked here:",
        "# use `make` for that) and the course in editable mode.",
        "name: qlora-course",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={CONDA_PYTHON}",
        "  - pip",
        "  - pip:",
        f"      - torch=={TORCH}",
    ]
    for name, version, marker in locked_pins(LOCK):
        if for_python(marker, CONDA_PYTHON):
            pin = f"{name}=={version}" + (f" ; {marker}" if marker else "")
            lines.append(f"      - {json.dumps(pin)}" if marker else f"      - {pin}")
    lines.append("      - -e .")
    return "\n".join(lines) + "\n"


def main() -> None:
    os.chdir(ROOT)
    compile_lock(LOCK)
    compile_uv_lock(UV_LOCK)
    ENVIRONMENT.write_text(environment_yml())
    count = len(locked_pins(LOCK))
    print(f"lock: {count} pins in {LOCK.name}, uv {UV} in {UV_LOCK.name}, {ENVIRONMENT.name} rewritten")


if __name__ == "__main__":
    main()
