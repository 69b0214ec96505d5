"""Input files for the demo: the Python standard library's own source."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path


def stdlib_sources() -> list[Path]:
    """Return the standard library's .py files, without installed packages, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in ("site-packages", "dist-packages", "__pycache__")]
        sources.extend(Path(directory) / name for name in files if name.endswith(".py"))
    if not sources:
        raise FileNotFoundError(f"no .py files under {root}; the demo needs the Python standard library's source")
    return sorted(sources)


def interactive_inputs(sources: list[Path], count: int = 200) -> list[str]:
    """Pick mid-sized files (4 to 40 KB): a few milliseconds of work each."""
    picked = [str(path) for path in sources if 4_000 <= path.stat().st_size <= 40_000]
    return picked[:: max(1, len(picked) // count)][:count] or [str(sources[0])]


def bulk_batches(sources: list[Path], batch_bytes: int) -> list[list[str]]:
    """Group files into batches of about `batch_bytes`, largest files first."""
    by_size = sorted(sources, key=lambda path: path.stat().st_size, reverse=True)
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path in by_size:
        current.append(str(path))
        size += path.stat().st_size
        if size >= batch_bytes:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches
