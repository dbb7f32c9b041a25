"""The Fabric route of fine-tuning (``finetune/adapter.py`` runs ``main``): the loop over optimizer steps, logging,
evaluating, saving, stopping and resuming. What it trains with is the shared ``recipe``; the files it writes are
those of ``state``.
"""

import itertools
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn
from lightning.fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from lit_adapter.adapter import AdapterArgs, trainable_summary
from lit_adapter.checkpoint import (ADAPTER_FILE, QUICK_START_CHECKPOINT, BaseCheckpoint, check_adapter_name,
                                    load_model, open_checkpoint)
from lit_adapter.cli import StopRequest, check_seed, progress
from lit_adapter.data.batching import padding_fraction
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.errors import UserError, message_line
from lit_adapter.files import atomic_path, check_can_create
from lit_adapter.model import LLaMA
from lit_adapter.precision import (PRECISIONS, TrainingPrecision, base_dtype, check_device, check_precision,
                                   default_precision)
from lit_adapter.tokenizer import Tokenizer
from lit_adapter.train.args import (EvalArgs, TrainArgs, accumulation_steps, check_eval_args, check_train_args,
                                    planned_steps, with_defaults)
from lit_adapter.train.recipe import (TrainLoss, adopt_hyperparameters, build_optimizer, build_scheduler,
                                      evaluation_report, learned_positions_loss, micro_batch_loss, prepare_for_training,
                                      resumed_message, sample_response, step_metrics, validation_loss,
                                      validation_sums)
from lit_adapter.train.state import (HPARAMS_FILE, claim_out_dir, find_resume_state, load_training_state,
                                     log_version, save_hparams, save_training_state)
from lit_adapter.train.strategies import StrategyName, fabric_precision, fabric_strategy

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def validate(fabric: Any, model: nn.Module, loader: Any, max_batches: int) -> Optional[float]:
    """Mean loss per response token over at most ``max_batches`` micro-batches on each rank, all ranks together
    (None without validation samples)."""
    model.eval()
    totals = torch.zeros(2, device=fabric.device)
    batches = itertools.islice(loader, max_batches)
    for input_ids, targets in progress(batches, min(len(loader), max_batches), "validating", "batch"):
        totals += validation_sums(model, *fabric.to_device((input_ids, targets)))
    model.train()
    return validation_loss(fabric.all_reduce(totals, reduce_op="sum"))


def accumulate_gradients(fabric: Any, model: nn.Module, micro_batches: MicroBatches, step_tokens: int,
                         train_loss_fn: TrainLoss = learned_positions_loss) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one optimizer step; return this rank's part of the
    step loss (not synchronised), each micro-batch's ``micro_batch_loss``."""
    part = torch.zeros((), device=fabric.device)
    for i, (input_ids, targets) in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            loss = micro_batch_loss(train_loss_fn, model, input_ids, targets, step_tokens)
            fabric.backward(loss * fabric.world_size)
        part += loss.detach()
    return part


def apply_gradients(fabric: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    max_grad_norm: Optional[float]) -> None:
    """Clip the accumulated gradients, take the optimizer step and clear them."""
    if max_grad_norm is not None:  # no finiteness check here: it would wait for the device (the loss is checked)
        fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm, error_if_nonfinite=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(fabric: Any, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: MicroBatches,
                  step_tokens: int, train_loss_fn: TrainLoss, max_grad_norm: Optional[float]) -> torch.Tensor:
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


def setup_training(fabric: Any, model: LLaMA, train: TrainArgs, compile: bool,
                   activation_checkpointing: bool) -> tuple[nn.Module, torch.optim.Optimizer, TrainLoss]:
    """``prepare_for_training``, then hand model and optimizer to Fabric; also return the loss."""
    train_loss_fn = prepare_for_training(model, compile, activation_checkpointing)
    wrapped = fabric.setup_module(model)
    return wrapped, fabric.setup_optimizers(build_optimizer(wrapped, train)), train_loss_fn


def evaluate(fabric: Any, model: nn.Module, raw_model: LLaMA, val_loader: Any, tokenizer: Tokenizer,
             eval: EvalArgs, style: str, step: int) -> None:
    """Log the validation loss and print the greedy response to the fixed instruction."""
    val_loss = validate(fabric, model, val_loader, eval.max_batches)
    if val_loss is not None:
        fabric.log_dict({"val_loss": val_loss}, step=step)
    raw_model.eval()
    response = sample_response(raw_model, tokenizer, eval.instruction, eval.max_new_tokens, style)
    raw_model.train()
    fabric.print(evaluation_report(step, val_loss, eval.instruction, response))


def diverged_message(loss: float, step: int, out_dir: Path) -> str:
    """What went wrong at ``step``, and from which saved state to go on."""
    last = find_resume_state("auto", out_dir)
    kept = f"the last saved state is kept in {last.parent}" if last else f"no state was saved in {out_dir} yet"
    return (f"the training loss is {loss} at step {step}; stopped before applying it ({kept}). "
            "Try a lower --train.learning_rate or --train.max_grad_norm")


class Run:
    """One fine-tuning run in Fabric: optimizer steps until the planned number, a stop request or a non-finite
    loss, with logs, evaluations and saved states along the way. The host waits for the device only where it
    logs, evaluates or saves."""

    def __init__(self, fabric: Any, model: nn.Module, raw_model: LLaMA, optimizer: torch.optim.Optimizer,
                 scheduler: Any, data: InstructionDataModule, tokenizer: Tokenizer, train: TrainArgs,
                 eval: EvalArgs, out_dir: Path, save_interval: int, hparams: dict, progress: dict, total_steps: int,
                 train_loss_fn: TrainLoss) -> None:
        self.fabric, self.model, self.raw_model, self.optimizer, self.scheduler = (fabric, model, raw_model,
                                                                                    optimizer, scheduler)
        self.data, self.tokenizer, self.train, self.eval = data, tokenizer, train, eval
        self.out_dir, self.save_interval, self.hparams = out_dir, save_interval, hparams
        self.progress, self.total_steps, self.train_loss_fn = progress, total_steps, train_loss_fn
        self.val_loader = data.val_dataloader()
        self.unread: list[tuple[int, torch.Tensor]] = []  # (step, loss) that the host has not read yet

    def fit(self) -> None:
        """Run the steps; end with the adapter in ``out_dir``, or exit non-zero when stopped."""
        loader = self.data.train_steps(self.progress["step"])
        stream, plan = iter(loader), loader.sampler.plan
        stop = StopRequest()
        bar = tqdm(total=self.total_steps, initial=self.progress["step"], desc="fine-tuning", unit="step",
                   disable=not self.fabric.is_global_zero, dynamic_ncols=True)
        if self.progress["step"] == 0:  # the base model's figures (the gates start at zero), where the curve starts
            self.evaluate(0)
        tokens, started = 0, time.perf_counter()
        try:
            while self.progress["step"] < self.total_steps:
                batches, step_tokens = next(stream)
                micro_batches = self.fabric.to_device(batches)
                loss = training_step(self.fabric, self.model, self.optimizer, micro_batches, step_tokens,
                                     self.train_loss_fn, self.train.max_grad_norm)
                tokens += sum(input_ids.numel() for input_ids, _ in micro_batches)
                step = self.progress["step"] + 1
                self.scheduler.step()
                self.progress.update(step=step)
                self.unread.append((step, loss))
                evaluating = step % self.eval.interval == 0 or step == self.total_steps
                if step % self.train.log_interval == 0 or step == self.total_steps:
                    self.log(step, self.read_losses()[-1], tokens / (time.perf_counter() - started),
                             padding_fraction(batches), plan.epoch_of(step - 1), bar)
                    tokens, started = 0, time.perf_counter()
                bar.update(1)
                if evaluating:
                    self.read_losses()  # evaluations follow good steps only
                    self.evaluate(step)
                if step < self.total_steps:
                    self.save_or_stop(step, stop)
            self.finish()
        finally:
            bar.close()
            stop.restore()
            for logger in self.fabric.loggers:  # Fabric does not close them: flush the logged metrics to disk now
                logger.finalize("finished")

    def read_losses(self) -> list[float]:
        """The unread steps' losses (one wait for the device); the run stops at the first that is not finite."""
        values = torch.stack([loss for _, loss in self.unread]).tolist() if self.unread else []
        for (step, _), value in zip(self.unread, values):
            if not math.isfinite(value):
                raise UserError(diverged_message(value, step, self.out_dir))
        self.unread.clear()
        return values

    def log(self, step: int, train_loss: float, tokens_per_s: float, padding: float, epoch: int, bar: tqdm) -> None:
        metrics = step_metrics(train_loss, self.scheduler.get_last_lr()[0], tokens_per_s * self.fabric.world_size,
                               padding, epoch)
        self.fabric.log_dict(metrics, step=step)
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", epoch=epoch,
                        graphs=metrics["compiled_graphs"])

    def evaluate(self, step: int) -> None:
        evaluate(self.fabric, self.model, self.raw_model, self.val_loader, self.tokenizer, self.eval,
                 self.data.prompt_style, step)

    def save(self, directory: Path) -> None:
        save_training_state(directory, self.raw_model, self.optimizer, self.scheduler, self.progress,
                            self.raw_model.config, self.hparams, self.fabric.is_global_zero, self.data.prompt_style,
                            self.hparams["name"], self.hparams["base_fingerprint"])
        self.fabric.barrier()

    def save_or_stop(self, step: int, stop: StopRequest) -> None:
        """Save a state every ``save_interval`` steps, and when a stop is requested, then exit non-zero."""
        stopping = self.fabric.strategy.reduce_boolean_decision(stop.requested, all=False)
        if stopping or step % self.save_interval == 0:
            self.read_losses()  # a state is saved after good steps only
            self.save(self.out_dir / f"step-{step:06d}")
        if stopping:  # not a success: `finetune && generate` must not go on with an older adapter
            self.fabric.print(f"\nStopped at step {step}; resume with --resume auto (state in "
                              f"{self.out_dir}/step-{step:06d})")
            sys.exit(stop.exit_status)

    def finish(self) -> None:
        """Save the last state, and its adapter and hyperparameters as the run's own in ``out_dir``."""
        final_dir = self.out_dir / f"step-{self.progress['step']:06d}"
        self.save(final_dir)
        if self.fabric.is_global_zero:
            for name in (ADAPTER_FILE, HPARAMS_FILE):
                with atomic_path(self.out_dir / name) as tmp:
                    shutil.copyfile(final_dir / name, tmp)
        self.fabric.print(f"\nSaved the adapter to {self.out_dir / ADAPTER_FILE}")


def launch_fabric(accelerator: str, devices: int, strategy: StrategyName, precision: str, out_dir: Path,
                  state_path: Optional[Path]) -> Any:
    """A launched ``Fabric`` with a TensorBoard logger in ``out_dir/logs`` (a resumed run continues its log); what
    cannot run is one line."""
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=fabric_strategy(strategy, devices),
                        loggers=TensorBoardLogger(root_dir=out_dir, name="logs",
                                                  version=log_version(out_dir / "logs", state_path)),
                        **fabric_precision(precision, "cuda" if accelerator != "cpu" and torch.cuda.is_available()
                                           else "cpu"))
    except (RuntimeError, ValueError, MisconfigurationException) as err:  # e.g. no GPU, or fewer than --devices
        raise UserError(f"cannot run with --accelerator {accelerator} --devices {devices} --strategy {strategy} "
                        f"--precision {precision}: {message_line(err)}") from None
    fabric.launch()
    return fabric


def load_for_training(fabric: Any, base: BaseCheckpoint, precision: str, strategy: StrategyName) -> LLaMA:
    """The base with a fresh adapter, in ``precision`` (FSDP: on the CPU, for each rank to keep its shard)."""
    device = torch.device("cpu") if strategy == "fsdp" else fabric.device
    check_device(precision, fabric.device)
    # its fresh adapter comes from the seeded generator: the same prompts on every rank
    return load_model(base.directory, adapter=True, config=base.config, device=device,
                      dtype=base_dtype(precision, fabric.device.type), quantize=PRECISIONS[precision].quantize)


def main(checkpoint_dir: Path = QUICK_START_CHECKPOINT, data_dir: Path = Path("data/alpaca"),
         allow_other_tokenizer: bool = False,
         out_dir: Path = Path("out/adapter/alpaca"), name: Optional[str] = None, accelerator: str = "auto",
         devices: int = 1,
         strategy: StrategyName = "auto", precision: Optional[TrainingPrecision] = None,
         resume: Union[bool, Literal["auto"], Path] = False, save_interval: int = 1000, seed: int = 1337,
         compile: Optional[bool] = None, activation_checkpointing: bool = False,
         adapter: AdapterArgs = AdapterArgs(), train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs()) -> None:
    """Fine-tune a LLaMA-Adapter on prepared instruction or chat data with Lightning Fabric.

    Args:
        checkpoint_dir: Converted base model (scripts/convert_checkpoint.py; default: the quick start's).
        data_dir: Prepared data (scripts/prepare_alpaca.py): train.pt, val.pt, prep_config.yaml.
        allow_other_tokenizer: Train on data prepared with another tokenizer file than the model's (of the same
            vocabulary size; prep_config.yaml records its hash), which is otherwise refused: only where both tokenize
            alike (e.g. a re-saved copy).
        out_dir: Where adapters, training states (step-NNNNNN/) and TensorBoard logs (logs/) go.
        name: The adapter's name, saved in its files: generate/adapter.py and the server call it so (default: the
            out_dir's folder name).
        accelerator: "cpu", "cuda" or "auto".
        devices: Devices (processes) to train on.
        strategy: "auto" (one device, or DDP for several), "ddp", or "fsdp" (FSDP2: blocks sharded, adapter gathered
            to save).
        precision: "bf16-true" (base in bf16, adapter and optimizer in float32), "bf16-mixed", "32-true",
            "nf4-base" (bf16-true with the blocks' linear weights in 4-bit NormalFloat, QLoRA's format: a 7B base
            in about 4 GB; needs torchao; not fsdp) or "fp8-base" (the blocks' linear weights in float8 and FP8
            matmuls, faster; Hopper GPUs, not fsdp). Default: bf16-true on GPUs that support it, else 32-true.
        resume: Continue from a training state: a step-NNNNNN directory or its training_state.pt, or "auto" for the
            latest one in out_dir (starts fresh if there is none). The adapter, optimizer moments, schedule position,
            data position and random state continue; train.learning_rate, weight_decay, the schedule's shape,
            clipping, evaluation, saving, the devices and the micro-batches may change (what changed is printed);
            train.global_batch_size and seed may not. An out_dir holds one run: a fresh run needs one without
            training states.
        save_interval: Save the adapter and a resumable training state every this many optimizer steps (and at the end).
        seed: Random seed (data order and adapter initialisation).
        compile: Compile each transformer block with torch.compile (default: on GPU).
        activation_checkpointing: Recompute each block's activations in the backward pass (less memory, slower).
        adapter: The adapter's shape: prompt vectors per layer and the first adapted layer.
        train: Optimisation hyperparameters.
        eval: Validation settings.
    """
    hparams = {k: (asdict(v) if isinstance(v, (AdapterArgs, TrainArgs, EvalArgs)) else str(v) if isinstance(v, Path)
                   else v) for k, v in locals().items()}
    check_options(save_interval, eval, train, devices, out_dir)
    check_seed(seed)
    hparams["name"] = check_adapter_name(name or Path(out_dir).resolve().name)
    precision = check_precision(precision or default_precision(torch.cuda.is_available()), strategy).name
    base = open_checkpoint(checkpoint_dir, adapter.config)  # a shape that does not fit fails before any loading
    hparams["base_fingerprint"] = base.fingerprint
    state_path = find_resume_state(resume, out_dir)  # a wrong --resume fails before anything is loaded
    data, train, eval = open_data(data_dir, allow_other_tokenizer, train, eval, seed, base, devices)
    hparams.update(train=asdict(train), eval=asdict(eval))
    with claim_out_dir(out_dir, state_path) as run_id:
        hparams["run_id"] = run_id
        fabric = launch_fabric(accelerator, devices, strategy, precision, out_dir, state_path)
        fabric.seed_everything(seed)
        raw_model = load_for_training(fabric, base, precision, strategy)
        compile = fabric.device.type == "cuda" if compile is None else compile
        model, optimizer, train_loss_fn = setup_training(fabric, raw_model, train, compile, activation_checkpointing)
        fabric.print(trainable_summary(raw_model, raw_model.config))
        total_steps = planned_steps(train, len(data.splits["train"]))
        scheduler = build_scheduler(optimizer, train, total_steps)
        progress = start_progress(fabric, state_path, raw_model, optimizer, scheduler, train, seed)
        if fabric.is_global_zero:
            save_hparams(out_dir, hparams)
        Run(fabric, model, raw_model, optimizer, scheduler, data, base.tokenizer, train, eval, out_dir, save_interval,
            hparams, progress, total_steps, train_loss_fn).fit()


def check_options(save_interval: int, eval: EvalArgs, train: TrainArgs, devices: int, out_dir: Path) -> None:
    """Refuse, before any work, options that cannot train or an ``out_dir`` that cannot be written."""
    if save_interval < 1:
        raise UserError("save_interval must be at least 1")
    check_eval_args(eval)
    check_train_args(train)
    accumulation_steps(train, devices)
    check_can_create(out_dir, "--out_dir")


def open_data(data_dir: Path, allow_other_tokenizer: bool, train: TrainArgs, eval: EvalArgs, seed: int,
              base: BaseCheckpoint, devices: int) -> tuple[InstructionDataModule, TrainArgs, EvalArgs]:
    """The prepared set, checked to fill an optimizer step and to fit the base's tokenizer and context, and the
    options with the defaults that follow from it."""
    data = InstructionDataModule(data_dir, train.global_batch_size, train.micro_batch_size, train.micro_batch_tokens,
                                 seed=seed, allow_other_tokenizer=allow_other_tokenizer)
    data.setup()
    train, eval = with_defaults(train, eval, len(data.splits["train"]), data.sample_instruction, devices)
    data.global_batch_size = train.global_batch_size
    data.check_fills_a_step("--train.global_batch_size")
    data.check_fits(base.tokenizer, base.config, "--allow_other_tokenizer")
    return data, train, eval


def start_progress(fabric: Any, state_path: Optional[Path], raw_model: LLaMA, optimizer: torch.optim.Optimizer,
                   scheduler: Any, train: TrainArgs, seed: int) -> dict:
    """The run's progress at its start: step 0, or the resumed state's (which this run's options then adapt)."""
    data_layout = {"global_batch_size": train.global_batch_size, "seed": seed}
    if state_path is None:
        return {"step": 0, **data_layout}
    progress = load_training_state(state_path, raw_model, optimizer, scheduler, data_layout)
    fabric.print(resumed_message(state_path, progress["step"], adopt_hyperparameters(optimizer, scheduler, train)))
    return progress
