"""The training options both routes share: optimisation (``TrainArgs``) and evaluation (``EvalArgs``), their
checks, and what follows from them (accumulation, the number of steps)."""

import math
from dataclasses import dataclass, replace
from typing import Optional

from lit_adapter.data.batching import micro_batches_per_step
from lit_adapter.errors import UserError


@dataclass
class TrainArgs:
    """Optimisation hyperparameters."""

    learning_rate: float = 9e-3
    """Peak learning rate of AdamW."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step, over all devices (micro batches are accumulated to reach it). Default: the paper's
    64, or for a training set of fewer samples the most it fills (a multiple of micro_batch_size x devices)."""
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
class EvalArgs:
    """Validation during training."""

    interval: int = 100
    """Validate every this many optimizer steps (and at the end)."""
    max_batches: int = 100
    """Most validation micro batches per evaluation."""
    max_new_tokens: int = 100
    """Length of the sample response generated at each evaluation (0: none)."""
    instruction: Optional[str] = None
    """The instruction whose greedy answer is shown at each evaluation (default: the first validation record's,
    which scripts/prepare_alpaca.py records)."""


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


def check_eval_args(args: EvalArgs, prefix: str = "eval.") -> None:
    """Refuse evaluation settings that cannot work (``prefix`` names them as on the command line)."""
    if args.interval < 1 or args.max_batches < 1:
        raise UserError(f"{prefix}interval and {prefix}max_batches must be at least 1")
    if args.max_new_tokens < 0:
        raise UserError(f"{prefix}max_new_tokens must be zero (no sample answer) or more, got {args.max_new_tokens}")


PAPER_GLOBAL_BATCH = 64
"""The paper's samples per optimizer step."""
FALLBACK_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."
"""What evaluations ask where the prepared set records no question of its own (sets from older versions)."""


def with_defaults(train: TrainArgs, eval: EvalArgs, train_samples: int, sample_instruction: Optional[str],
                  devices: int, prefix: str = "train.") -> tuple[TrainArgs, EvalArgs]:
    """The options with the defaults that follow from the data: the global batch (64, or what a smaller training
    set fills; one line says so) and the evaluation's instruction (the prepared set's own)."""
    if train.global_batch_size is None:
        unit = devices * (train.micro_batch_size or 1 if train.micro_batch_tokens is None else 1)
        size = max(unit, min(PAPER_GLOBAL_BATCH, train_samples // unit * unit))
        if size < PAPER_GLOBAL_BATCH:
            print(f"{prefix}global_batch_size {size}: the training set holds {train_samples} samples, fewer than "
                  f"{PAPER_GLOBAL_BATCH}")
        train = replace(train, global_batch_size=size)
    return train, replace(eval, instruction=eval.instruction or sample_instruction or FALLBACK_INSTRUCTION)


def accumulation_steps(args: TrainArgs, devices: int) -> int:
    """Check the batch sizes; return the micro-batches per optimizer step on each device that a fixed
    micro_batch_size gives (global batch / (micro batch x devices); with micro_batch_tokens they vary: 0). A global
    batch still to be chosen (None) is checked as one micro-batch on every device."""
    args = args if args.global_batch_size is not None else replace(
        args, global_batch_size=devices * (args.micro_batch_size or 1 if args.micro_batch_tokens is None else 1))
    if args.micro_batch_tokens is not None:
        if args.micro_batch_tokens < 1 or (args.micro_batch_size or 1) < 1 or args.global_batch_size < 1:
            raise UserError("train.micro_batch_tokens, train.micro_batch_size and train.global_batch_size must be "
                            "at least 1")
        if devices < 1 or args.global_batch_size % devices:
            raise UserError(f"train.global_batch_size ({args.global_batch_size}) must be a multiple of devices "
                            f"({devices})")
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
