"""Files written whole or not at all: the text goes to a hidden file beside the target, then is renamed into place,
so a reader (or a run resumed after a crash) never sees half a file. Light on purpose: standard library only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `.<name>.tmp` beside it and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, value: Any, *, indent: int = 1) -> None:
    """Write `value` as JSON (non-ASCII characters kept as they are) with a final newline, atomically."""
    write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")
