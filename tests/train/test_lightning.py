"""The LightningModule route (lit_adapter/lightning.py, finetune/adapter_trainer.py) on the real TinyStories 260K
model and the first Alpaca records: it starts from the base model, shares the Fabric loop's optimizer and schedule,
learns, resumes exactly from a Lightning checkpoint (also as "last", with a new learning rate), its checkpoints
convert to adapter files, it runs FSDP2 over two CPU processes, and its fit and validate subcommands agree."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Optional
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lit_adapter.adapter import is_adapter_param
from lit_adapter.checkpoint import (ADAPTER_FILE, adapter_name, adapter_prompt_style, load_adapter, load_model,
                                    open_checkpoint, save_adapter)
from lit_adapter.cli import run_cli
from lit_adapter.files import read_safetensors_metadata
from lit_adapter.precision import PRECISIONS
from lit_adapter.train import fabric_loop as training
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.train.lightning_module import AdapterModule
from lit_adapter.train.lightning_cli import AdapterCLI, main, requested_devices
from lit_adapter.train.recipe import build_optimizer, build_scheduler, loss_fn
from lit_adapter.train.strategies import TrainerFrozenHalfPrecision
from tests.conftest import ROOT, run_script_in_this_process, shared_file
from tests.train.test_fabric_loop import cli_args as fabric_args
from tests.train.test_fabric_loop import logged

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAINER_SCRIPT = ROOT / "finetune" / "adapter_trainer.py"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint_dir, data_dir): stories260K converted and the first 335 Alpaca records prepared (35 for val),
    by the two scripts' command lines (run in this process)."""
    source = shared_file("stories260K/stories260K.bin")
    alpaca = shared_file("alpaca/alpaca_data_first335.json")
    root = tmp_path_factory.mktemp("lightning")
    checkpoint_dir, data_dir = root / "stories260K", root / "alpaca"
    convert = runpy.run_path(str(ROOT / "scripts" / "convert_checkpoint.py"))["convert_checkpoint"]
    run_cli(convert, ["--format", "llama2c", "--checkpoint_path", str(source), "--output_dir", str(checkpoint_dir)])
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_alpaca.py"))["main"]
    run_cli(prepare, ["--data_file", str(alpaca), "--checkpoint_dir", str(checkpoint_dir),
                      "--destination_dir", str(data_dir), "--val_size", "35", "--skip_bad_records", "true"])
    return checkpoint_dir, data_dir


def cli_args(assets, out: Path, *extra: str) -> list[str]:
    checkpoint_dir, data_dir = assets
    return ["--model.checkpoint_dir", str(checkpoint_dir), "--data.data_dir", str(data_dir),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--model.eval.max_new_tokens", "4", "--model.eval.max_batches", "1", *QUIET, *extra]


class Recorder(L.Callback):
    """Keeps every training micro-batch and the loss the module computed on it."""

    def __init__(self, stop_at_step: Optional[int] = None) -> None:
        self.batches, self.losses = [], []
        self.stop_at_step = stop_at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        [(input_ids, targets)], _ = batch  # a micro-batch and its step's response tokens
        self.batches.append((input_ids.clone(), targets.clone()))
        self.losses.append(outputs["loss"].item() * trainer.accumulate_grad_batches)
        if trainer.global_step == self.stop_at_step:
            trainer.should_stop = True  # an interruption, as by a time limit


def command_line(args: list[str]) -> AdapterCLI:
    """The command line's classes, made in this process without running them (pytest's own arguments hidden)."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return AdapterCLI(args=args, run=False)


def fit(args: list[str], *callbacks: L.Callback, ckpt_path=None) -> AdapterCLI:
    """Run the command line's classes in this process (with extra callbacks)."""
    cli = command_line(args)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


def adapter_weights(module: AdapterModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items() if is_adapter_param(k)}


def val_loss(model: torch.nn.Module, data_dir: Path) -> float:
    """Validation loss per response token over the prepared val split (as the training loops compute it)."""
    data = InstructionDataModule(data_dir, micro_batch_size=4)
    model.eval()
    with torch.no_grad():
        totals = [(loss_fn(model(x), y, "sum").item(), (y != -100).sum().item()) for x, y in data.val_dataloader()]
    return sum(t[0] for t in totals) / sum(t[1] for t in totals)


@pytest.fixture(scope="module")
def first_steps(assets, tmp_path_factory):
    """Two optimizer steps of micro-batches of 4, no accumulation."""
    recorder = Recorder()
    args = cli_args(assets, tmp_path_factory.mktemp("first_steps"), "--trainer.max_steps", "2",
                    "--model.train.global_batch_size", "4", "--model.train.micro_batch_size", "4",
                    "--model.train.warmup_steps", "3", "--trainer.enable_checkpointing", "false")
    return fit(args, recorder), recorder


def test_first_training_loss_is_the_base_models_loss(assets, first_steps):
    cli, recorder = first_steps
    base = load_model(assets[0]).eval()
    with torch.no_grad():
        base_losses = [loss_fn(base(input_ids), targets).item() for input_ids, targets in recorder.batches]
    # zero gates: the first step's loss is the base model's; after one step the adapter has moved
    assert recorder.losses[0] == pytest.approx(base_losses[0], abs=1e-6)
    assert abs(recorder.losses[1] - base_losses[1]) > 1e-6
    assert cli.trainer.global_step == 2
    model = cli.model.model
    gates = [block.attn.adapter_gate for block in model.blocks[model.config.adapter_start_layer:]]
    assert all(torch.count_nonzero(gate) > 0 for gate in gates), "the gates did not learn"


def test_optimizer_and_schedule_are_the_fabric_loops(first_steps):
    cli, _ = first_steps
    module, trainer = cli.model, cli.trainer
    args = module.train_args
    optimizer = trainer.optimizers[0]
    reference = build_optimizer(module.model, args)
    assert type(optimizer) is type(reference) is torch.optim.AdamW
    (group,), (ref_group,) = optimizer.param_groups, reference.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in ref_group["params"]}
    adapter_params = [p for n, p in module.model.named_parameters() if is_adapter_param(n)]
    assert {id(p) for p in group["params"]} == {id(p) for p in adapter_params}
    for key in ("betas", "eps", "weight_decay", "fused", "amsgrad"):
        assert group[key] == ref_group[key], key
    assert group["initial_lr"] == args.learning_rate

    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "step" and config.frequency == 1
    assert module.total_steps == 2
    ref_scheduler = build_scheduler(reference, args, module.total_steps)
    assert type(config.scheduler) is type(ref_scheduler)
    for step in range(6):
        assert config.scheduler.lr_lambdas[0](step) == ref_scheduler.lr_lambdas[0](step)
    assert config.scheduler.last_epoch == 2  # stepped once per optimizer step
    assert group["lr"] == pytest.approx(args.learning_rate * ref_scheduler.lr_lambdas[0](2))


def test_trainer_settings_follow_the_model_arguments(assets, tmp_path):
    cli = command_line(cli_args(assets, tmp_path, "--model.train.global_batch_size", "16",
                                   "--model.train.micro_batch_size", "2", "--model.eval.interval", "5",
                                   "--model.eval.max_batches", "3", "--model.train.max_steps", "7",
                                   "--trainer.precision", "bf16-true"))
    trainer = cli.trainer
    assert cli.datamodule.micro_batch_size == 2
    assert trainer.accumulate_grad_batches == 8
    assert trainer.val_check_interval == 5 * 8  # optimizer steps x micro-batches per step
    assert trainer.max_steps == 7 and trainer.limit_val_batches == 3
    assert isinstance(trainer.precision_plugin, TrainerFrozenHalfPrecision)

    epochs = command_line(cli_args(assets, tmp_path, "--model.train.epochs", "3")).trainer
    assert epochs.max_epochs == 3 and epochs.max_steps == -1


def test_user_errors_end_with_one_line_and_exit_code_1(assets, tmp_path, capsys):
    line = user_error(cli_args(assets, tmp_path, "--model.train.global_batch_size", "6",
                               "--model.train.micro_batch_size", "4"), capsys)
    assert line.startswith("error: train.global_batch_size (6) must be a multiple of train.micro_batch_size"), line
    line = user_error(cli_args(assets, tmp_path, "--model.checkpoint_dir", str(tmp_path / "absent")), capsys)
    assert "absent" in line, line
    line = user_error(cli_args(assets, tmp_path, "--trainer.precision", "16-mixed"), capsys)
    assert "bf16-true, bf16-mixed, 32-true" in line, line
    line = user_error(cli_args(assets, tmp_path, "--model.train.learning_rate", "-1"), capsys)
    assert line == "error: model.train.learning_rate must be positive", line


@pytest.mark.parametrize("subcommand", [[], ["fit"], ["validate"]], ids=["no subcommand", "fit", "validate"])
def test_help_explains_every_option(capsys, subcommand):
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", sys.argv[:1]):
        main([*subcommand, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1])[1:]
    assert len(options) > 60 and any(o.lstrip().startswith("--model.train.learning_rate") for o in options)
    undocumented = []
    for option in options:
        name, _, description = option.strip().partition(" ")
        description = re.sub(r"\(type: .*", "", description.split("\n\n")[0], flags=re.S)
        description = re.sub(r"^[A-Z_]+(, --\S+ [A-Z_]+)?", "", description.strip())  # the metavar
        if not re.search(r"[a-z]{3}", description):
            undocumented.append(name)
    assert not undocumented, f"options without help: {undocumented}"
    assert "fsdp is FSDP2" in text and "bf16-true" in text


def test_bf16_true_keeps_the_adapter_float32(assets, tmp_path):
    cli = fit(cli_args(assets, tmp_path, "--trainer.max_steps", "1", "--trainer.precision", "bf16-true",
                       "--model.train.global_batch_size", "4", "--model.train.micro_batch_size", "4",
                       "--trainer.enable_checkpointing", "false"))
    dtypes = {name: p.dtype for name, p in cli.model.model.named_parameters()}
    assert {d for n, d in dtypes.items() if is_adapter_param(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not is_adapter_param(n)} == {torch.bfloat16}
    assert {n for n, p in cli.model.model.named_parameters() if p.requires_grad} == \
        {n for n in dtypes if is_adapter_param(n)}


def test_resume_from_a_lightning_checkpoint_continues_exactly(assets, tmp_path, capsys):
    common = ("--trainer.max_steps", "4", "--model.train.global_batch_size", "4", "--model.train.micro_batch_size", "2",
              "--model.train.warmup_steps", "2", "--model.eval.interval", "2")
    straight = Recorder()
    full_run = fit(cli_args(assets, tmp_path / "straight", *common), straight)

    # an interrupted run: checkpoints after each optimizer step, gone after step 3; resumed from step 2
    first_part = Recorder(stop_at_step=3)
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="{step}", every_n_train_steps=1,
                                 save_top_k=-1)
    fit(cli_args(assets, tmp_path / "interrupted", *common), first_part, every_step)
    checkpoint = tmp_path / "checkpoints" / "step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    adapter_keys = {"model." + k for k in adapter_weights(full_run.model)}
    assert set(saved["state_dict"]) == adapter_keys  # the frozen base is not written
    assert saved["model_config"]["name"] == "stories260K"

    rest = Recorder()
    resumed = fit(cli_args(assets, tmp_path / "resumed", *common), rest, ckpt_path=checkpoint)
    assert resumed.trainer.global_step == 4
    assert len(straight.batches) == 8 and len(rest.batches) == 4
    for a, b in zip(straight.batches[4:], rest.batches):
        assert torch.equal(a[0], b[0])  # the data continue where the checkpoint left them
    for name, weight in adapter_weights(full_run.model).items():
        torch.testing.assert_close(adapter_weights(resumed.model)[name], weight, rtol=0, atol=1e-6)

    # refused, not silently half-loaded: a checkpoint whose adapter does not fit, and another data layout
    del saved["state_dict"]["model.blocks.4.attn.adapter_gate"]
    torch.save(saved, tmp_path / "broken.ckpt")
    assert "missing ['model.blocks.4.attn.adapter_gate']" in user_error(
        cli_args(assets, tmp_path / "refused", *common, "--ckpt_path", str(tmp_path / "broken.ckpt")), capsys)
    assert "resume with the same" in user_error(
        cli_args(assets, tmp_path / "refused", *common, "--model.train.micro_batch_size", "4",
                 "--ckpt_path", str(checkpoint)), capsys)


def user_error(args: list[str], capsys) -> str:
    """The one line that finetune/adapter_trainer.py prints for a user error (it exits with code 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", sys.argv[:1]):
        main(args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any("Traceback" in line for line in lines), lines
    return lines[-1]


def run_main(args: list[str], capsys) -> str:
    """What finetune/adapter_trainer.py prints (stdout), run in this process."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(args)
    return capsys.readouterr().out


def printed_val_loss(output: str) -> float:
    """The last validation loss that a run printed."""
    return float(re.findall(r"val loss (\d+\.\d+)\n", output)[-1])


def test_fit_and_validate_subcommands(assets, tmp_path, capsys):
    """fit trains and writes the adapter (as the same arguments without a subcommand do); validate prints the loss
    of the fit's last evaluation for its checkpoint, and the base model's loss without one."""
    checkpoint_dir, data_dir = assets
    common = ("--model.train.global_batch_size", "4", "--model.train.micro_batch_size", "4",
              "--model.train.learning_rate", "5e-2", "--model.train.warmup_steps", "1",
              "--model.eval.max_batches", "100")  # all val batches
    fitted = run_main(["fit", *cli_args(assets, tmp_path / "fit", *common, "--trainer.max_steps", "2")], capsys)
    assert "step 2: val loss" in fitted, fitted
    adapter = load_file(tmp_path / "fit" / ADAPTER_FILE)
    run_main(cli_args(assets, tmp_path / "plain", *common, "--trainer.max_steps", "2",
                      "--trainer.enable_checkpointing", "false"), capsys)
    plain = load_file(tmp_path / "plain" / ADAPTER_FILE)
    assert plain.keys() == adapter.keys()
    for name, weight in adapter.items():
        torch.testing.assert_close(plain[name], weight)

    validated = run_main(["validate", *cli_args(assets, tmp_path / "fit", *common, "--ckpt_path", "last")], capsys)
    assert "\nval loss " in validated, validated  # no step: validate does not train
    trained = load_model(checkpoint_dir, adapter=True)
    load_adapter(trained, tmp_path / "fit" / ADAPTER_FILE)
    assert printed_val_loss(validated) == printed_val_loss(fitted) == pytest.approx(val_loss(trained, data_dir),
                                                                                    abs=1e-4)
    # the run's own options come from its checkpoint: --ckpt_path and where to find it suffice
    alone = run_main(["validate", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "fit"),
                      "--trainer.logger", "false", *QUIET], capsys)
    assert printed_val_loss(alone) == printed_val_loss(validated)
    base = run_main(["validate", *cli_args(assets, tmp_path / "base", *common)], capsys)
    base_loss = val_loss(load_model(checkpoint_dir), data_dir)
    assert printed_val_loss(base) == pytest.approx(base_loss, abs=1e-4)
    print(f"val loss: base {base_loss:.4f}, fit's last evaluation {printed_val_loss(fitted):.4f}")
    assert base_loss - printed_val_loss(validated) > 0.05, "the trained adapter was not validated"


def test_a_quantized_base_trains_on_the_trainer_route(assets, tmp_path, capsys):
    checkpoint_dir, data_dir = assets
    fitted = run_main(["fit", *cli_args(assets, tmp_path, "--model.quantized_base", "nf4-base", "--trainer.max_steps",
                                        "2", "--model.train.global_batch_size", "4", "--model.train.micro_batch_size",
                                        "4", "--model.eval.max_batches", "100", "--model.train.learning_rate", "5e-2",
                                        "--model.train.warmup_steps", "1")], capsys)
    models = {name: load_model(checkpoint_dir, adapter=True, quantize=PRECISIONS[name].quantize)
              for name in ("nf4-base", "32-true")}
    for model in models.values():
        load_adapter(model, tmp_path / ADAPTER_FILE)
    assert printed_val_loss(fitted) == pytest.approx(val_loss(models["nf4-base"], data_dir), abs=1e-4)
    assert printed_val_loss(fitted) != pytest.approx(val_loss(models["32-true"], data_dir), abs=1e-4)


def test_trainer_script_learns_an_adapter_that_generation_loads(assets, tmp_path, capfd):
    checkpoint_dir, data_dir = assets
    out = tmp_path / "out"
    args = cli_args(assets, tmp_path, "--model.out_dir", str(out), "--trainer.max_steps", "30",
                    "--model.train.global_batch_size", "8", "--model.train.micro_batch_size", "8",
                    "--model.train.learning_rate", "3e-2", "--model.train.warmup_steps", "4",
                    "--model.eval.interval", "15", "--trainer.enable_checkpointing", "false")
    # the script's command line in this process: its own processes run in the FSDP test below and in
    # tests/test_bad_inputs.py
    result = run_script_in_this_process("finetune/adapter_trainer.py", *args, capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 15: val loss" in result.stdout and "step 30: val loss" in result.stdout
    adapter_path = out / ADAPTER_FILE
    assert adapter_name(adapter_path) == tmp_path.name  # named after --trainer.default_root_dir

    base_loss = val_loss(load_model(checkpoint_dir), data_dir)
    trained = load_model(checkpoint_dir, adapter=True)
    load_adapter(trained, adapter_path)
    trained_loss = val_loss(trained, data_dir)
    print(f"val loss: base {base_loss:.4f}, after 30 steps {trained_loss:.4f}")
    assert trained_loss < base_loss - 0.2, (base_loss, trained_loss)

    zero_gates = tmp_path / "zero_gates.safetensors"
    fresh = load_model(checkpoint_dir, adapter=True)
    save_adapter(zero_gates, fresh, fresh.config)

    def answer(path: Path) -> str:
        run = run_script_in_this_process("generate/adapter.py", "--checkpoint_dir", str(checkpoint_dir),
                                         "--adapter_path", str(path), "--prompt", "Give three tips for staying healthy.",
                                         "--temperature", "0", "--max_new_tokens", "30", capfd=capfd)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    trained_answer, base_answer = answer(adapter_path), answer(zero_gates)
    assert trained_answer and base_answer
    assert trained_answer != base_answer


def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes(assets, tmp_path):
    # warm-up through all 4 steps: the learning rates do not depend on the planned number of steps
    common = ("--model.train.global_batch_size", "8", "--model.train.micro_batch_size", "4",
              "--model.train.warmup_steps", "4", "--model.eval.interval", "2")
    fsdp = ("--trainer.strategy", "fsdp", "--trainer.devices", "2")

    def run_script(*args: str) -> None:
        result = subprocess.run([sys.executable, str(TRAINER_SCRIPT), *cli_args(assets, *args)],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "distributed_backend=gloo" in result.stderr + result.stdout

    # two steps, then two more from the checkpoint written at the second (FSDP2 gathers it to rank 0)
    run_script(tmp_path / "first", *common, *fsdp, "--trainer.max_steps", "2")
    (checkpoint,) = (tmp_path / "first" / "checkpoints").glob("*step=2.ckpt")
    assert set(torch.load(checkpoint, weights_only=True)["state_dict"]) == {
        "model." + k for k in load_file(tmp_path / "first" / ADAPTER_FILE)}
    run_script(tmp_path / "second", *common, *fsdp, "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint))
    fsdp_adapter = load_file(tmp_path / "second" / ADAPTER_FILE)

    # one process accumulating two micro-batches sees the same batches per step as two ranks taking one each
    single = fit(cli_args(assets, tmp_path / "single", *common, "--trainer.max_steps", "4",
                          "--trainer.enable_checkpointing", "false"))
    assert single.trainer.accumulate_grad_batches == 2
    single_adapter = load_file(tmp_path / "single" / ADAPTER_FILE)
    assert fsdp_adapter.keys() == single_adapter.keys()
    for name, weight in single_adapter.items():
        torch.testing.assert_close(fsdp_adapter[name], weight, rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(v) for k, v in fsdp_adapter.items() if k.endswith("adapter_gate"))


@pytest.mark.parametrize("devices, accelerator, expected", [(2, "cpu", 2), ("3", "cpu", 3), ([0, 1], "gpu", 2),
                                                            ("0,1,", "gpu", 2), ("auto", "cpu", 1)])
def test_requested_devices(devices, accelerator, expected):
    assert requested_devices(devices, accelerator) == expected


def test_a_trainer_checkpoint_is_extracted_and_resumed_as_last_with_a_new_learning_rate(assets, tmp_path, capsys):
    """generate/adapter.py sends a .ckpt to scripts/extract_adapter.py, which converts it; --ckpt_path last finds the
    newest checkpoint of the root directory and says what continues and what changed."""
    common = ("--model.train.global_batch_size", "4", "--model.train.micro_batch_size", "4",
              "--model.train.learning_rate", "0.05")
    first = fit(cli_args(assets, tmp_path, *common, "--trainer.max_steps", "1"))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    extract = runpy.run_path(str(ROOT / "scripts" / "extract_adapter.py"))["extract_adapter"]
    extract(ckpt, tmp_path / "extracted.safetensors")
    extracted = load_file(tmp_path / "extracted.safetensors")
    assert extracted.keys() == adapter_weights(first.model).keys()
    for name, weight in adapter_weights(first.model).items():
        torch.testing.assert_close(extracted[name], weight, rtol=0, atol=0)
    assert adapter_prompt_style(tmp_path / "extracted.safetensors") == "alpaca"
    fingerprint = read_safetensors_metadata(tmp_path / "extracted.safetensors")["base_fingerprint"]
    assert json.loads(fingerprint) == open_checkpoint(assets[0]).fingerprint
    with mock.patch.object(AdapterModule, "prompt_style", "chat"):  # as a run on chat data records it
        first.trainer.save_checkpoint(tmp_path / "chat.ckpt")
    extract(tmp_path / "chat.ckpt", tmp_path / "chat.safetensors")
    assert adapter_prompt_style(tmp_path / "chat.safetensors") == "chat"

    capsys.readouterr()
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(cli_args(assets, tmp_path, *common, "--trainer.max_steps", "2", "--model.train.learning_rate", "0.01",
                      "--ckpt_path", "last"))
    output = capsys.readouterr().out
    assert (f"Resumed from {ckpt} at step 1: adapter, optimizer moments, schedule position, data position and random "
            "state continue; changed from now on: learning_rate 0.05 -> 0.01") in output, output


def test_both_routes_log_at_the_steps_the_console_names_and_a_resumed_run_continues_its_log(assets, tmp_path, capsys):
    checkpoint_dir, data_dir = assets
    common = {"train.global_batch_size": 4, "train.micro_batch_size": 4, "train.warmup_steps": 1, "eval.interval": 2,
              "eval.max_batches": 1, "eval.max_new_tokens": 2}
    fabric_out, trainer_root = tmp_path / "fabric", tmp_path / "trainer"
    run_cli(training.main, fabric_args({"checkpoint_dir": checkpoint_dir, "data_dir": data_dir, "out_dir": fabric_out,
                                        "accelerator": "cpu", "train.max_steps": 2, "save_interval": 2, **common}))
    run_cli(training.main, fabric_args({"checkpoint_dir": checkpoint_dir, "data_dir": data_dir, "out_dir": fabric_out,
                                        "accelerator": "cpu", "train.max_steps": 4, "resume": "auto", **common}))
    run_main(["fit", *cli_args(assets, trainer_root, "--trainer.max_steps", "4", "--trainer.logger", "true",
                               *[item for key, value in common.items() for item in (f"--model.{key}", str(value))])],
             capsys)
    assert sorted(p.name for p in (fabric_out / "logs").iterdir()) == ["version_0"]  # the resumed run's log too
    for out in (fabric_out, trainer_root):
        assert list(logged(out, "val_loss")) == [0, 2, 4], out
        for metric in ("train_loss", "learning_rate", "tokens_per_s", "padding_fraction", "epoch", "compiled_graphs"):
            assert list(logged(out, metric)) == [1, 2, 3, 4], (out, metric)
        assert not logged(out, "hp_metric")
