"""Shared fixtures. The benchmark files live in ../shared/data/math beside the checkout (CI has it),
wherever SELFDISTILL_DATA_ROOT points, or where `selfdistill data fetch` put them; tests that need them
skip where none is found."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The benchmark files: $SELFDISTILL_DATA_ROOT, else ../shared/data/math beside the checkout (CI has
    it), else what `selfdistill data fetch` wrote. A fresh clone has none of them: the tests that need
    the real files skip, saying how to get them."""
    from selfdistill.paths import data_cache_dir

    candidates = [Path(os.environ["SELFDISTILL_DATA_ROOT"])] if os.environ.get("SELFDISTILL_DATA_ROOT") else []
    candidates += [REPO.parent / "shared" / "data" / "math", data_cache_dir()]
    for root in candidates:
        if (root / "math500" / "test.jsonl").exists():
            return root
    pytest.skip(
        "benchmark files not found (looked in " + ", ".join(str(c) for c in candidates) + "); run "
        "`selfdistill data fetch` or set SELFDISTILL_DATA_ROOT to a folder holding aime24/, math500/, gsm8k/ ..."
    )
