"""Shared fixtures: paths to the real assets in ../shared/data (tests that need them skip where it is absent)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real asset {path} is absent (tests expect ../shared/data beside the checkout)")
    return path


@pytest.fixture
def stories260k_bin() -> Path:
    return shared_file("stories260K/stories260K.bin")


@pytest.fixture
def tok512() -> Path:
    return shared_file("stories260K/tok512.model")


@pytest.fixture
def llama_tokenizer() -> Path:
    return shared_file("llama_tokenizer/tokenizer.model")


@pytest.fixture
def alpaca_json() -> Path:
    return shared_file("alpaca/alpaca_data_first335.json")
