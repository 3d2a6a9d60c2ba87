"""Fixtures of the study tests: the tiny tokenizer."""

import pytest

from selfdistill.models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()
