"""Fixtures of the rollout tests: the tiny tokenizer and a random tiny model."""

import pytest

from selfdistill.models import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def random_model(tok):
    return build_tiny_model(tok, seed=0)
