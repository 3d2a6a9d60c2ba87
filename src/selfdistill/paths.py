"""Where selfdistill keeps what it builds or downloads. Light on purpose: no torch, no transformers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$SELFDISTILL_CACHE`` if set, else ``~/.cache/selfdistill``."""
    root = os.environ.get("SELFDISTILL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "selfdistill"


def data_cache_dir() -> Path:
    """Where `selfdistill data fetch` writes the benchmarks when given no --dest: ``<cache root>/data``."""
    return cache_dir() / "data"
