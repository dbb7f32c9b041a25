"""SIGKILL at any moment of finetune/adapter.py, including in the middle of writing a checkpoint, leaves every
visible checkpoint file complete (only ``atomic_path``'s hidden ``.tmp`` files can be partial), and ``--resume auto``
goes on from the last complete training state to the very adapter that an uninterrupted run of the same length gives.

One run of the real script is killed after step directories appear and another at a random short delay; two more are
made to stop half-way through writing a training state and an adapter file (as on a slow disk) and are killed there.
Each run resumes the one before; the last one finishes. An uninterrupted run is the reference (training on the CPU
with one thread is deterministic). Set KILL_RESUME_SEED to replay a random delay.
"""

import json
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from conftest import ROOT, shared_file
from lit_adapter.checkpoint import ADAPTER_FILE
from lit_adapter.files import read_safetensors, read_safetensors_metadata, torch_load
from lit_adapter.train.state import HPARAMS_FILE, RUN_LOCK, STATE_FILE, STEP_DIR, find_resume_state

STEPS = 20
OPTIONS = {"accelerator": "cpu", "save_interval": 1, "train.max_steps": STEPS, "train.global_batch_size": 8,
           "train.micro_batch_size": 4, "train.learning_rate": 0.05, "train.warmup_steps": 2,
           "eval.interval": 1000, "eval.max_batches": 1, "eval.max_new_tokens": 2}
TIMEOUT = 120

# Runs finetune/adapter.py with torch.save (training states) or safetensors' save_file (adapter files) replaced by a
# writer that stops half-way through the temporary file of step ARGV[2] or later, touches ARGV[3] and waits there.
HALF_WRITING_LAUNCHER = """
import io, runpy, sys, time
from pathlib import Path
import torch
import lit_adapter.checkpoint

what, first_step, flag = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

def due(path):
    name = Path(path).parent.name
    return name.startswith("step-") and int(name[5:]) >= first_step

def stop_half_way(data, path):
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    flag.touch()
    time.sleep(600)

if what == "state":
    save = torch.save
    def half_save(obj, f, *args, **kwargs):
        if due(f):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            stop_half_way(buffer.getvalue(), f)
        return save(obj, f, *args, **kwargs)
    torch.save = half_save
else:
    from safetensors.torch import save as to_bytes
    save_file = lit_adapter.checkpoint.save_file
    def half_save_file(tensors, filename, metadata=None):
        if due(filename):
            stop_half_way(to_bytes(tensors, metadata=metadata), filename)
        return save_file(tensors, filename, metadata=metadata)
    lit_adapter.checkpoint.save_file = half_save_file
sys.argv = ["finetune/adapter.py", *sys.argv[4:]]
runpy.run_path("finetune/adapter.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The converted 260K checkpoint and 36 train / 4 val samples of at most 256 tokens."""
    root = tmp_path_factory.mktemp("kill_resume")
    checkpoint, data, records = root / "stories260K", root / "data", root / "records.json"
    convert = runpy.run_path(str(ROOT / "scripts" / "convert_checkpoint.py"))["convert_checkpoint"]
    convert("llama2c", shared_file("stories260K/stories260K.bin"), checkpoint)
    records.write_text(json.dumps(json.loads(shared_file("alpaca/alpaca_data_first335.json").read_text())[:40]))
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_alpaca.py"))["main"]
    prepare(destination_dir=data, checkpoint_dir=checkpoint, data_file=records, val_size=4, max_seq_length=256)
    return {"checkpoint": checkpoint, "data": data}


def command(assets: dict, out_dir: Path, **extra) -> list[str]:
    options = {"checkpoint_dir": assets["checkpoint"], "data_dir": assets["data"], "out_dir": out_dir, **OPTIONS,
               **extra}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


@pytest.fixture
def start():
    """Start a training run (by default finetune/adapter.py) with its output in a log; all are killed at the end."""
    processes = []

    def start(args: list[str], log: Path, launcher: tuple[str, ...] = ("finetune/adapter.py",)) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            processes.append(subprocess.Popen([sys.executable, *launcher, *args], cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        return processes[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended with {process.returncode} before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} after {TIMEOUT} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=TIMEOUT) == -signal.SIGKILL


def steps_with(out_dir: Path, name: str) -> list[int]:
    """The steps whose directory holds ``name``."""
    return sorted(int(m.group(1)) for p in out_dir.glob("step-*")
                  if (m := STEP_DIR.search(p.name)) and (p / name).exists())


def last_step_dir(out_dir: Path) -> int:
    return max((int(m.group(1)) for p in out_dir.glob("step-*") if (m := STEP_DIR.search(p.name))), default=0)


def check_every_visible_file_is_complete(out_dir: Path) -> list[Path]:
    """Load every checkpoint file of ``out_dir``; return the partial files, which must be hidden ``.tmp`` ones."""
    partial = []
    for directory in [out_dir, *sorted(out_dir.glob("step-*"))]:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            if path.name == RUN_LOCK:
                continue
            if path.name.endswith(".tmp"):
                assert path.name.startswith("."), path
                partial.append(path)
            elif path.name == STATE_FILE:
                state = torch_load(path)
                assert state["progress"]["step"] == int(STEP_DIR.search(directory.name).group(1)), path
                assert set(state) >= {"adapter", "optimizer", "scheduler", "progress", "rng", "model_config"}
            elif path.name == ADAPTER_FILE:
                assert read_safetensors(path) and read_safetensors_metadata(path)["format"], path
            elif path.name == HPARAMS_FILE:
                assert yaml.safe_load(path.read_text())["train"]["max_steps"] == STEPS, path
            else:
                raise AssertionError(f"unexpected file {path}")
    return partial


def test_sigkill_at_any_moment_leaves_a_resumable_run(assets, start, tmp_path):
    seed = int(os.environ.get("KILL_RESUME_SEED", time.time_ns() % 2**32))
    delay = random.Random(seed).uniform(0.0, 0.3)
    note = f"(KILL_RESUME_SEED={seed})"
    reference_dir, out_dir = tmp_path / "reference", tmp_path / "out"
    reference = start(command(assets, reference_dir), tmp_path / "reference.log")  # meanwhile, on another core
    resume = command(assets, out_dir, resume="auto")

    # 1. killed as soon as the state of step 3 is complete (the run goes on writing the next step meanwhile)
    log = tmp_path / "1.log"
    run = start(command(assets, out_dir), log)
    wait_for(lambda: (out_dir / "step-000003" / STATE_FILE).exists(), run, log, "state of step 3")
    kill(run)
    check_every_visible_file_is_complete(out_dir)
    last_state = steps_with(out_dir, STATE_FILE)[-1]
    assert last_state >= 3 and find_resume_state("auto", out_dir) == out_dir / f"step-{last_state:06d}" / STATE_FILE

    # 2, 3. killed while half of a training state, then of an adapter file, is written: that step is left out and
    # the one before is resumed
    for i, what, file in ((2, "state", STATE_FILE), (3, "adapter", ADAPTER_FILE)):
        step, flag, log = last_step_dir(out_dir) + 2, tmp_path / f"{i}.paused", tmp_path / f"{i}.log"
        run = start(resume, log, ("-c", HALF_WRITING_LAUNCHER, what, str(step), str(flag)))
        wait_for(flag.exists, run, log, f"half-written {file} of step {step}")
        kill(run)
        partial = check_every_visible_file_is_complete(out_dir)
        assert [p.parent.name for p in partial if p.name.startswith(f".{file}.")].count(f"step-{step:06d}") == 1
        assert not (out_dir / f"step-{step:06d}" / file).exists()
        assert find_resume_state("auto", out_dir) == out_dir / f"step-{step - 1:06d}" / STATE_FILE

    # 4. killed at a random short delay after a new step directory appears
    step, log = last_step_dir(out_dir) + 2, tmp_path / "4.log"
    run = start(resume, log)
    wait_for((out_dir / f"step-{step:06d}").exists, run, log, f"step directory {step}")
    time.sleep(delay)
    kill(run)
    check_every_visible_file_is_complete(out_dir)
    last_state = steps_with(out_dir, STATE_FILE)[-1]
    assert step - 1 <= last_state < STEPS, note

    # 5. the last run finishes from the last complete state, beside the partial files left over
    log = tmp_path / "5.log"
    run = start(resume, log)
    assert run.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    assert re.search(rf"Resumed from {re.escape(str(out_dir))}/step-{last_state:06d}/{STATE_FILE} at step {last_state}",
                     log.read_text()), log.read_text()[-3000:]
    assert len(check_every_visible_file_is_complete(out_dir)) >= 2  # the two half-written files are still there
    assert steps_with(out_dir, STATE_FILE) == list(range(1, STEPS + 1))

    assert reference.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    torch.testing.assert_close(read_safetensors(out_dir / ADAPTER_FILE), read_safetensors(reference_dir / ADAPTER_FILE),
                               atol=1e-6, rtol=0, msg=lambda m: f"{m} {note}")
    final, expected = (torch_load(d / f"step-{STEPS:06d}" / STATE_FILE) for d in (out_dir, reference_dir))
    torch.testing.assert_close(final["optimizer"]["state"], expected["optimizer"]["state"], atol=1e-6, rtol=0)
    assert final["scheduler"] == expected["scheduler"] and final["progress"] == expected["progress"]
