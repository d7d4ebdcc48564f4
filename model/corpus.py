"""The training text: which files, read how much of them, split how.

The default corpus is the installed Python standard library's own sources, so
training works offline on any machine that runs this code. Any local text
files or folders can replace it.

The train/validation split is decided per document (one file = one document)
by a hash of its content: the same corpus always splits the same way, whatever
order the files were found in, and identical files can never land on both
sides.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_MAX_BYTES = 32_000_000  # the whole standard library (about 11 MB) fits; a large custom corpus is cut here
VAL_FRACTION = 0.02

# Parts of the standard library that are not its own code: test suites, third-party
# packages, build configuration, and generated codec tables (character maps, not code).
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}


class CorpusError(Exception):
    """A corpus that cannot be used; the message says which path and why."""


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, relative to the corpus root it was found under
    text: str

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by path relative to its root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned in place, so os.walk never descends into site-packages' many thousand files.
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("config-")]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_paths(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Expand files and folders into (file, display name) pairs; folders are walked in sorted order."""
    found = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((given, given.name))
        elif given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file()):
                relative = path.relative_to(given)
                if not any(part.startswith(".") for part in relative.parts):  # .git and friends
                    found.append((path, f"{given.name}/{relative.as_posix()}"))
        else:
            raise CorpusError(f"corpus path {given} does not exist (give text files or folders of them)")
    return found


def read_documents(paths: Optional[Sequence[Path]] = None, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """Read the corpus: `paths` (files or folders), or the standard library when None.

    Files that are not UTF-8 text are skipped (a folder may hold images or
    archives). Files are taken in order while they fit in `max_bytes`, so
    the cut is the same on every run.
    """
    if paths:
        candidates = resolve_paths(paths)
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = [(p, p.relative_to(root).as_posix()) for p in stdlib_files()]
    documents, total = [], 0
    for path, name in candidates:
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        if total + len(data) > max_bytes:
            if documents:
                continue  # too big for what is left; a later, smaller file may still fit
            text = data[:max_bytes].decode("utf-8", errors="ignore")  # one huge file: keep its head
        documents.append(Document(name, text))
        total += len(text.encode("utf-8"))
    if not documents:
        where = ", ".join(map(str, paths)) if paths else "the standard library"
        raise CorpusError(f"no UTF-8 text found in {where}")
    return documents


def split_documents(documents: Iterable[Document], val_fraction: float = VAL_FRACTION) -> tuple[list[Document], list[Document]]:
    """Deterministic, disjoint train/validation split by content hash; both sides are never empty.

    A document goes to validation when its hash, read as a number in [0, 1),
    is below val_fraction. A tiny corpus may have no such document: then the
    one with the smallest hash goes there, and a corpus of one document gives
    its last lines (about val_fraction of it) to validation.
    """
    documents = list(documents)
    if len(documents) == 1:
        return split_single(documents[0], val_fraction)
    scores = [int(d.digest[:16], 16) / 16**16 for d in documents]
    is_val = [score < val_fraction for score in scores]
    if not any(is_val):
        is_val[scores.index(min(scores))] = True
    if all(is_val):
        is_val[scores.index(max(scores))] = False
    train = [d for d, val in zip(documents, is_val) if not val]
    val = [d for d, val in zip(documents, is_val) if val]
    return train, val


def split_single(document: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    lines = document.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise CorpusError(f"corpus {document.name} is a single line; give more text so part of it can be held out for validation")
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - val_fraction))))
    return (
        [Document(document.name, "".join(lines[:cut]))],
        [Document(f"{document.name} (tail)", "".join(lines[cut:]))],
    )
