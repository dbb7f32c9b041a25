"""Faults that the bad-input table (test_bad_inputs.py) cannot express as one command line: signals, a second live
run, interrupted and out-of-space writers, a closed stdout, changed hyperparameters on resume, sampling numerics and
errors of multi-process runs. Each ends with its exit status, at most one ``error:`` line, no traceback and no
partial file where a reader would take it.

Runs are in-process on the real 260K TinyStories model, a dozen Alpaca records of at most 128 tokens, and 2-4 steps.
"""

import errno
import fcntl
import json
import os
import re
import resource
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from conftest import ROOT, another_sentencepiece_model, run_script, shared_file
from lit_adapter import checkpoint, files
from lit_adapter.train import fabric_loop as training
from lit_adapter.train import lightning_cli as trainer_cli
from lit_adapter.train import lightning_module as lightning
from lit_adapter.train import recipe
from lit_adapter.files import torch_load
from lit_adapter.train.state import HPARAMS_FILE, RUN_LOCK, STATE_FILE
from lit_adapter.cli import EXIT_INTERRUPTED, fail, run_cli
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.errors import UserError
from lit_adapter.generate.sampling import sample

RUN = {"accelerator": "cpu", "train.max_steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 4,
       "train.learning_rate": 0.05, "train.warmup_steps": 1, "save_interval": 1, "eval.interval": 1000,
       "eval.max_batches": 1, "eval.max_new_tokens": 1}


def script(name: str) -> dict:
    return runpy.run_path(str(ROOT / name))


def args_of(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    a = {"root": root, "checkpoint": root / "stories260K", "data": root / "data", "records": root / "records.json"}
    script("scripts/convert_checkpoint.py")["convert_checkpoint"](
        "llama2c", shared_file("stories260K/stories260K.bin"), a["checkpoint"])
    a["records"].write_text(json.dumps(json.loads(shared_file("alpaca/alpaca_data_first335.json").read_text())[:12]))
    script("scripts/prepare_alpaca.py")["main"](destination_dir=a["data"], checkpoint_dir=a["checkpoint"],
                                                data_file=a["records"], val_size=2, max_seq_length=128)
    return a


def finetune(assets: dict, out_dir: Path, **options) -> None:
    """finetune/adapter.py's command line, run in this process."""
    run_cli(training.main, args_of({"checkpoint_dir": assets["checkpoint"], "data_dir": assets["data"],
                                    "out_dir": out_dir, **RUN, **options}))


def trainer_args(assets: dict, root: Path, *extra: str) -> list[str]:
    """finetune/adapter_trainer.py's command line for one step."""
    return ["--model.checkpoint_dir", str(assets["checkpoint"]), "--data.data_dir", str(assets["data"]),
            "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--model.train.max_steps", "1",
            "--model.train.global_batch_size", "4", "--model.eval.max_new_tokens", "1", *extra]


def exits_with(status: int, capsys, function, *args, **kwargs) -> list[str]:
    """Call ``function``, which must exit with ``status``; return its stderr lines (checked: no traceback, and for a
    user error exactly one ``error:`` line, the last)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        function(*args, **kwargs)
    assert exit_info.value.code == status
    captured = capsys.readouterr()
    lines = [line.strip() for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in lines if line.startswith("error:")]
    if status == 1:
        assert len(errors) == 1 and lines[-1] == errors[0], lines
    else:
        assert not errors, lines
    return lines


def visible_files(directory: Path) -> list[str]:
    """Every file below ``directory`` that a reader could take (not the hidden temporary ones, nor the logs)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") or part == "logs" for part in p.relative_to(directory).parts))


# ------------------------------------------------------------------------------ 2. resuming with new hyperparameters

def test_resume_says_what_continues_and_follows_a_new_learning_rate(assets, tmp_path, capsys):
    out = tmp_path / "out"
    finetune(assets, out)
    capsys.readouterr()
    finetune(assets, out, resume="auto", **{"train.max_steps": 3, "train.learning_rate": 0.01,
                                            "train.weight_decay": 0.1})
    output = capsys.readouterr().out
    assert (f"Resumed from {out}/step-000002/{STATE_FILE} at step 2: adapter, optimizer moments, schedule position, "
            "data position and random state continue; changed from now on: learning_rate 0.05 -> 0.01, "
            "weight_decay 0.02 -> 0.1") in output, output
    state = torch_load(out / "step-000003" / STATE_FILE)
    (group,) = state["optimizer"]["param_groups"]
    assert state["scheduler"]["base_lrs"] == [0.01] and group["initial_lr"] == 0.01 and group["weight_decay"] == 0.1
    factor = recipe.lr_factor(3, warmup_steps=1, total_steps=3)
    assert group["lr"] == pytest.approx(0.01 * factor)


# ------------------------------------------------------------------------------ 4. interrupted runs do not exit 0

@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_saves_its_state_and_exits_non_zero(assets, tmp_path, capsys, monkeypatch, signum, status):
    apply, signalled = training.apply_gradients, []

    def apply_then_signal(*args) -> None:  # the signal arrives during step 1
        apply(*args)
        if not signalled:
            signalled.append(signal.raise_signal(signum))

    monkeypatch.setattr(training, "apply_gradients", apply_then_signal)
    out = tmp_path / "out"
    exits_with(status, capsys, finetune, assets, out, **{"train.max_steps": 4, "save_interval": 1000})
    assert visible_files(out) == ["hyperparameters.yaml", "step-000001/adapter.safetensors",
                                  "step-000001/hyperparameters.yaml", f"step-000001/{STATE_FILE}"]


def test_a_trainer_run_stopped_by_sigterm_exits_143(assets, tmp_path, capsys, monkeypatch):
    on_batch_end = lightning.AdapterModule.on_train_batch_end

    def then_sigterm(self, *args) -> None:
        on_batch_end(self, *args)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(lightning.AdapterModule, "on_train_batch_end", then_sigterm)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    exits_with(128 + signal.SIGTERM, capsys, trainer_cli.main,
               trainer_args(assets, tmp_path, "--model.train.max_steps", "3"))  # Lightning's own status is 0


# ------------------------------------------------------------------------------ 5. a prepared set is whole or refused

def test_a_preparation_stopped_between_its_files_is_refused_by_readers(assets, tmp_path, monkeypatch):
    data = tmp_path / "data"
    prepare = script("scripts/prepare_alpaca.py")["main"]
    options = {"destination_dir": data, "checkpoint_dir": assets["checkpoint"], "data_file": assets["records"],
               "val_size": 2, "max_seq_length": 128}
    prepare(**options)
    save = torch.save

    def killed_before_val(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".val.pt."):
            raise KeyboardInterrupt
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_before_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(**{**options, "seed": 7})  # a new train split is in place, the old val split and config remain
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match=r"train\.pt is not the file that .*prep_config\.yaml describes \(a "
                                        r"preparation stopped half-way"):
        InstructionDataModule(data).setup()
    prepare(**{**options, "seed": 7})
    InstructionDataModule(data).setup()


# ------------------------------------------------------------------------------ 6. one run per folder

def test_a_second_live_run_in_the_folder_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / RUN_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        lines = exits_with(1, capsys, finetune, assets, out)
    assert lines[-1] == f"error: another run is writing to {out} now: wait for it to end, or choose another --out_dir"
    assert visible_files(out) == []
    finetune(assets, out, **{"train.max_steps": 1})  # the lock ends with its holder
    assert yaml.safe_load((out / "step-000001" / HPARAMS_FILE).read_text())["run_id"]


# ------------------------------------------------------------------------------ 8. sampling numerics

@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature):
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)) * 20
    torch.testing.assert_close(sample(logits, temperature=temperature), logits.argmax(-1, keepdim=True))


# ------------------------------------------------------------------------------ 10. a full disk

# how the writers fail on a real full disk (a small tmpfs): the OS, safetensors, and torch's zip writer, whose message
# does not say why (the disk is then found full)
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_no_space(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def torch_save_on_a_full_disk(obj, path, *args, **kwargs):
    Path(path).write_bytes(b"\0" * 100)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("writer", ["convert-weights", "convert-tokenizer", "prepare", "extract", "finetune-state",
                                    "trainer-checkpoint"])
def test_a_full_disk_ends_with_one_line_and_no_partial_output(assets, tmp_path, capsys, monkeypatch, writer):
    out = tmp_path / "out"
    if writer.startswith("convert"):
        target = "checkpoint.save_file" if writer == "convert-weights" else "checkpoint.shutil.copyfile"
        monkeypatch.setattr(f"lit_adapter.{target}", half_then_no_space if "weights" in writer else no_space)
        call = (run_cli, script("scripts/convert_checkpoint.py")["convert_checkpoint"],
                ["--format", "llama2c", "--checkpoint_path", str(shared_file("stories260K/stories260K.bin")),
                 "--output_dir", str(out)])
    elif writer == "prepare":
        monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
        monkeypatch.setattr(files, "free_bytes", lambda directory: 0)
        call = (run_cli, script("scripts/prepare_alpaca.py")["main"],
                ["--destination_dir", str(out), "--checkpoint_dir", str(assets["checkpoint"]), "--data_file",
                 str(assets["records"]), "--val_size", "2"])
    elif writer == "extract":
        finetune(assets, tmp_path / "run", **{"train.max_steps": 1})
        monkeypatch.setattr(checkpoint, "save_file", half_then_no_space)
        call = (run_cli, script("scripts/extract_adapter.py")["extract_adapter"],
                ["--state_path", str(tmp_path / "run" / "step-000001"), "--output_path", str(out / "a.safetensors")])
    elif writer == "finetune-state":
        monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
        monkeypatch.setattr(files, "free_bytes", lambda directory: 0)
        call = (finetune, assets, out)
    else:
        monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save",
                            lambda checkpoint, path: half_then_no_space(None, path))
        monkeypatch.setattr(sys, "argv", sys.argv[:1])
        call = (trainer_cli.main, trainer_args(assets, out, "--model.out_dir", str(tmp_path / "adapter")))
    lines = exits_with(1, capsys, *call)
    assert "no space left on device" in lines[-1] and lines[-1].startswith("error: cannot write "), lines[-1]
    visible = [name for name in visible_files(out) if name != "config.yaml"] if out.exists() else []  # LightningCLI's
    if writer == "finetune-state":  # the step's adapter is there, but no state that --resume would take
        assert visible == ["hyperparameters.yaml", "step-000001/adapter.safetensors",
                           "step-000001/hyperparameters.yaml"]
    else:
        assert visible == []
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]


def test_only_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    assert files.ran_out_of_space(OSError(errno.EDQUOT, "quota"), tmp_path)
    assert not files.ran_out_of_space(OSError(errno.EIO, "I/O error"), tmp_path)
    assert not files.ran_out_of_space(RuntimeError("unexpected pos 576 vs 534"), tmp_path)  # room left: a bug
    monkeypatch.setattr(files, "free_bytes", lambda directory: 0)
    assert files.ran_out_of_space(RuntimeError("unexpected pos 576 vs 534"), tmp_path)


# ------------------------------------------------------------------------------ 11. one line, not a traceback

def test_a_closed_stdout_ends_with_one_line(assets):
    reader, writer = os.pipe()
    os.close(reader)  # as `| head` does once it has its lines
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "generate/base.py", "--checkpoint_dir", str(assets["checkpoint"]),
                             "--max_new_tokens", "20"], cwd=ROOT, env=env, stdout=writer, stderr=subprocess.PIPE,
                            text=True, timeout=120)
    os.close(writer)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == "error: the output was closed before it ended (e.g. by | head); stopped", lines
    assert sum(line.startswith("error:") for line in lines) == 1 and "Exception ignored" not in result.stderr


@pytest.mark.parametrize("route", ["fabric", "trainer"])
def test_ctrl_c_while_the_model_loads_exits_130_quietly(assets, tmp_path, capsys, monkeypatch, route):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training if route == "fabric" else lightning, "load_model", interrupted)
    if route == "fabric":
        exits_with(EXIT_INTERRUPTED, capsys, finetune, assets, tmp_path / "out")
    else:
        monkeypatch.setattr(sys, "argv", sys.argv[:1])
        exits_with(EXIT_INTERRUPTED, capsys, trainer_cli.main, trainer_args(assets, tmp_path))


# ------------------------------------------------------------------------------ 12. multi-process errors print once

@pytest.mark.parametrize("rank, printed", [(0, 1), (1, 0)])
def test_a_user_error_prints_on_the_first_process_only(capsys, monkeypatch, rank, printed):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    with pytest.raises(SystemExit) as exit_info:
        fail("the same on every rank")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.count("error: the same on every rank") == printed


# ------------------------------------------------------------------------------ round 3: several devices, uneven work

def prepared(assets: dict, directory: Path, **options) -> Path:
    """The records prepared into ``directory`` (128 tokens at most) with ``options``."""
    script("scripts/prepare_alpaca.py")["main"](destination_dir=directory, checkpoint_dir=assets["checkpoint"],
                                                data_file=assets["records"], max_seq_length=128, **options)
    return directory


def val_losses(output: str) -> dict[int, float]:
    """step -> the validation loss that an evaluation printed."""
    return {int(step): float(loss) for step, loss in re.findall(r"step (\d+): val loss (\S+)", output)}


def test_trainer_ranks_with_one_validation_sample_report_the_one_process_loss(assets, tmp_path, capsys, monkeypatch):
    """FSDP on two processes, one validation sample: one rank validates it while the other runs an empty
    micro-batch (FSDP gathers the weights in each pass). It printed "val loss nan" when no rank had a batch."""
    data = prepared(assets, tmp_path / "data", val_size=1)
    options = ("--data.data_dir", str(data), "--model.train.max_steps", "2", "--model.train.micro_batch_size", "2",
               "--model.eval.interval", "2")
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    capsys.readouterr()
    trainer_cli.main(trainer_args(assets, tmp_path / "one", *options))
    one_process = val_losses(capsys.readouterr().out)
    assert list(one_process) == [0, 2]
    result = run_script("finetune/adapter_trainer.py", *trainer_args(assets, tmp_path / "two", *options),
                        "--trainer.devices", "2", "--trainer.strategy", "fsdp", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert val_losses(result.stdout) == pytest.approx(one_process, abs=1e-4)


# ------------------------------------------------------------------------------ round 3: no exit 0 having done nothing

def test_a_trainer_fit_that_trains_nothing_exits_1(assets, tmp_path, capsys, monkeypatch):
    """A finished run resumed stops before any step (as --trainer.max_time 0 would): it writes no adapter, so it
    is no success."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    trainer_cli.main(trainer_args(assets, tmp_path))
    lines = exits_with(1, capsys, trainer_cli.main, trainer_args(assets, tmp_path, "--ckpt_path", "last",
                                                                 "--model.out_dir", str(tmp_path / "again")))
    assert lines[-1] == ("error: the Trainer stopped before training (at step 1, its limits reached), so no adapter "
                         "was written: raise --trainer.max_steps, max_epochs or max_time")
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------ round 3: outputs, nan, file-size limits

def test_extract_adapter_refuses_an_output_that_is_the_state_it_reads(assets, tmp_path, capsys):
    """Under its own name, a link, a hard link or another path: the state stays, and the run still resumes."""
    finetune(assets, tmp_path / "run", **{"train.max_steps": 1})
    step = tmp_path / "run" / "step-000001"
    state, saved = step / STATE_FILE, (step / STATE_FILE).read_bytes()
    (tmp_path / "link.pt").symlink_to(state)
    os.link(state, tmp_path / "hard.pt")
    extract = script("scripts/extract_adapter.py")["extract_adapter"]
    for output in (state, tmp_path / "link.pt", tmp_path / "hard.pt", step / ".." / step.name / STATE_FILE):
        lines = exits_with(1, capsys, run_cli, extract, ["--state_path", str(step), "--output_path", str(output)])
        assert lines[-1] == (f"error: --output_path {output} names the input {state}: writing it would destroy that "
                             "input; choose another path")
    assert state.read_bytes() == saved
    finetune(assets, tmp_path / "run", resume="auto", **{"train.max_steps": 2})
    assert (tmp_path / "run" / "step-000002" / STATE_FILE).is_file()


@pytest.mark.parametrize("route", ["fabric", "trainer"])
def test_without_validation_samples_no_loss_is_printed(assets, tmp_path, capsys, monkeypatch, route):
    """--val_size 0: the evaluations say there is no validation loss (they printed "val loss nan")."""
    data = prepared(assets, tmp_path / "data", val_size=0)
    capsys.readouterr()
    if route == "fabric":
        finetune(assets, tmp_path / "out", data_dir=data, **{"eval.interval": 1})
    else:
        monkeypatch.setattr(sys, "argv", sys.argv[:1])
        trainer_cli.main(trainer_args(assets, tmp_path, "--data.data_dir", str(data), "--model.train.max_steps", "2",
                                      "--model.eval.interval", "1"))
    output = capsys.readouterr().out
    reports = re.findall(r"step \d+: .*val loss.*", output)
    assert reports[0] == "step 0: no val loss (no validation samples)", output
    assert all(report.endswith(": no val loss (no validation samples)") for report in reports), reports
    assert "Saved the adapter" in output


def test_a_file_size_limit_is_told_from_other_write_failures(tmp_path, monkeypatch):
    too_large = files.ran_out_of_space(OSError(errno.EFBIG, os.strerror(errno.EFBIG)), tmp_path)
    assert too_large == files.NO_ROOM[errno.EFBIG] and "ulimit -f" in too_large
    assert files.ran_out_of_space(SafetensorError("I/O error: File too large (os error 27)"), tmp_path) == too_large
    assert files.ran_out_of_space(OSError(errno.ENOSPC, "full"), tmp_path) == files.NO_ROOM[errno.ENOSPC]
    monkeypatch.setattr(files.resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert files.ran_out_of_space(RuntimeError("unexpected pos 576 vs 534"), tmp_path) is None  # room, no limit: a bug
    monkeypatch.setattr(files.resource, "getrlimit", lambda which: (1 << 20, resource.RLIM_INFINITY))
    assert files.ran_out_of_space(RuntimeError("unexpected pos 576 vs 534"), tmp_path) == too_large  # torch's writer


def file_size_limit(kib: int):
    """A ``preexec_fn`` that limits the files the process writes to ``kib`` KiB (as ``ulimit -f``)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def error_lines_of(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a script's stderr, which must hold no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("route", ["fabric", "trainer"])
def test_a_file_size_limit_under_ddp_is_one_line_of_the_first_process(assets, tmp_path, route):
    """Only the first process writes: its error line is the only one. The other process, waiting for it in a
    collective, ends quietly (it added a traceback; on the Trainer route the first process then hung in a
    broadcast while it cleaned up)."""
    out = tmp_path / "out"
    if route == "fabric":
        command = ("finetune/adapter.py", *args_of({"checkpoint_dir": assets["checkpoint"], "data_dir": assets["data"],
                                                    "out_dir": out, **RUN, "train.micro_batch_size": 2,
                                                    "devices": 2, "strategy": "ddp"}))
    else:
        command = ("finetune/adapter_trainer.py", *trainer_args(assets, out, "--model.train.micro_batch_size", "2",
                                                                "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    result = run_script(*command, timeout=300, preexec_fn=file_size_limit(16))  # a training state is larger
    assert result.returncode == 1, result.stderr[-3000:]
    [error] = error_lines_of(result)
    assert error.startswith(f"error: cannot write {out}/") and error.endswith(
        f": {files.NO_ROOM[errno.EFBIG]} (the unfinished file was removed)"), error


def test_a_preparation_past_a_file_size_limit_is_one_line_and_leaves_nothing(assets, tmp_path):
    data = tmp_path / "data"
    result = run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", str(assets["checkpoint"]), "--data_file",
                        str(assets["records"]), "--destination_dir", str(data), "--val_size", "2",
                        preexec_fn=file_size_limit(8))  # the training split is larger
    assert result.returncode == 1
    assert error_lines_of(result) == [f"error: cannot write {data}/train.pt: {files.NO_ROOM[errno.EFBIG]} (the "
                                      "unfinished file was removed)"]
    assert list(data.iterdir()) == []


# ------------------------------------------------------------------------------ round 3: data of another tokenizer

@pytest.mark.parametrize("route", ["fabric", "trainer"])
def test_data_of_another_tokenizer_trains_only_when_allowed(assets, tmp_path, capsys, monkeypatch, route):
    """Of the same vocabulary size, it trained without a word; now it is refused (the bad-input rows say how) unless
    the option documented in --help allows it."""
    other = another_sentencepiece_model(assets["checkpoint"] / "tokenizer.model", tmp_path / "other.model")
    data = prepared(assets, tmp_path / "data", val_size=2, tokenizer_path=other)
    option = "--allow_other_tokenizer" if route == "fabric" else "--data.allow_other_tokenizer"
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    if route == "fabric":
        lines = exits_with(1, capsys, finetune, assets, tmp_path / "refused", data_dir=data)
        finetune(assets, tmp_path / "out", data_dir=data, allow_other_tokenizer="true")
        trained = capsys.readouterr().out
        with pytest.raises(SystemExit):
            run_cli(training.main, ["--help"])
    else:
        lines = exits_with(1, capsys, trainer_cli.main, trainer_args(assets, tmp_path, "--data.data_dir", str(data)))
        trainer_cli.main(trainer_args(assets, tmp_path, "--data.data_dir", str(data), option, "true"))
        trained = capsys.readouterr().out
        with pytest.raises(SystemExit):
            trainer_cli.main(["fit", "--help"])
    assert lines[-1].endswith(f"or pass {option} true if both tokenize alike")
    assert "Saved the adapter" in trained
    help = " ".join(capsys.readouterr().out.split())
    assert option in help and "only where both tokenize alike" in help
