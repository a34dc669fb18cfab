"""The training corpus: reStructuredText sources of the Python documentation, split by file.

Files are ordered by a hash of their relative path, so the split is deterministic and
independent of the file system. The first files (up to `heldout_bytes`) form the held-out
evaluation text, the next ones the calibration text, the rest the training text: no file
is in two splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from zeroc.config import ZeroCError

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CorpusSplit:
    train: list[str]  # one string per source file
    heldout: list[str]
    calib: list[str]
    heldout_files: list[str]
    calib_files: list[str]


def read_documents(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of every *.txt / *.rst file under root, sorted by path hash."""
    if root.is_file():
        return [(root.name, root.read_text(encoding="utf-8", errors="replace"))]
    if not root.is_dir():
        raise ZeroCError(f"{root}: corpus not found (install Debian's python3.11-doc, or pass --corpus)")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst")]
    if not files:
        raise ZeroCError(f"{root}: no .txt or .rst files in the corpus")
    docs = [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return sorted(docs, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())


def split_corpus(docs: list[tuple[str, str]], heldout_bytes: int, calib_bytes: int,
                 max_file_bytes: int = 60_000) -> CorpusSplit:
    """Carve held-out and calibration texts from files no larger than max_file_bytes."""
    heldout, calib, train, heldout_files, calib_files = [], [], [], [], []
    h_size = c_size = 0
    for name, text in docs:
        small = len(text.encode()) <= max_file_bytes
        if small and h_size < heldout_bytes:
            heldout.append(text)
            heldout_files.append(name)
            h_size += len(text.encode())
        elif small and c_size < calib_bytes:
            calib.append(text)
            calib_files.append(name)
            c_size += len(text.encode())
        else:
            train.append(text)
    if not train:
        raise ZeroCError("corpus too small: nothing left to train on after the held-out and calibration splits")
    return CorpusSplit(train, heldout, calib, heldout_files, calib_files)
