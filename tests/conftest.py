"""Shared fixtures. The benchmark files live in ../shared/data/math beside the checkout (CI has it),
or wherever SELFDISTILL_DATA_ROOT points."""

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
    root = Path(os.environ.get("SELFDISTILL_DATA_ROOT", REPO.parent / "shared" / "data" / "math"))
    if not (root / "math500" / "test.jsonl").exists():
        raise FileNotFoundError(
            f"benchmark files not found under {root}; set SELFDISTILL_DATA_ROOT to the folder "
            "holding aime24/, math500/, gsm8k/ ..."
        )
    return root
