"""The Trainer route's LightningModule: ``AdapterModule`` drives the shared ``recipe`` (model preparation, loss,
optimizer, schedule, evaluation) for the Lightning ``Trainer``; ``lightning_cli`` runs it from the command line.
Nothing here trains differently from the Fabric loop.
"""

import itertools
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lit_adapter.adapter import AdapterArgs, AdapterLLaMA, is_adapter_param, trainable_summary
from lit_adapter.checkpoint import (ADAPTER_FILE, QUICK_START_CHECKPOINT, BaseCheckpoint, check_adapter_name,
                                    load_model, open_checkpoint, save_adapter)
from lit_adapter.cli import progress
from lit_adapter.data.batching import padding_fraction
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.errors import UserError
from lit_adapter.files import check_can_create, compare_shapes, shapes_of
from lit_adapter.precision import PRECISIONS, QuantizedBase, base_dtype, check_device
from lit_adapter.prompts import LEGACY_STYLE
from lit_adapter.train.args import EvalArgs, TrainArgs
from lit_adapter.train.recipe import (adopt_hyperparameters, build_optimizer, build_scheduler, evaluation_report,
                                      learned_positions_loss, micro_batch_loss, prepare_for_training,
                                      resumed_message, sample_response, step_metrics, validation_loss, validation_sums)
from lit_adapter.train.state import adapter_and_optimizer_state


class AdapterModule(L.LightningModule):
    """A LLaMA-Adapter on a frozen base model, trained with the loss, optimizer and schedule of ``recipe``.

    The base is loaded in ``configure_model`` (on the strategy's device, in the precision's dtype, sharded with
    FSDP2 under ``ModelParallelStrategy``); only the adapter's prompts and gates train and only they are written
    to Lightning checkpoints. At the end of training the adapter goes to ``out_dir/adapter.safetensors``.
    """

    def __init__(self, checkpoint_dir: Path = QUICK_START_CHECKPOINT, out_dir: Optional[Path] = None,
                 name: Optional[str] = None, compile: Optional[bool] = None, activation_checkpointing: bool = False,
                 quantized_base: Optional[QuantizedBase] = None,
                 adapter: AdapterArgs = AdapterArgs(), train: TrainArgs = TrainArgs(),
                 eval: EvalArgs = EvalArgs()) -> None:
        """
        Args:
            checkpoint_dir: Converted base model (scripts/convert_checkpoint.py; default: the quick start's).
            out_dir: Where the trained adapter.safetensors goes at the end (default: the trainer's log directory,
                e.g. out/adapter_trainer/alpaca/logs/version_0).
            name: The adapter's name, saved in its files: generate/adapter.py and the server call it so (default:
                the folder name of --trainer.default_root_dir).
            compile: Compile each transformer block with torch.compile (default: on GPU).
            activation_checkpointing: Recompute each block's activations in the backward pass (less memory, slower).
            quantized_base: The frozen blocks' linear weights in 4-bit NormalFloat (nf4-base, QLoRA's format: a 7B
                base in about 4 GB) or float8 (fp8-base, faster on Hopper GPUs), computed in bfloat16; the Trainer
                then runs bf16-true (default: the base as --trainer.precision stores it).
            adapter: The adapter's shape: prompt vectors per layer and the first adapted layer.
            train: Optimisation hyperparameters. The trainer's gradient accumulation is
                global_batch_size / (micro_batch_size x devices), its gradient clipping max_grad_norm.
            eval: Validation settings (every eval.interval optimizer steps and at the end).
        """
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.name = check_adapter_name(name) if name else None
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.quantized_base = quantized_base
        self.adapter_args = adapter
        self.train_args = train
        self.eval_args = eval
        # checkpoints hold the adapter only: the frozen base comes from checkpoint_dir (see on_load_checkpoint)
        self.strict_loading = False
        self.model: Optional[AdapterLLaMA] = None
        self._base: Optional[BaseCheckpoint] = None
        self.train_loss_fn = learned_positions_loss  # compiled in configure_model where asked
        self.total_steps: Optional[int] = None
        self._last_step = 0
        self._step_loss = torch.zeros(())
        self._reset_step_metrics()
        self._val_losses: list[torch.Tensor] = []
        self.adapter_path: Optional[Path] = None  # where on_train_end wrote the adapter

    # ------------------------------------------------------------------------------------------ the model

    def configure_model(self) -> None:
        """Load the base with a fresh adapter (zero gates), freeze the base, compile and shard as asked."""
        if self.model is not None:
            return
        trainer = self._trainer
        precision = self.quantized_base or (trainer.precision if trainer is not None else "32-true")
        root_device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        check_device(precision, root_device)
        sharded = self.device_mesh is not None
        # FSDP: every rank loads the (memory-mapped) base on the CPU and keeps only its shard
        model = load_model(self.checkpoint_dir, adapter=True, config=self.base.config,
                           device="cpu" if sharded else root_device, dtype=base_dtype(precision, root_device.type),
                           quantize=PRECISIONS[precision].quantize)
        compile = self.compile_blocks if self.compile_blocks is not None else root_device.type == "cuda"
        self.train_loss_fn = prepare_for_training(model, compile, self.activation_checkpointing)
        if sharded:
            from lit_adapter.train.strategies import shard_model

            shard_model(model, self.device_mesh)
        self.model = model
        self.print(trainable_summary(model, model.config))

    def setup(self, stage: str) -> None:
        """Check, before any work, that the data fits the model (and fills a step, to fit; has validation samples,
        to validate) and that the output directory is writable."""
        base = self.base
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, InstructionDataModule):
            datamodule.setup(stage)
            datamodule.check_fits(base.tokenizer, base.config, "--data.allow_other_tokenizer")
            if stage == TrainerFn.FITTING:
                datamodule.check_fills_a_step("--model.train.global_batch_size")
            elif stage == TrainerFn.VALIDATING and not datamodule.splits["val"]:
                raise UserError(f"{datamodule.data_dir} has no validation samples (prepared with --val_size 0): "
                                "there is nothing to validate")
        if self.out_dir is not None:
            check_can_create(self.out_dir, "--model.out_dir")

    @property
    def base(self) -> BaseCheckpoint:
        """The base checkpoint directory, opened once: its config with this adapter's shape, and its tokenizer."""
        if self._base is None:
            self._base = open_checkpoint(self.checkpoint_dir,
                                         lambda base: self.adapter_args.config(base, option="--model.adapter."))
        return self._base

    def run_options(self) -> dict[str, dict]:
        """The --model and --data options of this run, for its checkpoints: plain types only (they load with
        torch.load(weights_only=True)), under a key of our own, not Lightning's hyper_parameters, which its CLI
        would apply over the command line's options."""
        model = {"checkpoint_dir": str(self.checkpoint_dir), "out_dir": None if self.out_dir is None else
                 str(self.out_dir), "name": self.adapter_name, "compile": self.compile_blocks,
                 "activation_checkpointing": self.activation_checkpointing, "quantized_base": self.quantized_base,
                 "adapter": asdict(self.adapter_args),
                 "train": asdict(self.train_args), "eval": asdict(self.eval_args)}
        data = self.trainer.datamodule
        if not isinstance(data, InstructionDataModule):
            return {"model": model}
        return {"model": model, "data": {"data_dir": str(data.data_dir), "micro_batch_tokens": data.micro_batch_tokens,
                                         "seed": data.seed, "num_workers": data.num_workers,
                                         "pad_to_multiple_of": data.pad_to_multiple_of,
                                         "allow_other_tokenizer": data.allow_other_tokenizer}}

    @property
    def adapter_name(self) -> str:
        """--model.name, else the folder name of the trainer's root directory."""
        return self.name or Path(self.trainer.default_root_dir).resolve().name

    @property
    def prompt_style(self) -> str:
        """The name of the prepared data's prompt style (without a data module: the legacy style)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return datamodule.prompt_style if isinstance(datamodule, InstructionDataModule) else LEGACY_STYLE

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    # ------------------------------------------------------------------------------------------ training

    def configure_optimizers(self) -> dict:
        """``build_optimizer`` (AdamW over the adapter) and ``build_scheduler`` (warm-up, cosine), stepped per
        optimizer step over the trainer's total steps."""
        optimizer = build_optimizer(self.model, self.train_args)
        self.total_steps = self.total_optimizer_steps()
        scheduler = build_scheduler(optimizer, self.train_args, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def total_optimizer_steps(self) -> int:
        """Optimizer steps this fit will take: the trainer's max_steps, else its estimate from the epochs (the trainer
        also steps on an epoch's last, partial accumulation)."""
        trainer = self.trainer
        if trainer.max_steps != -1 and trainer.max_epochs in (None, -1):
            return trainer.max_steps  # without loading the data early (see on_load_checkpoint)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            total = self.train_args.max_steps
        if not total:
            raise UserError("the number of optimizer steps is unknown: "
                            "set --trainer.max_steps or --model.train.max_steps")
        return int(total)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip the adapter's gradient norm to ``train.max_grad_norm`` (a trainer's gradient_clip_val wins)."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.train_args.max_grad_norm
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip,
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def training_step(self, batch: tuple[list[tuple[torch.Tensor, torch.Tensor]], int], batch_idx: int) -> torch.Tensor:
        """One micro-batch's ``micro_batch_loss``, scaled up by the accumulation and the world size that the trainer
        and DDP/FSDP divide by."""
        [(input_ids, targets)], step_tokens = batch
        loss = micro_batch_loss(self.train_loss_fn, self.model, input_ids, targets, step_tokens)
        self._loss_sum += loss.detach()
        self._tokens += input_ids.numel()
        return loss * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_train_start(self) -> None:
        """Reset the step metrics; a fresh run first evaluates the base model (step 0, as the Fabric loop does), a
        resumed one takes this run's learning rate and weight decay (and says so)."""
        self._reset_step_metrics()
        self._last_step = self.trainer.global_step
        if self.trainer.ckpt_path is not None:
            changes = adopt_hyperparameters(self.trainer.optimizers[0], self.lr_schedulers(), self.train_args)
            self.print(resumed_message(Path(self.trainer.ckpt_path), self.global_step, changes))
        elif isinstance(self.trainer.datamodule, InstructionDataModule):
            self.evaluate_base()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's loss over its micro-batches and all ranks; a loss that is not finite stops the run before
        the step is applied, so the adapter stays that of the last good step."""
        self._step_loss = self.trainer.strategy.reduce(self._loss_sum, reduce_op="sum")
        if not torch.isfinite(self._step_loss).item():
            raise UserError(f"the training loss is {self._step_loss.item()} at step {self.global_step + 1}; "
                            "stopped before applying it. Resume from a checkpoint of the run's checkpoints/ with "
                            "--ckpt_path and a lower --model.train.learning_rate or --model.train.max_grad_norm")

    def on_train_batch_end(self, outputs: Any, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """After each optimizer step: log its loss, learning rate, speed and padding as the Fabric loop does."""
        step = self.trainer.global_step
        if step == self._last_step:
            return  # still accumulating
        self._last_step = step
        elapsed = time.perf_counter() - self._started
        self.log("train_loss", self._step_loss, prog_bar=True, logger=False)
        self.log_at_step(step_metrics(self._step_loss.item(), self.lr_schedulers().get_last_lr()[0],
                                      self._tokens * self.trainer.world_size / elapsed, padding_fraction(batch[0]),
                                      self.current_epoch))
        self._reset_step_metrics()
        if self.total_steps is not None and step >= self.total_steps:
            # the last step: stopping here makes the trainer validate once more before it ends
            self.trainer.should_stop = True

    def log_at_step(self, metrics: dict[str, float]) -> None:
        """Log to the trainer's loggers at the step the console and the Fabric loop name: after N optimizer steps, N
        (Lightning's own ``log`` writes one lower)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _reset_step_metrics(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._tokens = 0
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        input_ids, targets = batch
        self._val_losses.append(validation_sums(self.model, input_ids, targets))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.report_validation(sum(self._val_losses, torch.zeros(2, device=self.device)))

    @torch.no_grad()
    def evaluate_base(self) -> None:
        """Validate the base model before the first step (its gates start at zero): where the curves start."""
        totals = torch.zeros(2, device=self.device)
        self.model.eval()
        loader = self.trainer.datamodule.val_dataloader()
        batches = itertools.islice(loader, self.eval_args.max_batches)
        for input_ids, targets in progress(batches, min(len(loader), self.eval_args.max_batches), "validating",
                                           "batch"):
            totals += validation_sums(self.model, input_ids.to(self.device), targets.to(self.device))
        self.model.train()
        self.report_validation(totals)

    def report_validation(self, totals: torch.Tensor) -> None:
        """Log ``val_loss`` (per response token over batches and ranks, as ``fabric_loop.validate``) and, on every
        rank, generate the sample response; print both (with the step, in fit)."""
        val_loss = validation_loss(self.trainer.strategy.reduce(totals, reduce_op="sum"))
        if val_loss is not None:
            self.log("val_loss", val_loss, prog_bar=True, logger=False)
            self.log_at_step({"val_loss": val_loss})
        instruction = self.eval_args.instruction
        response = sample_response(self.model, self.base.tokenizer, instruction, self.eval_args.max_new_tokens,
                                   self.prompt_style)
        step = self.global_step if self.trainer.state.fn == TrainerFn.FITTING else None
        self.print(evaluation_report(step, val_loss, instruction, response))

    # ------------------------------------------------------------------------------------------ files

    def on_train_end(self) -> None:
        """Write the trained adapter (gathered from all ranks) to ``out_dir/adapter.safetensors``."""
        adapter, _ = adapter_and_optimizer_state(self.model, self.trainer.optimizers[0])
        directory = self.out_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            save_adapter(directory / ADAPTER_FILE, self.model, self.model.config, self.prompt_style, state_dict=adapter,
                         name=self.adapter_name, fingerprint=self.base.fingerprint)
        self.trainer.strategy.barrier()
        self.adapter_path = directory / ADAPTER_FILE
        self.print(f"Saved the adapter to {self.adapter_path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter's weights: the frozen base stays in checkpoint_dir."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_param(k)}
        checkpoint["model_config"] = asdict(self.model.config)
        checkpoint["prompt_style"] = self.prompt_style
        checkpoint["base_fingerprint"] = self.base.fingerprint
        checkpoint["run_options"] = self.run_options()
        checkpoint["data_layout"] = self._data_layout()

    def _data_layout(self) -> dict[str, Any]:
        """What the data position of a checkpoint (micro-batches per rank) depends on."""
        datamodule = self.trainer.datamodule
        return {"world_size": self.trainer.world_size,
                "micro_batch_size": getattr(datamodule, "micro_batch_size", None),
                "global_batch_size": getattr(datamodule, "global_batch_size", None),
                "seed": getattr(datamodule, "seed", None)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose adapter does not fit; in fit, make the data continue where the checkpoint left
        it."""
        if "state_dict" in checkpoint:  # (ModelParallelStrategy has loaded and removed it already)
            expected = {name: tuple(p.shape) for name, p in self.named_parameters() if is_adapter_param(name)}
            missing, unexpected, wrong = compare_shapes(expected, shapes_of(checkpoint["state_dict"]))
            shapes = [f"{key} {shape} (expected {wanted})" for key, shape, wanted in wrong]
            if missing or unexpected or shapes:
                raise UserError(f"the checkpoint's weights do not fit this adapter: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if not isinstance(datamodule, InstructionDataModule) or self._trainer.state.fn != TrainerFn.FITTING:
            return
        layout = self._data_layout()
        saved = checkpoint.get("data_layout", layout)
        if saved != layout:
            raise UserError(f"the checkpoint was written with {saved}, but this run has {layout}: resume with the "
                            "same --trainer.devices, --model.train.micro_batch_size and --data.seed")
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        if self._trainer.train_dataloader is not None and progress["processed"]:
            rank_zero_warn("the training data were loaded before the checkpoint, so the resumed epoch starts at its "
                           "beginning (with --trainer.max_steps set, the data continue where they stopped)")
            return
        # the sampler skips this rank's micro-batches done in the checkpoint's epoch, so Lightning's warning that
        # the dataloader cannot resume mid-epoch does not apply
        datamodule.resume_at(checkpoint["epoch"], progress["processed"])
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
