"""Fine-tuning the adapter: hyperparameters, loss, optimizer and schedule, training states, the Fabric loop.

``finetune/adapter.py`` runs ``main`` below; the LightningModule in ``lightning.py`` reuses the same loss,
optimizer, schedule and adapter files, so no training logic exists twice.
"""

import fcntl
import math
import re
import shutil
import signal
import sys
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lit_adapter.adapter import is_adapter_param, mark_only_adapter_trainable, num_trainable_params
from lit_adapter.checkpoint import (atomic_path, check_can_create, check_tokenizer_fits, load_config, load_model,
                                   preview_keys, save_adapter, torch_load)
from lit_adapter.cli import process_rank
from lit_adapter.config import Config, read_yaml_mapping
from lit_adapter.data import IGNORE_INDEX, AlpacaDataModule, padding_fraction
from lit_adapter.errors import UserError
from lit_adapter.generation import generate
from lit_adapter.model import GPT
from lit_adapter.prompts import PromptStyle, encode_prompt, user_message
from lit_adapter.strategies import (Precision, StrategyName, base_dtype, fabric_precision, fabric_strategy,
                                    quantize_base)
from lit_adapter.tokenizer import Tokenizer

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
HPARAMS_FILE = "hyperparameters.yaml"
STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass
class TrainArgs:
    """Optimisation hyperparameters."""

    learning_rate: float = 9e-3
    """Peak learning rate of AdamW."""
    global_batch_size: int = 64
    """Samples per optimizer step, over all devices (micro batches are accumulated to reach it)."""
    micro_batch_size: Optional[int] = 4
    """Most samples per forward/backward pass on one device (None: no limit, with micro_batch_tokens)."""
    micro_batch_tokens: Optional[int] = None
    """Most padded tokens per forward/backward pass on one device: length-grouped micro-batches are filled up to it,
    so short samples make large micro-batches (None: micro_batch_size alone sets them)."""
    epochs: int = 5
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; overrides epochs."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up before the cosine decay."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.02
    """AdamW's decoupled weight decay of the adapter's prompts and gates."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the adapter's gradient norm to this (None: no clipping)."""
    log_interval: int = 1
    """Log training metrics every this many optimizer steps."""


@dataclass
class AdapterArgs:
    """The adapter's shape (recorded in the adapter file)."""

    prompt_length: Optional[int] = None
    """Learnable prompt vectors per adapted layer. Default: the base's model_config.yaml (conversion: the paper's 10)."""
    start_layer: Optional[int] = None
    """First adapted layer; the layers from it to the top get prompts. Default: the base's model_config.yaml, which
    conversion sets to the paper's share (the top 30 of 32 layers) scaled to the model's depth."""

    def apply(self, config: Config) -> Config:
        """``config`` with this adapter shape; a shape that does not fit the model is refused."""
        if self.prompt_length is not None and self.prompt_length < 1:
            raise UserError(f"--adapter.prompt_length must be at least 1, got {self.prompt_length}")
        if self.start_layer is not None and not 0 <= self.start_layer < config.n_layer:
            raise UserError(f"--adapter.start_layer must lie in [0, {config.n_layer - 1}] for this "
                            f"{config.n_layer}-layer model, got {self.start_layer}")
        return config.with_adapter(self.prompt_length, self.start_layer)


@dataclass
class EvalArgs:
    """Validation during training."""

    interval: int = 100
    """Validate every this many optimizer steps (and at the end)."""
    max_batches: int = 100
    """Most validation micro batches per evaluation."""
    max_new_tokens: int = 100
    """Length of the sample response generated at each evaluation."""
    instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    """The fixed instruction whose greedy response is shown at each evaluation."""


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy over the positions whose target is not ``IGNORE_INDEX``: their mean, or "sum"."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable (adapter) parameters, fused on GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(0.9, 0.95), fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` optimizer steps, then half a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = args.min_lr / args.learning_rate if args.learning_rate else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup_steps, total_steps, min_ratio))


def check_train_args(args: TrainArgs, prefix: str = "train.") -> None:
    """Refuse hyperparameters that cannot train (``prefix`` names them as on the command line)."""
    problems = [f"{name} must be {rule}" for name, bad, rule in (
        ("learning_rate", not 0 < args.learning_rate < math.inf, "positive"),
        ("min_lr", not 0 <= args.min_lr <= max(args.learning_rate, 0), "in [0, learning_rate]"),
        ("weight_decay", not 0 <= args.weight_decay < math.inf, "zero or positive"),
        ("max_grad_norm", args.max_grad_norm is not None and not 0 < args.max_grad_norm < math.inf,
         "positive (or null: no clipping)"),
        ("epochs", args.epochs < 1, "at least 1"),
        ("max_steps", args.max_steps is not None and args.max_steps < 1, "at least 1 (or null: use epochs)"),
        ("warmup_steps", args.warmup_steps < 0, "zero or positive"),
        ("log_interval", args.log_interval < 1, "at least 1")) if bad]
    if problems:
        raise UserError(f"{prefix}{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def accumulation_steps(args: TrainArgs, devices: int) -> int:
    """Check the batch sizes; return the micro-batches per optimizer step on each device that a fixed
    micro_batch_size gives (global batch / (micro batch x devices); with micro_batch_tokens they vary: 0)."""
    if args.micro_batch_tokens is not None:
        if args.micro_batch_tokens < 1 or (args.micro_batch_size or 1) < 1 or args.global_batch_size < 1:
            raise UserError("train.micro_batch_tokens, train.micro_batch_size and train.global_batch_size must be "
                            "at least 1")
        if devices < 1 or args.global_batch_size % devices:
            raise UserError(f"train.global_batch_size ({args.global_batch_size}) must be a multiple of devices ({devices})")
        return 0
    if args.micro_batch_size is None:
        raise UserError("set train.micro_batch_size or train.micro_batch_tokens")
    per_step = args.micro_batch_size * devices
    if args.micro_batch_size < 1 or args.global_batch_size < 1 or devices < 1:
        raise UserError("train.micro_batch_size, train.global_batch_size and devices must be at least 1")
    if args.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size ({args.global_batch_size}) must be a multiple of "
                        f"train.micro_batch_size x devices ({args.micro_batch_size} x {devices} = {per_step})")
    return args.global_batch_size // per_step


def planned_steps(args: TrainArgs, train_samples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else as many as ``epochs`` passes over the data take."""
    return args.max_steps or math.ceil(args.epochs * train_samples / args.global_batch_size)


# ---------------------------------------------------------------------------------------------- training states


def adapter_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) adapter weights and optimizer state, whatever the strategy."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, progress: dict, config: Config, hparams: dict, is_rank_zero: bool,
                        prompt_style: PromptStyle) -> None:
    """Write ``adapter.safetensors``, ``hyperparameters.yaml`` and last ``training_state.pt`` (each atomically)."""
    adapter, optimizer_state = adapter_and_optimizer_state(model, optimizer)
    if not is_rank_zero:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(directory / ADAPTER_FILE, model, config, prompt_style, state_dict=adapter)
    save_hparams(directory, hparams)
    state = {
        "adapter": adapter,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "model_config": asdict(config),
        "prompt_style": prompt_style,
    }
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(state, tmp)


def save_hparams(directory: Path, hparams: dict) -> None:
    with atomic_path(directory / HPARAMS_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(hparams, sort_keys=False))


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        data_layout: dict) -> dict:
    """Restore adapter, optimizer, scheduler and RNG from a training state file; return its progress.

    The state's data position counts optimizer steps, so it only means the same with the same ``data_layout``
    (global batch size, seed); another one is refused. Devices and micro-batches may change.
    """
    state = read_training_state(path)
    saved_layout = {key: state["progress"].get(key) for key in data_layout}
    if saved_layout != data_layout:
        raise UserError(f"{path} was written with {saved_layout}, but this run has {data_layout}: resume with "
                        "the same --train.global_batch_size and --seed")
    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in the state
    try:
        keys = set_model_state_dict(model, state["adapter"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} does not fit this model and optimizer: {str(err).splitlines()[0]}") from None
    missing = [key for key in keys.missing_keys if is_adapter_param(key)]
    if missing or keys.unexpected_keys:
        raise UserError(f"{path} does not fit this model's adapter: missing {missing[:3]}, "
                        f"unexpected {keys.unexpected_keys[:3]}")
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


STATE_KEYS = {"adapter", "optimizer", "scheduler", "progress", "rng", "model_config"}


def read_training_state(path: Path) -> dict:
    """A training state of finetune/adapter.py; any other file is refused in one line."""
    state = torch_load(path)
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        missing = sorted(STATE_KEYS - state.keys()) if isinstance(state, dict) else "a dict of its parts"
        raise UserError(f"{path} is not a training state of finetune/adapter.py (it lacks {missing})")
    return state


def adopt_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, train: TrainArgs) -> list[str]:
    """Make a resumed optimizer and schedule use this run's learning rate and weight decay; list what changed.

    The schedule keeps its position: the learning rate goes on along this run's warm-up and cosine curve.
    """
    old = {"learning_rate": scheduler.base_lrs[0], "weight_decay": optimizer.param_groups[0]["weight_decay"]}
    new = {"learning_rate": train.learning_rate, "weight_decay": train.weight_decay}
    scheduler.base_lrs = [train.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=train.learning_rate, lr=train.learning_rate * factor(scheduler.last_epoch),
                     weight_decay=train.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [f"{key} {old[key]:g} -> {new[key]:g}" for key in old if old[key] != new[key]]


def resumed_message(path: Path, step: int, changes: list[str]) -> str:
    """What a resumed run continues, and which hyperparameters it changes."""
    changed = f"; changed from now on: {', '.join(changes)}" if changes else ""
    return (f"Resumed from {path} at step {step}: adapter, optimizer moments, schedule position, data position and "
            f"random state continue{changed}")


def find_resume_state(resume: Union[bool, str, Path, None], out_dir: Path) -> Optional[Path]:
    """The training state to resume from: a file or step directory, or with "auto" the latest in ``out_dir``."""
    if resume in (None, False):
        return None
    if resume in ("auto", True):
        steps = sorted((int(m.group(1)), p) for p in out_dir.glob("step-*")
                       if (m := STEP_DIR.search(p.name)) and (p / STATE_FILE).is_file())
        return steps[-1][1] / STATE_FILE if steps else None
    path = Path(resume)
    path = path / STATE_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {resume}: no training state found at {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"--resume {resume}: {path} is not a training state (pass a step-NNNNNN directory of "
                        "finetune/adapter.py or its training_state.pt)")
    return path


# ---------------------------------------------------------------------------------------------- one run per folder

RUN_LOCK = ".run.lock"


@contextmanager
def claim_out_dir(out_dir: Path, state_path: Optional[Path]) -> Iterator[Optional[str]]:
    """Hold ``out_dir`` for this run; yield the run id that its states record (in the hyperparameters beside them).

    A second live run in the folder is refused (an ``flock`` that ends with the process, even when killed), and
    so is mixing runs: a fresh run needs a folder without training states, a resumed one a folder whose states
    are all of the run it resumes. Only the first process of a multi-process run claims the folder.
    """
    if process_rank() != 0:
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / RUN_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing to {out_dir} now: wait for it to end, or choose another "
                            "--out_dir") from None
        yield check_one_run(out_dir, state_path)


def check_one_run(out_dir: Path, state_path: Optional[Path]) -> str:
    """The run id of this run: new, or that of the resumed state; refuse states of another run in ``out_dir``."""
    runs = {p.name: run_id_of(p) for p in sorted(out_dir.glob("step-*")) if (p / STATE_FILE).is_file()}
    if state_path is None:
        if runs:
            raise UserError(f"{out_dir} already holds the training states of a run (up to {max(runs)}): continue "
                            "it with --resume auto, or choose another --out_dir")
        return uuid.uuid4().hex
    run_id = run_id_of(state_path.parent)
    others = sorted(name for name, other in runs.items() if other != run_id)
    if others:
        raise UserError(f"{out_dir} holds training states of another run than {state_path} ({preview_keys(others)}): "
                        "resume into that run's own --out_dir, or choose an empty one")
    return run_id


def run_id_of(step_dir: Path) -> Optional[str]:
    """The run id recorded beside a training state (None for states of older versions)."""
    path = step_dir / HPARAMS_FILE
    return read_yaml_mapping(path).get("run_id") if path.is_file() else None


# ---------------------------------------------------------------------------------------------- the Fabric loop


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag that the loop checks after each optimizer step (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def sample_response(model: GPT, tokenizer: Tokenizer, instruction: str, max_new_tokens: int,
                    style: PromptStyle = "alpaca") -> str:
    """The model's greedy answer to ``instruction`` in prompt ``style`` (the KV cache is freed after).

    It runs eagerly even when the blocks are compiled for training: a short sample is not worth new graphs, and
    they would use up the compiler's recompilation budget that varying training lengths need.
    """
    prompt = encode_prompt(style, tokenizer, [user_message(instruction)])
    max_new_tokens = min(max_new_tokens, model.config.block_size - prompt.numel())
    if max_new_tokens < 1:
        return ""
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + max_new_tokens)
    try:
        with torch.compiler.set_stance("force_eager"):
            ids = list(generate(model, prompt, max_new_tokens, temperature=0, stop_ids=tokenizer.stop_ids))
    finally:
        model.clear_kv_cache()
    return tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])


@torch.no_grad()
def validate(fabric: Any, model: nn.Module, loader: Any, max_batches: int) -> float:
    """Mean loss per response token over at most ``max_batches`` micro-batches on each rank, all ranks together."""
    model.eval()
    totals = torch.zeros(2, device=fabric.device)
    for i, (input_ids, targets) in enumerate(loader):
        if i >= max_batches:
            break
        input_ids, targets = fabric.to_device((input_ids, targets))
        totals += torch.stack([loss_fn(model(input_ids), targets, "sum"), (targets != IGNORE_INDEX).sum().float()])
    model.train()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    return (totals[0] / totals[1]).item()


def accumulate_gradients(fabric: Any, model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         step_tokens: int, train_loss_fn: Callable = loss_fn) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one optimizer step; return this rank's part of the
    step loss (not synchronised).

    The step loss is the sum of the per-token losses over all micro-batches of all ranks divided by the step's
    response tokens ``step_tokens``, whatever the micro-batches and devices. DDP and FSDP average the gradients over
    the ranks, so each rank's backward is scaled up by the world size.
    """
    part = torch.zeros((), device=fabric.device)
    for i, (input_ids, targets) in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            loss = train_loss_fn(model(input_ids), targets, "sum") / step_tokens
            fabric.backward(loss * fabric.world_size)
        part += loss.detach()
    return part


def apply_gradients(fabric: Any, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float]) -> None:
    """Clip the accumulated gradients, take the optimizer step and clear them."""
    if max_grad_norm is not None:  # no finiteness check here: it would wait for the device (the loss is checked)
        fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm, error_if_nonfinite=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compile_for_training(model: GPT) -> Callable:
    """Compile every block and the loss; return the compiled loss function.

    The compiled loss reads the bf16 logits and upcasts inside its kernel, so no float32 copy of the logits
    is ever stored.
    """
    for block in model.blocks:
        block.compile()
    return torch.compile(loss_fn)


def prepare_for_training(model: GPT, compile: bool, activation_checkpointing: bool) -> Callable:
    """Freeze all but the adapter, set activation checkpointing, compile if asked; return the loss to train with."""
    mark_only_adapter_trainable(model)
    model.activation_checkpointing = activation_checkpointing
    return compile_for_training(model) if compile else loss_fn


def setup_training(fabric: Any, model: GPT, train: TrainArgs, compile: bool,
                   activation_checkpointing: bool) -> tuple[nn.Module, torch.optim.Optimizer, Callable]:
    """``prepare_for_training``, then hand model and optimizer to Fabric; also return the loss."""
    train_loss_fn = prepare_for_training(model, compile, activation_checkpointing)
    wrapped = fabric.setup_module(model)
    return wrapped, fabric.setup_optimizers(build_optimizer(wrapped, train)), train_loss_fn


def fit(fabric: Any, model: nn.Module, raw_model: GPT, optimizer: torch.optim.Optimizer, scheduler: Any,
        data: AlpacaDataModule, tokenizer: Tokenizer, train: TrainArgs, eval: EvalArgs, out_dir: Path,
        save_interval: int, hparams: dict, progress: dict, total_steps: int,
        train_loss_fn: Callable = loss_fn) -> None:
    """Run optimizer steps until ``total_steps`` are done, a stop is requested, or the loss diverges."""
    val_loader = data.val_dataloader()
    stop = StopRequest()
    loader = data.train_steps(progress["step"])
    stream, plan = iter(loader), loader.sampler.plan
    bar = tqdm(total=total_steps, initial=progress["step"], desc="fine-tuning", unit="step",
               disable=not fabric.is_global_zero, dynamic_ncols=True)

    def save(directory: Path) -> None:
        save_training_state(directory, raw_model, optimizer, scheduler, progress, raw_model.config, hparams,
                            fabric.is_global_zero, data.prompt_style)
        fabric.barrier()

    if progress["step"] == 0:  # the base model's figures (the gates start at zero), for the curve to start from
        evaluate(fabric, model, raw_model, val_loader, tokenizer, eval, data.prompt_style, 0)
    tokens, started = 0, time.perf_counter()
    try:
        while progress["step"] < total_steps:
            batches, step_tokens = next(stream)
            micro_batches = fabric.to_device(batches)
            loss = accumulate_gradients(fabric, model, micro_batches, step_tokens, train_loss_fn)
            tokens += sum(input_ids.numel() for input_ids, _ in micro_batches)
            step = progress["step"] + 1
            epoch = plan.epoch_of(step - 1)
            train_loss = fabric.all_reduce(loss, reduce_op="sum").item()
            if not math.isfinite(train_loss):  # before the step, so the weights stay those of the last good step
                raise UserError(diverged_message(train_loss, step, out_dir))
            apply_gradients(fabric, model, optimizer, train.max_grad_norm)
            scheduler.step()
            progress.update(step=step)
            if step % train.log_interval == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                metrics = {"train_loss": train_loss, "learning_rate": scheduler.get_last_lr()[0],
                           "tokens_per_s": tokens * fabric.world_size / elapsed,
                           "padding_fraction": padding_fraction(batches), "epoch": epoch}
                fabric.log_dict(metrics, step=step)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", epoch=epoch)
                tokens, started = 0, time.perf_counter()
            bar.update(1)
            if step % eval.interval == 0 or step == total_steps:
                evaluate(fabric, model, raw_model, val_loader, tokenizer, eval, data.prompt_style, step)
            if step < total_steps:
                stopping = fabric.strategy.reduce_boolean_decision(stop.requested, all=False)
                if stopping or step % save_interval == 0:
                    save(out_dir / f"step-{step:06d}")
                if stopping:  # not a success: `finetune && generate` must not go on with an older adapter
                    fabric.print(f"\nStopped at step {step}; resume with --resume auto (state in {out_dir}/step-{step:06d})")
                    sys.exit(stop.exit_status)
        final_dir = out_dir / f"step-{progress['step']:06d}"
        save(final_dir)
        if fabric.is_global_zero:
            for name in (ADAPTER_FILE, HPARAMS_FILE):
                with atomic_path(out_dir / name) as tmp:
                    shutil.copyfile(final_dir / name, tmp)
        fabric.print(f"\nSaved the adapter to {out_dir / ADAPTER_FILE}")
    finally:
        bar.close()
        stop.restore()
        for logger in fabric.loggers:  # Fabric does not close them: flush the logged metrics to disk now
            logger.finalize("finished")


def diverged_message(loss: float, step: int, out_dir: Path) -> str:
    """What went wrong at ``step``, and from which saved state to go on."""
    last = find_resume_state("auto", out_dir)
    kept = f"the last saved state is kept in {last.parent}" if last else f"no state was saved in {out_dir} yet"
    return (f"the training loss is {loss} at step {step}; stopped before applying it ({kept}). "
            "Try a lower --train.learning_rate or --train.max_grad_norm")


def evaluate(fabric: Any, model: nn.Module, raw_model: GPT, val_loader: Any, tokenizer: Tokenizer,
             eval: EvalArgs, style: PromptStyle, step: int) -> None:
    """Log the validation loss and print the greedy response to the fixed instruction."""
    val_loss = validate(fabric, model, val_loader, eval.max_batches)
    fabric.log_dict({"val_loss": val_loss}, step=step)
    raw_model.eval()
    response = sample_response(raw_model, tokenizer, eval.instruction, eval.max_new_tokens, style)
    raw_model.train()
    fabric.print(f"\nstep {step}: val loss {val_loss:.4f}\n{eval.instruction}\n> {response}")


def main(checkpoint_dir: Path = Path("checkpoints/stories260K"), data_dir: Path = Path("data/alpaca"),
         out_dir: Path = Path("out/adapter/alpaca"), accelerator: str = "auto", devices: int = 1,
         strategy: StrategyName = "auto", precision: Optional[Precision] = None,
         resume: Union[bool, Literal["auto"], Path] = False, save_interval: int = 1000, seed: int = 1337,
         compile: Optional[bool] = None, activation_checkpointing: bool = False,
         adapter: AdapterArgs = AdapterArgs(), train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs()) -> None:
    """Fine-tune a LLaMA-Adapter on prepared Alpaca data with Lightning Fabric.

    Args:
        checkpoint_dir: Converted base model (scripts/convert_checkpoint.py).
        data_dir: Prepared data (scripts/prepare_alpaca.py): train.pt, val.pt, prep_config.yaml.
        out_dir: Where adapters, training states (step-NNNNNN/) and TensorBoard logs (logs/) go.
        accelerator: "cpu", "cuda" or "auto".
        devices: Devices (processes) to train on.
        strategy: "auto" (one device, or DDP for several), "ddp", or "fsdp" (FSDP2: blocks sharded, adapter gathered to save).
        precision: "bf16-true" (base in bf16, adapter and optimizer in float32), "bf16-mixed", "32-true", or
            "fp8-base" (bf16-true with the blocks' linear weights in float8 and FP8 matmuls; Hopper GPUs, not fsdp).
            Default: bf16-true on GPUs that support it, else 32-true.
        resume: Continue from a training state: a step-NNNNNN directory or its training_state.pt, or "auto" for the
            latest one in out_dir (starts fresh if there is none). The adapter, optimizer moments, schedule position,
            data position and random state continue; train.learning_rate, weight_decay, the schedule's shape,
            clipping, evaluation and saving may change (what changed is printed); devices, micro_batch_size and
            seed may not. An out_dir holds one run: a fresh run needs one without training states.
        save_interval: Save the adapter and a resumable training state every this many optimizer steps (and at the end).
        seed: Random seed (data order and adapter initialisation).
        compile: Compile each transformer block with torch.compile (default: on GPU).
        activation_checkpointing: Recompute each block's activations in the backward pass (less memory, slower).
        adapter: The adapter's shape: prompt vectors per layer and the first adapted layer.
        train: Optimisation hyperparameters.
        eval: Validation settings.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    if save_interval < 1 or eval.interval < 1 or eval.max_batches < 1:
        raise UserError("save_interval, eval.interval and eval.max_batches must be at least 1")
    check_train_args(train)
    accumulation_steps(train, devices)
    if precision == "fp8-base" and strategy == "fsdp":
        raise UserError("--precision fp8-base does not shard: use --strategy auto or ddp (the FP8 7B base fits a GPU)")
    check_can_create(out_dir, "--out_dir")
    precision = precision or ("bf16-true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true")
    hparams = {k: (asdict(v) if isinstance(v, (AdapterArgs, TrainArgs, EvalArgs)) else str(v) if isinstance(v, Path) else v)
               for k, v in locals().items() if k not in ("Fabric", "TensorBoardLogger")}
    config = adapter.apply(load_config(checkpoint_dir))  # a shape that does not fit fails before any loading
    state_path = find_resume_state(resume, out_dir)  # a wrong --resume fails before anything is loaded
    # lengths rounded to multiples of 8: tensor-core friendly, and few distinct shapes for the compiler
    data = AlpacaDataModule(data_dir, train.global_batch_size, train.micro_batch_size, train.micro_batch_tokens,
                            seed=seed, pad_to_multiple_of=8)
    data.setup()
    check_enough_samples(data, train.global_batch_size, "--train.global_batch_size")

    with claim_out_dir(out_dir, state_path) as run_id:
        hparams["run_id"] = run_id
        try:
            fabric = Fabric(accelerator=accelerator, devices=devices, strategy=fabric_strategy(strategy, devices),
                            loggers=TensorBoardLogger(root_dir=out_dir, name="logs"), **fabric_precision(precision))
        except (RuntimeError, ValueError, MisconfigurationException) as err:  # e.g. no GPU, or fewer than --devices
            raise UserError(f"cannot run with --accelerator {accelerator} --devices {devices} --strategy {strategy} "
                            f"--precision {precision}: {str(err).strip().splitlines()[0]}") from None
        fabric.launch()
        fabric.seed_everything(seed)
        compile = fabric.device.type == "cuda" if compile is None else compile

        tokenizer = Tokenizer(checkpoint_dir)
        check_tokenizer_fits(tokenizer, config)
        check_data_fits(data, tokenizer, config)

        device = torch.device("cpu") if strategy == "fsdp" else fabric.device
        # its fresh adapter comes from the seeded generator: the same prompts on every rank
        model = load_model(checkpoint_dir, adapter=True, config=config, device=device, dtype=base_dtype(precision))
        raw_model = quantize_base(model, precision, device)
        model, optimizer, train_loss_fn = setup_training(fabric, model, train, compile, activation_checkpointing)
        fabric.print(f"{num_trainable_params(raw_model):,} trainable adapter parameters "
                     f"({raw_model.config.n_adapter_layers} layers x {raw_model.config.adapter_prompt_length} prompts "
                     "+ gates)")
        total_steps = planned_steps(train, len(data.splits["train"]))
        scheduler = build_scheduler(optimizer, train, total_steps)

        data_layout = {"global_batch_size": train.global_batch_size, "seed": seed}
        progress = {"step": 0, **data_layout}
        if state_path is not None:
            progress = load_training_state(state_path, raw_model, optimizer, scheduler, data_layout)
            changes = adopt_hyperparameters(optimizer, scheduler, train)
            fabric.print(resumed_message(state_path, progress["step"], changes))
        if fabric.is_global_zero:
            save_hparams(out_dir, hparams)
        fit(fabric, model, raw_model, optimizer, scheduler, data, tokenizer, train, eval, out_dir, save_interval,
            hparams, progress, total_steps, train_loss_fn)


def check_enough_samples(data: AlpacaDataModule, global_batch_size: int, option: str) -> None:
    """The training set must fill an optimizer step (else every step would repeat samples, and the Trainer's epochs
    would hold no step)."""
    samples = len(data.splits["train"])
    if samples < global_batch_size:
        raise UserError(f"{data.data_dir} has {samples} training samples, fewer than one optimizer step of "
                        f"{global_batch_size} ({option}): lower it, or prepare more data")


def check_data_fits(data: AlpacaDataModule, tokenizer: Tokenizer, config: Config) -> None:
    """The prepared data must come from this tokenizer and fit the model's context."""
    prepared = data.prep_config.get("tokenizer", {})
    if prepared.get("vocab_size") not in (None, tokenizer.vocab_size):
        raise UserError(f"{data.data_dir} was prepared with a tokenizer of {prepared['vocab_size']} tokens, but the "
                        f"model's has {tokenizer.vocab_size}: run scripts/prepare_alpaca.py with this --checkpoint_dir")
    longest = max(len(s["input_ids"]) for split in data.splits.values() for s in split) - 1
    if longest > config.block_size:
        raise UserError(f"{data.data_dir} holds sequences of {longest} tokens, longer than the model's block_size "
                        f"{config.block_size}: prepare it with --max_seq_length {config.block_size}")
