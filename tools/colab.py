#!/usr/bin/env python3
"""The course's GitHub address, and the Colab set-up that the lessons and the exercise notebooks carry for it.

Each of these notebooks opens with an "Open in Colab" badge (in its first markdown cell) that links to the
notebook itself on GitHub, and a first code cell whose Colab block, on Colab only, clones the course, installs it
next to Colab's own torch and moves to notebooks/; each picks its device and compute dtype with lesson 0's two
lines (float16 on a T4, which has no bfloat16). The notebooks are the lessons in LESSONS (notebooks/), every
solution (solutions/NN_name.py) and the exercise generated from it (exercises/, by tools/make_exercises.py, which
keeps the solution's Colab block and points the badge at the exercise). A notebook opened on Colab from GitHub
has nothing else to read the address from, so it is written into each notebook, from REPO and BRANCH below:
change them here, then

    python tools/colab.py --write               # rewrite the badges and Colab blocks of notebooks/ and solutions/
    make notebooks                              # re-execute the lessons (their first code cell changed)
    python tools/make_exercises.py --execute    # re-execute the solutions and regenerate exercises/

`python tools/colab.py` (no argument) only checks that every badge and block is the current one.
"""

import argparse
import re
import sys
from pathlib import Path

REPO = "OWNER/qlora-course"  # placeholder until the course is published: its GitHub "owner/name"
BRANCH = "main"
CLONE = REPO.rsplit("/", 1)[1]  # the folder `git clone` makes, under Colab's /content
# The lessons that carry the set-up (notebooks/NN_*.py). Every solutions/NN_name.py carries it too, and so does
# its exercise: they need no list.
LESSONS = ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = ROOT / "solutions"

BLOCK_START = 'IN_COLAB = "google.colab" in sys.modules'
# Lesson 0 derives these two lines (section 2); every notebook's first code cell has them.
DEVICE_LINES = """device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16"""
BADGE_LINE = re.compile(r"^# \[!\[Open In Colab\]\(.*$", re.MULTILINE)


def badge(stem: str, folder: str = "notebooks") -> str:
    """The badge's line in a py:percent markdown cell, linking to <folder>/<stem>.ipynb on GitHub."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{folder}/{stem}.ipynb"
    return f"# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def colab_block() -> str:
    """The first code cell's Colab block (the lines from BLOCK_START to the end of its `if`)."""
    return f'''{BLOCK_START}
if IN_COLAB:  # clone the course, install it beside Colab's own torch (tools/colab_install.sh), run from notebooks/
    import importlib
    import subprocess

    subprocess.run(["sh", "-c", "[ -d {CLONE} ] || git clone -q --depth 1 -b {BRANCH} https://github.com/{REPO}; "
                    f"sh {CLONE}/tools/colab_install.sh {{sys.executable}}"], cwd="/content", check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir("/content/{CLONE}/notebooks")'''


def with_badge(text: str, stem: str, folder: str) -> str:
    """`text` (a py:percent notebook) with its badge replaced by badge(stem, folder), or put under the title."""
    if BADGE_LINE.search(text):
        return BADGE_LINE.sub(lambda _: badge(stem, folder), text, count=1)
    title_end = text.index("\n", text.index("\n# # ") + 1)  # the title: the first line of the first markdown cell
    return f"{text[:title_end]}\n#\n{badge(stem, folder)}{text[title_end:]}"


def _block_span(lines):
    """(first, end) line indices of the Colab block in `lines`, or None: BLOCK_START and its indented `if`."""
    try:
        first = lines.index(BLOCK_START)
    except ValueError:
        return None
    end = first + 2  # BLOCK_START, then the `if IN_COLAB:` line
    while end < len(lines) and (not lines[end] or lines[end].startswith("    ")):
        end += 1
    while not lines[end - 1]:  # the blank lines after the block belong to what follows
        end -= 1
    return first, end


def notebooks():
    """(folder, stem) of every notebook that carries the set-up: the lessons, the solutions, the exercises."""
    lessons = [("notebooks", next(NOTEBOOKS.glob(f"{number}_*.py")).stem) for number in LESSONS]
    solutions = sorted(p.stem for p in SOLUTIONS.glob("[0-9]*.py"))
    return lessons + [(folder, stem) for folder in ("solutions", "exercises") for stem in solutions]


def text_problems(text: str, stem: str, folder: str) -> list:
    """What is missing from one notebook's text (py:percent): its badge, the current Colab block, the device lines."""
    where, found = f"{folder}/{stem}.py", []
    if badge(stem, folder) not in text.split("\n# %%", 1)[0]:
        found.append(f"{where}: the first markdown cell lacks the badge {badge(stem, folder)}")
    if colab_block() not in text:
        found.append(f"{where}: the first code cell lacks the current Colab block (tools/colab.py)")
    if DEVICE_LINES not in text:
        found.append(f"{where}: lacks lesson 0's two lines that pick the device and the compute dtype")
    return found


def problems():
    """One line per notebook whose badge, Colab block or device lines are missing or not the current ones."""
    found = []
    for folder, stem in notebooks():
        path = ROOT / folder / f"{stem}.py"
        if not path.exists():
            found.append(f"{folder}/{stem}.py is missing (exercises/: run `python tools/make_exercises.py`)")
            continue
        found += text_problems(path.read_text(encoding="utf-8"), stem, folder)
    return found


def with_setup(text: str, stem: str, folder: str) -> str:
    """`text` (a py:percent notebook) with the current badge, and the current Colab block in place of the old one
    (or of its first line, BLOCK_START, alone). ValueError when there is no BLOCK_START line."""
    lines = text.split("\n")
    span = _block_span(lines)
    if span is None:
        raise ValueError(f"{folder}/{stem}.py has no line {BLOCK_START!r} to start the Colab block at")
    lines[span[0]:span[1]] = colab_block().split("\n")
    return with_badge("\n".join(lines), stem, folder)


def write():
    """Put the current badge and Colab block into each lesson and solution; the files changed. exercises/ is
    generated from solutions/ by tools/make_exercises.py."""
    changed = []
    for folder, stem in notebooks():
        if folder == "exercises":
            continue
        path = ROOT / folder / f"{stem}.py"
        text = path.read_text(encoding="utf-8")
        try:
            new = with_setup(text, stem, folder)
        except ValueError as err:
            sys.exit(f"colab: {err}")
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(f"{folder}/{path.name}")
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the badges and Colab blocks for REPO")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print(f"colab: rewrote {', '.join(changed)}" if changed else "colab: every notebook is up to date")
        if any(name.startswith("solutions/") for name in changed):
            print("colab: now run `python tools/make_exercises.py --execute` (exercises/ follows solutions/)")
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    if found:
        sys.exit(1)
    print(f"colab: lessons {', '.join(LESSONS)}, the solutions and the exercises open in Colab "
          f"from github.com/{REPO} ({BRANCH})")


if __name__ == "__main__":
    main()
