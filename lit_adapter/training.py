"""The Fabric route of fine-tuning (``finetune/adapter.py`` runs ``main``): one run per output folder, the loop
over optimizer steps, stopping and resuming. What it trains with (arguments, loss, optimizer, schedule, accumulation)
is the shared ``recipe``; the files it writes are those of ``checkpoint``.
"""

import fcntl
import math
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn
from lightning.fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from lit_adapter.adapter import num_trainable_params
from lit_adapter.batching import padding_fraction
from lit_adapter.checkpoint import (ADAPTER_FILE, HPARAMS_FILE, RUN_LOCK, STATE_FILE, atomic_path, check_can_create,
                                    find_resume_state, load_model, load_training_state, open_checkpoint, preview_keys,
                                    save_hparams, save_training_state)
from lit_adapter.cli import process_rank
from lit_adapter.config import read_yaml_mapping
from lit_adapter.data import IGNORE_INDEX
from lit_adapter.datamodule import AlpacaDataModule
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.precision import TrainingPrecision, base_dtype, default_precision
from lit_adapter.prompts import PromptStyle
from lit_adapter.recipe import (AdapterArgs, EvalArgs, TrainArgs, TrainLoss, accumulation_steps,
                                adopt_hyperparameters, build_optimizer, build_scheduler, check_data_fits,
                                check_enough_samples, check_train_args, learned_positions_loss, loss_fn,
                                planned_steps, prepare_for_training, resumed_message, sample_response)
from lit_adapter.strategies import StrategyName, fabric_precision, fabric_strategy, quantize_base
from lit_adapter.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------- one run per folder

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
                         step_tokens: int, train_loss_fn: TrainLoss = learned_positions_loss) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one optimizer step; return this rank's part of the
    step loss (not synchronised).

    The step loss is the sum of the per-token losses over all micro-batches of all ranks divided by the step's
    response tokens ``step_tokens``, whatever the micro-batches and devices. DDP and FSDP average the gradients over
    the ranks, so each rank's backward is scaled up by the world size.
    """
    part = torch.zeros((), device=fabric.device)
    for i, (input_ids, targets) in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            loss = train_loss_fn(model, input_ids, targets) / step_tokens
            fabric.backward(loss * fabric.world_size)
        part += loss.detach()
    return part


def apply_gradients(fabric: Any, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float]) -> None:
    """Clip the accumulated gradients, take the optimizer step and clear them."""
    if max_grad_norm is not None:  # no finiteness check here: it would wait for the device (the loss is checked)
        fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm, error_if_nonfinite=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(fabric: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                  micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step_tokens: int, train_loss_fn: TrainLoss,
                  max_grad_norm: Optional[float]) -> torch.Tensor:
    """One optimizer step, without waiting for the device: return the step loss over all ranks (on the device).

    A step whose loss is not finite, and every one after it, leaves the adapter and the optimizer as they were:
    the loss sets the optimizer's ``found_inf`` flag on the device, which its fused update reads.
    """
    loss = fabric.all_reduce(accumulate_gradients(fabric, model, micro_batches, step_tokens, train_loss_fn),
                             reduce_op="sum")
    found_inf = optimizer.optimizer.found_inf
    found_inf.copy_(found_inf.logical_or(~loss.isfinite()))
    apply_gradients(fabric, model, optimizer, max_grad_norm)
    return loss


def setup_training(fabric: Any, model: GPT, train: TrainArgs, compile: bool,
                   activation_checkpointing: bool) -> tuple[nn.Module, torch.optim.Optimizer, TrainLoss]:
    """``prepare_for_training``, then hand model and optimizer to Fabric; also return the loss."""
    train_loss_fn = prepare_for_training(model, compile, activation_checkpointing)
    wrapped = fabric.setup_module(model)
    return wrapped, fabric.setup_optimizers(build_optimizer(wrapped, train)), train_loss_fn


def fit(fabric: Any, model: nn.Module, raw_model: GPT, optimizer: torch.optim.Optimizer, scheduler: Any,
        data: AlpacaDataModule, tokenizer: Tokenizer, train: TrainArgs, eval: EvalArgs, out_dir: Path,
        save_interval: int, hparams: dict, progress: dict, total_steps: int,
        train_loss_fn: TrainLoss = learned_positions_loss) -> None:
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

    unread = []  # (step, loss) not yet read: the host waits for the device only where it reports or saves

    def check_losses() -> list[float]:
        """The unread steps' losses (one wait for the device); the run stops at the first that is not finite."""
        values = torch.stack([loss for _, loss in unread]).tolist() if unread else []
        for (step, _), value in zip(unread, values):
            if not math.isfinite(value):
                raise UserError(diverged_message(value, step, out_dir))
        unread.clear()
        return values

    if progress["step"] == 0:  # the base model's figures (the gates start at zero), for the curve to start from
        evaluate(fabric, model, raw_model, val_loader, tokenizer, eval, data.prompt_style, 0)
    tokens, started = 0, time.perf_counter()
    try:
        while progress["step"] < total_steps:
            batches, step_tokens = next(stream)
            micro_batches = fabric.to_device(batches)
            loss = training_step(fabric, model, optimizer, micro_batches, step_tokens, train_loss_fn,
                                 train.max_grad_norm)
            tokens += sum(input_ids.numel() for input_ids, _ in micro_batches)
            step = progress["step"] + 1
            epoch = plan.epoch_of(step - 1)
            scheduler.step()
            progress.update(step=step)
            unread.append((step, loss))
            evaluating = step % eval.interval == 0 or step == total_steps
            logging = step % train.log_interval == 0 or step == total_steps
            if evaluating or logging:
                losses = check_losses()  # logs and evaluations follow good steps only
            if logging:
                train_loss = losses[-1]
                elapsed = time.perf_counter() - started
                metrics = {"train_loss": train_loss, "learning_rate": scheduler.get_last_lr()[0],
                           "tokens_per_s": tokens * fabric.world_size / elapsed,
                           "padding_fraction": padding_fraction(batches), "epoch": epoch}
                fabric.log_dict(metrics, step=step)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", epoch=epoch)
                tokens, started = 0, time.perf_counter()
            bar.update(1)
            if evaluating:
                evaluate(fabric, model, raw_model, val_loader, tokenizer, eval, data.prompt_style, step)
            if step < total_steps:
                stopping = fabric.strategy.reduce_boolean_decision(stop.requested, all=False)
                if stopping or step % save_interval == 0:
                    check_losses()  # a state is saved after good steps only
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
         strategy: StrategyName = "auto", precision: Optional[TrainingPrecision] = None,
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
    precision = precision or default_precision(torch.cuda.is_available())
    hparams = {k: (asdict(v) if isinstance(v, (AdapterArgs, TrainArgs, EvalArgs)) else str(v) if isinstance(v, Path) else v)
               for k, v in locals().items() if k not in ("Fabric", "TensorBoardLogger")}
    base = open_checkpoint(checkpoint_dir, adapter.apply)  # a shape that does not fit fails before any loading
    state_path = find_resume_state(resume, out_dir)  # a wrong --resume fails before anything is loaded
    data = AlpacaDataModule(data_dir, train.global_batch_size, train.micro_batch_size, train.micro_batch_tokens,
                            seed=seed)
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

        check_data_fits(data, base.tokenizer, base.config)

        device = torch.device("cpu") if strategy == "fsdp" else fabric.device
        # its fresh adapter comes from the seeded generator: the same prompts on every rank
        model = load_model(checkpoint_dir, adapter=True, config=base.config, device=device, dtype=base_dtype(precision))
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
        fit(fabric, model, raw_model, optimizer, scheduler, data, base.tokenizer, train, eval, out_dir, save_interval,
            hparams, progress, total_steps, train_loss_fn)


