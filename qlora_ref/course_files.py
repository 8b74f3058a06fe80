"""Where the course's own files are: the base model (models/base/), the data (data/) and the measurements
(bench/results/).

They live in the clone of the course, not in the package: an editable install (`make`, `pip install -e`) runs
the package from the clone, but Colab's `pip install <clone>`, a wheel or `pip install --target` copy only
`qlora_ref/` into site-packages. So the clone is looked for, in this order:

1. the folder named by the environment variable QLORA_COURSE_DIR, if it is set (and it must be a clone);
2. the folder above the package (an editable install, or Python started at the clone's top);
3. the working directory and the folders above it (a lesson runs in the clone's notebooks/).

A folder is a clone of the course when it holds models/base/config.json and data/. The lookup runs when a file
is needed, not at import, so `import qlora_ref` works anywhere.
"""

import os
from pathlib import Path

ENV_VAR = "QLORA_COURSE_DIR"


def is_course_dir(directory: Path) -> bool:
    return (directory / "models" / "base" / "config.json").is_file() and (directory / "data").is_dir()


def course_dir() -> Path:
    """The clone of the course that this process uses (see the module's docstring for the order)."""
    named = os.environ.get(ENV_VAR)
    if named:
        directory = Path(named).expanduser().resolve()
        if not is_course_dir(directory):
            raise FileNotFoundError(f"{ENV_VAR}={named} is not a clone of the course: it has no "
                                    "models/base/config.json and data/ folder")
        return directory
    package_parent = Path(__file__).resolve().parent.parent
    here = Path.cwd().resolve()
    for directory in (package_parent, here, *here.parents):
        if is_course_dir(directory):
            return directory
    raise FileNotFoundError(
        f"the course's files (models/base/, data/, bench/results/) are not next to qlora_ref ({package_parent}) "
        f"nor in {here} or a folder above it: run from inside a clone of the course (the lessons run in its "
        f"notebooks/ folder), or set {ENV_VAR} to the clone")


def base_model_dir() -> Path:
    """models/base/: the course's pretrained base model."""
    return course_dir() / "models" / "base"


def data_dir() -> Path:
    """data/: the corpus and the tasks' data."""
    return course_dir() / "data"


def results_dir() -> Path:
    """bench/results/: the measurements the lessons read."""
    return course_dir() / "bench" / "results"
