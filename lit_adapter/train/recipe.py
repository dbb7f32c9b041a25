"""The training recipe both routes drive, the Fabric loop (``fabric_loop``) and the LightningModule
(``lightning_module``): the loss and a micro-batch's part of a step's loss, the optimizer and its schedule, the
model's preparation for training, and the evaluation (validation sums, sample answer, report line). Nothing of it
exists twice.
"""

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo import config as dynamo_config
from torch._dynamo.utils import counters

from lit_adapter.adapter import mark_only_adapter_trainable
from lit_adapter.cli import progress
from lit_adapter.data.batching import IGNORE_INDEX
from lit_adapter.generate.decode import generate
from lit_adapter.model import LLaMA
from lit_adapter.prompts import get_style, user_message
from lit_adapter.tokenizer import Tokenizer
from lit_adapter.train.args import TrainArgs


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


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = args.min_lr / args.learning_rate if args.learning_rate else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup_steps, total_steps, min_ratio))


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


def micro_batch_loss(train_loss_fn: TrainLoss, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                     step_tokens: int) -> torch.Tensor:
    """A micro-batch's part of its optimizer step's loss: its summed per-token loss over the response tokens of the
    whole step (all micro-batches, all ranks), so the step loss is the same whatever the micro-batches and devices.
    DDP and FSDP average gradients over ranks, so each route back-propagates it scaled up by the world size."""
    return train_loss_fn(model, input_ids, targets) / step_tokens


def compile_for_training(model: LLaMA) -> TrainLoss:
    """Compile every block and the loss; return the loss to train with: every position's logits and no wait for the
    device.

    Micro-batches vary in rows and length, so shapes are dynamic from the first call: a block compiles once for each
    of its three forms (without adapter, the first adapter layer, whose input needs no gradient, and the layers
    above), the loss once, whatever the lengths; a batch of one row (a size of 1 is always specialised) adds at most
    as many again. Without this, each new shape recompiled, and after 8 graphs of one function Dynamo ran the rest
    uncompiled. Only sizes are dynamic, and sizes that happen to be equal (4 rows, a head dimension of 4) are not
    assumed equal, which would fix them. The compiled loss reads the bf16 logits and upcasts inside its kernel: no
    float32 copy of the logits.
    """
    fx_config.use_duck_shape = False
    dynamo_config.specialize_float = True  # floats (norm epsilons, the FP8 range) stay constants, as in static graphs
    for block in model.blocks:
        block.compile(dynamic=True)
    compiled_loss = torch.compile(loss_fn, dynamic=True)

    def every_position_loss(wrapped: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return compiled_loss(wrapped(input_ids), targets, "sum")

    return every_position_loss


def compiled_graphs() -> int:
    """The graphs ``torch.compile`` has made in this process so far (Dynamo's count)."""
    return counters["stats"]["unique_graphs"]


def step_metrics(train_loss: float, learning_rate: float, tokens_per_s: float, padding: float,
                 epoch: int) -> dict[str, float]:
    """What both routes log after an optimizer step (``tokens_per_s`` of all ranks), with the graphs compiled so far."""
    return {"train_loss": train_loss, "learning_rate": learning_rate, "tokens_per_s": tokens_per_s,
            "padding_fraction": padding, "epoch": epoch, "compiled_graphs": compiled_graphs()}


def prepare_for_training(model: LLaMA, compile: bool, activation_checkpointing: bool) -> TrainLoss:
    """Freeze all but the adapter, set activation checkpointing, compile if asked; return the loss to train with."""
    mark_only_adapter_trainable(model)
    model.activation_checkpointing = activation_checkpointing
    return compile_for_training(model) if compile else learned_positions_loss


def sample_response(model: LLaMA, tokenizer: Tokenizer, instruction: str, max_new_tokens: int,
                    style: Optional[str] = None) -> str:
    """The model's greedy answer to ``instruction`` in the prompt style named ``style`` (the KV cache is freed after).

    It runs eagerly even when the blocks are compiled for training: a short sample is not worth new graphs.
    """
    prompt = get_style(style).encode(tokenizer, [user_message(instruction)])
    max_new_tokens = min(max_new_tokens, model.config.block_size - prompt.numel())
    if max_new_tokens < 1:
        return ""
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + max_new_tokens)
    try:
        with torch.compiler.set_stance("force_eager"):
            tokens = generate(model, prompt, max_new_tokens, temperature=0, stop_ids=tokenizer.stop_ids)
            ids = list(progress(tokens, max_new_tokens, "sample answer", "token"))
    finally:
        model.clear_kv_cache()
    return tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])


def validation_sums(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss of a validation micro-batch and its count of response tokens, as a 2-vector.

    It runs eagerly, as the sample answer does: graphs without gradients would double the blocks' compilations for
    a small share of the run's work. Eagerly, the output head runs on the learned positions only.
    """
    with torch.compiler.set_stance("force_eager"):
        loss = learned_positions_loss(model, input_ids, targets)
    return torch.stack([loss, (targets != IGNORE_INDEX).sum().float()])


def validation_loss(totals: torch.Tensor) -> Optional[float]:
    """The loss per response token of summed ``validation_sums`` (over batches and ranks), or None where they hold
    no token: a prepared set without validation samples has no loss (0 / 0 is no number to report)."""
    loss, tokens = totals.tolist()
    return loss / tokens if tokens else None


def evaluation_report(step: Optional[int], val_loss: Optional[float], instruction: str, response: str) -> str:
    """What both routes print at an evaluation: the step (None outside training), the validation loss (None: there
    are no validation samples) and the sample answer."""
    where = "" if step is None else f"step {step}: "
    loss = "no val loss (no validation samples)" if val_loss is None else f"val loss {val_loss:.4f}"
    return f"\n{where}{loss}\n{instruction}\n> {response}"
