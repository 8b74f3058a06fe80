"""Extract the course's pretraining corpus: English prose from the docstrings of CPython's standard library.

    python data/extract_corpus.py /path/to/lib/python3.11      # writes data/stdlib_docstrings.{train,heldout}.txt.gz

The corpus shipped in data/ was made with CPython 3.11.7's Lib/ (see data/README.md); another version gives
another corpus, which is why the extracted text itself is shipped and tools/pretrain_base.py never runs this.

Deterministic: files in sorted order, docstrings in source order (module, then classes and functions as
ast.walk meets them), each cleaned by inspect.cleandoc and cut into paragraphs at blank lines. A paragraph
is kept when it reads as prose: plain ASCII, no doctest (">>>") or literal-block ("::") lines, at least
40 characters, and at least 85% letters, spaces and ordinary punctuation. Its lines are joined by single
spaces, so the corpus has one paragraph per line. Repeats are dropped (first occurrence kept): the
stdlib says "Return self==value." and its kin many times over. Whole modules go to the held-out split
(about one in ten, chosen by the sha256 of the module's path), so no module has text on both sides.
"""

import argparse
import ast
import gzip
import hashlib
import inspect
import sys
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}
PROSE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:'\"()-?!")
MIN_CHARS, MIN_PROSE_FRACTION, HELDOUT_ONE_IN = 40, 0.85, 10


def docstrings(source: str):
    """Every docstring of a module in ast.walk order (module first)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # lib2to3's grammar tests and the like: not Python 3
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def prose_paragraphs(doc: str):
    for block in doc.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith(">>>") or line.endswith("::") for line in lines):
            continue
        text = " ".join(line for line in lines if line)
        if len(text) < MIN_CHARS or not text.isascii():
            continue
        if sum(c in PROSE_CHARS for c in text) / len(text) >= MIN_PROSE_FRACTION:
            yield text


def is_heldout(relative_path: str) -> bool:
    return hashlib.sha256(relative_path.encode()).digest()[0] % HELDOUT_ONE_IN == 0


def extract(lib: Path):
    seen, splits = set(), {"train": [], "heldout": []}
    for path in sorted(lib.rglob("*.py")):
        relative = path.relative_to(lib).as_posix()
        if SKIP_PARTS & set(path.relative_to(lib).parts[:-1]) or relative.startswith(("_sysconfigdata", "config-")):
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        split = "heldout" if is_heldout(relative) else "train"
        for doc in docstrings(source):
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    splits[split].append(paragraph)
    return splits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib", type=Path, help="CPython's Lib/ directory (e.g. .../lib/python3.11)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for split, paragraphs in extract(args.lib).items():
        text = "\n".join(paragraphs) + "\n"
        target = args.out / f"stdlib_docstrings.{split}.txt.gz"
        with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(text.encode("ascii"))  # mtime=0 and no file name: the same text gives the same bytes
        print(f"{target.name}: {len(paragraphs)} paragraphs, {len(text)} bytes, "
              f"text sha256 {hashlib.sha256(text.encode()).hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
