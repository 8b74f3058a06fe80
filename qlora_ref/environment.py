"""Lesson 0: is this the environment the course's outputs were recorded in?

requirements.lock (written by tools/lock.py, installed by `make`) pins every package the course installs but
torch, one version each, with their hashes. A lesson prints what it computes; with other versions of numpy,
scipy or bitsandbytes some printed line may come out differently, so lesson 0 lists what differs.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["lock_differences", "locked_pins"]


def locked_pins(lock: Path):
    """[(name, version, marker or None)] of a requirements.lock, in its order: `name==version ; marker`."""
    pins = []
    for line in Path(lock).read_text().splitlines():
        if not line[:1].isalnum():  # hashes, comments and "via" notes
            continue
        requirement, _, marker = line.rstrip(" \\").partition(" ; ")
        name, _, pinned = requirement.partition("==")
        pins.append((name, pinned, marker or None))
    return pins


def lock_differences(lock: Path, installed=version, environment=None):
    """One line for each locked package that applies here (its marker holds) but is missing or at another
    version: "numpy 2.3.0, the lock has 2.4.6". `installed(name)` gives a version or raises
    PackageNotFoundError (importlib.metadata.version by default); `environment` overrides marker variables."""
    from packaging.markers import Marker, default_environment

    here = default_environment() | (environment or {})
    lines = []
    for name, pinned, marker in locked_pins(lock):
        if marker and not Marker(marker).evaluate(here):
            continue
        try:
            found = installed(name)
        except PackageNotFoundError:
            lines.append(f"{name} is not installed, the lock has {pinned}")
            continue
        if found != pinned:
            lines.append(f"{name} {found}, the lock has {pinned}")
    return lines
