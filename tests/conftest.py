"""Shared fixtures: paths to the real assets in ../shared/data (tests that need them skip where it is absent)."""

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

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


def script_env() -> dict[str, str]:
    """The environment of a script run as its own process: this checkout importable, one CPU thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_script(script: str, *args: str, timeout: float = 120, **popen: Any) -> subprocess.CompletedProcess:
    """``python script *args`` as its own process, from the repository root (``popen``: more of ``Popen``'s
    arguments).

    Past ``timeout`` seconds it is killed with every process it started (the ranks of a multi-process run), and
    ``subprocess.TimeoutExpired`` fails the test: a hang leaves nothing running.
    """
    with subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True, **popen) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script_in_this_process(script: str, *args: str, capfd) -> subprocess.CompletedProcess:
    """What ``python script *args`` from the repository root exits with and prints, run in this process.

    The script runs as ``__main__`` with that ``sys.argv`` and working directory, so its command line is parsed and
    handled as in a process of its own, without the interpreter start-up and imports that cost seconds each time.
    What only a new process shows (the start-up itself, the decoding of argv, the exit of the interpreter, several
    processes) is for tests that start one. The environment, torch's thread count and its random state are
    restored after.
    """
    argv = [script, *args]
    capfd.readouterr()  # what was printed before is not the script's
    cwd, threads = os.getcwd(), torch.get_num_threads()
    with mock.patch.dict(os.environ), mock.patch.object(sys, "argv", argv), torch.random.fork_rng(devices=[]):
        os.chdir(ROOT)
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            status = 0
        except SystemExit as exit:  # the status the interpreter would end with
            if exit.code is None or isinstance(exit.code, int):
                status = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
                status = 1
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, status, out, err)


def convert_in_this_process(*args: str) -> None:
    """``scripts/convert_checkpoint.py *args``'s command line run in this process, for fixtures (which have no
    ``capfd`` for ``run_script_in_this_process``); an error exits as the script would (``SystemExit``)."""
    from lit_adapter.cli import run_cli

    convert = runpy.run_path(str(ROOT / "scripts" / "convert_checkpoint.py"))["convert_checkpoint"]
    run_cli(convert, list(args))


SMOLLM2_GGUF = "smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct GGUF converted by scripts/convert_checkpoint.py (once per test session).

    Its command line runs in this process: a new interpreter's start-up would double the conversion's seconds, and
    the script's own process is tested in tests/convert/test_convert.py.
    """
    gguf = shared_file(SMOLLM2_GGUF)
    output_dir = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    convert_in_this_process("--format", "gguf", "--checkpoint_path", str(gguf), "--output_dir", str(output_dir))
    return output_dir


def another_sentencepiece_model(model: Path, destination: Path) -> Path:
    """A copy of the SentencePiece ``model`` whose two most frequent merged pieces trade ids: another tokenizer of
    the same vocabulary size, which gives most texts other ids."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    first, second = [piece for piece in proto.pieces if piece.type == piece.NORMAL][:2]
    first.piece, second.piece = second.piece, first.piece
    destination.write_bytes(proto.SerializeToString())
    return destination


@pytest.fixture(scope="session")
def llama3_converted(tmp_path_factory) -> Path:
    """Meta's Llama 3 tiktoken ``tokenizer.model`` as conversion writes it for Llama 3.0 (whose tokenizer.json
    ../shared/data holds): tokenizer.json, tokenizer_config.json (with Meta's chat template)."""
    from lit_adapter.checkpoint import save_tokenizer_files
    from lit_adapter.convert import find_tokenizer

    download, converted = tmp_path_factory.mktemp("llama3_meta"), tmp_path_factory.mktemp("llama3_converted")
    (download / "tokenizer.model").symlink_to(shared_file("llama3_tokenizer/tokenizer.model"))
    save_tokenizer_files(find_tokenizer("meta", download, llama3_release="3.0"), converted)
    return converted
