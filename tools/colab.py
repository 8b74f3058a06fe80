#!/usr/bin/env python3
"""The course's GitHub address, and the Colab set-up that lessons 00-05 carry for it.

Each of those notebooks opens with an "Open in Colab" badge (in its first markdown cell) and a first code cell
whose Colab block, on Colab only, clones the course, installs it next to Colab's own torch and moves to
notebooks/; each picks its device and compute dtype with lesson 0's two lines (float16 on a T4, which has no
bfloat16). A notebook opened on Colab from GitHub has nothing else to read the address from, so it is written
into each notebook, from REPO and BRANCH below: change them here, then

    python tools/colab.py --write           # rewrite the badges and Colab blocks of lessons 00-05
    make notebooks NB='00 01 02 03 04 05'   # re-execute them (the first code cell changed)

`python tools/colab.py` (no argument) only checks that every badge and block is the current one.
"""

import argparse
import re
import sys
from pathlib import Path

REPO = "OWNER/qlora-course"  # placeholder until the course is published: its GitHub "owner/name"
BRANCH = "main"
LESSONS = ("00", "01", "02", "03", "04", "05", "06", "07", "09")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

BLOCK_START = 'IN_COLAB = "google.colab" in sys.modules'
# Lesson 0 derives these two lines (section 2); every lesson's first code cell has them.
DEVICE_LINES = """device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16"""
BADGE_LINE = re.compile(r"^# \[!\[Open In Colab\]\(.*$", re.MULTILINE)


def badge(stem: str) -> str:
    """The badge's line in a py:percent markdown cell, linking to notebooks/<stem>.ipynb on GitHub."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{stem}.ipynb"
    return f"# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def colab_block() -> str:
    """The first code cell's Colab block (the lines from BLOCK_START to the end of its `if`)."""
    return f'''{BLOCK_START}
if IN_COLAB:  # clone the course and install it next to Colab's own torch (lesson 0, "Troubleshooting")
    import importlib
    import subprocess
    from importlib.metadata import version

    COURSE = "/content/qlora-course"
    if not os.path.isdir(COURSE):
        url = "https://github.com/{REPO}"
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "{BRANCH}", url, COURSE], check=True)
    # torch pinned to the version installed: pip keeps Colab's CUDA build instead of replacing it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", COURSE, "bitsandbytes==0.50.2", f"torch=={{version('torch')}}"],
                   check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir(f"{{COURSE}}/notebooks")  # the lessons run from notebooks/ (lesson 5 reads ../bench/results)'''


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


def problems():
    """One line per lesson whose badge or Colab block is missing or not the current one."""
    found = []
    for stem in stems():
        text = (NOTEBOOKS / f"{stem}.py").read_text(encoding="utf-8")
        if badge(stem) not in text.split("\n# %%", 1)[0]:
            found.append(f"notebooks/{stem}.py: the first markdown cell lacks the badge {badge(stem)}")
        if colab_block() not in text:
            found.append(f"notebooks/{stem}.py: the first code cell lacks the current Colab block (tools/colab.py)")
        if DEVICE_LINES not in text:
            found.append(f"notebooks/{stem}.py: lacks lesson 0's two lines that pick the device and the compute dtype")
    return found


def stems():
    return [next(NOTEBOOKS.glob(f"{number}_*.py")).stem for number in LESSONS]


def write():
    """Put the current badge and Colab block into each lesson (replacing the old ones); the changed files."""
    changed = []
    for stem in stems():
        path = NOTEBOOKS / f"{stem}.py"
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        span = _block_span(lines)
        if span is None:
            sys.exit(f"colab: notebooks/{stem}.py has no line {BLOCK_START!r} to start the Colab block at")
        lines[span[0]:span[1]] = colab_block().split("\n")
        new = "\n".join(lines)
        if BADGE_LINE.search(new):
            new = BADGE_LINE.sub(lambda _: badge(stem), new, count=1)
        else:  # right under the title, the first line of the first markdown cell
            title_end = new.index("\n", new.index("\n# # ") + 1)
            new = f"{new[:title_end]}\n#\n{badge(stem)}{new[title_end:]}"
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path.name)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the badges and Colab blocks for REPO")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print(f"colab: rewrote {', '.join(changed)}" if changed else "colab: every lesson is up to date")
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    if found:
        sys.exit(1)
    print(f"colab: lessons {', '.join(LESSONS)} open in Colab from github.com/{REPO} ({BRANCH})")


if __name__ == "__main__":
    main()
