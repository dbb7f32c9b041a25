"""The training recipe both routes drive: the Fabric loop (``training.py``) and the LightningModule (``lightning.py``).

Here live the arguments (adapter shape, optimisation, evaluation) with their checks, the loss, the optimizer and
its schedule, the gradient accumulation, the preparation of the model for training, the checks of the data against
the model and the sample response shown at each evaluation; nothing of it exists twice.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.adapter import mark_only_adapter_trainable
from lit_adapter.batching import micro_batches_per_step
from lit_adapter.config import Config
from lit_adapter.data import IGNORE_INDEX
from lit_adapter.datamodule import AlpacaDataModule
from lit_adapter.errors import UserError
from lit_adapter.generation import generate
from lit_adapter.model import GPT
from lit_adapter.prompts import PromptStyle, encode_prompt, user_message
from lit_adapter.tokenizer import Tokenizer


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
    """AdamW over the trainable (adapter) parameters, fused: one kernel, which skips the whole update while the
    optimizer's ``found_inf`` tensor is 1 (as under a GradScaler), so a loop can refuse a step without waiting
    for the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95), fused=True)
    optimizer.found_inf = torch.zeros((), device=params[0].device)
    return optimizer


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
    return micro_batches_per_step(args.global_batch_size, args.micro_batch_size, devices)


def planned_steps(args: TrainArgs, train_samples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else as many as ``epochs`` passes over the data take."""
    return args.max_steps or math.ceil(args.epochs * train_samples / args.global_batch_size)


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


TrainLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, input_ids, targets) -> the micro-batch's summed loss over its learned positions."""


def learned_positions_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss, with the output head and the cross entropy run only where a target is learned (on Alpaca
    samples about a third of the positions: the rest are prompt and padding).

    Picking those positions needs their count on the host: free on the CPU, a wait for the device on a GPU, where
    the compiled path (``compile_for_training``) computes every position's logits instead.
    """
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return loss_fn(model(input_ids, logits_at=(rows, columns))[None], targets[rows, columns][None], "sum")


def compile_for_training(model: GPT) -> TrainLoss:
    """Compile every block and the loss; return the loss to train with: every position's logits, fixed shapes and
    no wait for the device.

    The compiled loss reads the bf16 logits and upcasts inside its kernel, so no float32 copy of the logits
    is ever stored.
    """
    for block in model.blocks:
        block.compile()
    compiled_loss = torch.compile(loss_fn)

    def every_position_loss(wrapped: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return compiled_loss(wrapped(input_ids), targets, "sum")

    return every_position_loss


def prepare_for_training(model: GPT, compile: bool, activation_checkpointing: bool) -> TrainLoss:
    """Freeze all but the adapter, set activation checkpointing, compile if asked; return the loss to train with."""
    mark_only_adapter_trainable(model)
    model.activation_checkpointing = activation_checkpointing
    return compile_for_training(model) if compile else learned_positions_loss


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
