"""Shared fixtures: paths to the real assets in ../shared/data (tests that need them skip where it is absent)."""

import os
import subprocess
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


SMOLLM2_GGUF = "smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct GGUF converted by scripts/convert_checkpoint.py (once per test session)."""
    gguf = shared_file(SMOLLM2_GGUF)
    output_dir = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "--format", "gguf", "--checkpoint_path",
                             str(gguf), "--output_dir", str(output_dir)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return output_dir
