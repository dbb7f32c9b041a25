"""The Trainer route: ``AdapterModule`` drives the shared ``recipe`` (model preparation, loss, optimizer, schedule,
accumulation, sample response) for the Lightning ``Trainer``; ``AdapterCLI`` runs it with ``data.AlpacaDataModule``
from the command line (``finetune/adapter_trainer.py``). Nothing here trains differently from the Fabric loop.
"""

import math
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, get_args

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_adapter.adapter import AdapterGPT, is_adapter_param, num_trainable_params
from lit_adapter.checkpoint import (ADAPTER_FILE, BaseCheckpoint, adapter_and_optimizer_state, atomic_path,
                                    check_can_create, compare_shapes, load_model, open_checkpoint, save_adapter,
                                    shapes_of, torch_load)
from lit_adapter.cli import EXIT_INTERRUPTED, exit_on_user_error
from lit_adapter.data import IGNORE_INDEX, AlpacaDataModule, padding_fraction
from lit_adapter.errors import UserError
from lit_adapter.precision import TrainingPrecision, base_dtype, default_precision
from lit_adapter.prompts import PromptStyle
from lit_adapter.recipe import (AdapterArgs, EvalArgs, TrainArgs, accumulation_steps, adopt_hyperparameters,
                                build_optimizer, build_scheduler, check_data_fits, check_enough_samples,
                                check_train_args, loss_fn, prepare_for_training, resumed_message, sample_response)
from lit_adapter.strategies import trainer_precision, trainer_strategy


OUT_OF_MEMORY_HINT = ("lower --model.train.micro_batch_size (the global batch stays the same), or use "
                      "--trainer.precision bf16-true, --model.activation_checkpointing true, or --trainer.strategy "
                      "fsdp over more devices")


class AdapterModule(L.LightningModule):
    """A LLaMA-Adapter on a frozen base model, trained with the loss, optimizer and schedule of ``recipe``.

    The base is loaded in ``configure_model`` (on the strategy's device, in the precision's dtype, sharded with
    FSDP2 under ``ModelParallelStrategy``); only the adapter's prompts and gates train and only they are written
    to Lightning checkpoints. At the end of training the adapter goes to ``out_dir/adapter.safetensors``.
    """

    def __init__(self, checkpoint_dir: Path = Path("checkpoints/stories260K"), out_dir: Optional[Path] = None,
                 compile: Optional[bool] = None, activation_checkpointing: bool = False,
                 adapter: AdapterArgs = AdapterArgs(), train: TrainArgs = TrainArgs(),
                 eval: EvalArgs = EvalArgs()) -> None:
        """
        Args:
            checkpoint_dir: Converted base model (scripts/convert_checkpoint.py): model.safetensors,
                model_config.yaml, tokenizer.model.
            out_dir: Where the trained adapter.safetensors goes at the end (default: the trainer's log directory,
                e.g. out/adapter_trainer/alpaca/logs/version_0).
            compile: Compile each transformer block with torch.compile (default: on GPU).
            activation_checkpointing: Recompute each block's activations in the backward pass (less memory, slower).
            adapter: The adapter's shape: prompt vectors per layer and the first adapted layer.
            train: Optimisation hyperparameters. The trainer's gradient accumulation is
                global_batch_size / (micro_batch_size x devices), its gradient clipping max_grad_norm.
            eval: Validation settings (every eval.interval optimizer steps and at the end).
        """
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.adapter_args = adapter
        self.train_args = train
        self.eval_args = eval
        # plain types only, so that a checkpoint loads with torch.load(weights_only=True)
        self.save_hyperparameters({
            "checkpoint_dir": str(self.checkpoint_dir), "out_dir": None if out_dir is None else str(out_dir),
            "compile": compile, "activation_checkpointing": activation_checkpointing,
            "adapter": asdict(adapter), "train": asdict(train), "eval": asdict(eval)})
        # checkpoints hold the adapter only: the frozen base comes from checkpoint_dir (see on_load_checkpoint)
        self.strict_loading = False
        self.model: Optional[AdapterGPT] = None
        self._base: Optional[BaseCheckpoint] = None
        self.train_loss_fn = loss_fn  # compiled in configure_model where asked
        self.total_steps: Optional[int] = None
        self._last_step = 0
        self._step_loss = torch.zeros(())
        self._reset_step_metrics()
        self._val_losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------ the model

    def configure_model(self) -> None:
        """Load the base with a fresh adapter (zero gates), freeze the base, compile and shard as asked."""
        if self.model is not None:
            return
        trainer = self._trainer
        dtype = base_dtype(trainer.precision) if trainer is not None else torch.float32
        root_device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        sharded = self.device_mesh is not None
        # FSDP: every rank loads the (memory-mapped) base on the CPU and keeps only its shard
        model = load_model(self.checkpoint_dir, adapter=True, config=self.base.config, device="cpu" if sharded else root_device,
                           dtype=dtype)
        compile = self.compile_blocks if self.compile_blocks is not None else root_device.type == "cuda"
        self.train_loss_fn = prepare_for_training(model, compile, self.activation_checkpointing)
        if sharded:
            from lit_adapter.strategies import shard_model

            shard_model(model, self.device_mesh)
        self.model = model
        self.print(f"{num_trainable_params(model):,} trainable adapter parameters "
                   f"({model.config.n_adapter_layers} layers x {model.config.adapter_prompt_length} prompts + gates)")

    def setup(self, stage: str) -> None:
        """Check, before any work, that the data fits the model and that the output directory is writable."""
        base = self.base
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, AlpacaDataModule):
            datamodule.setup(stage)
            check_data_fits(datamodule, base.tokenizer, base.config)
            check_enough_samples(datamodule, self.train_args.global_batch_size, "--model.train.global_batch_size")
        if self.out_dir is not None:
            check_can_create(self.out_dir, "--model.out_dir")

    @property
    def base(self) -> BaseCheckpoint:
        """The base checkpoint directory, opened once: its config with this adapter's shape, and its tokenizer."""
        if self._base is None:
            self._base = open_checkpoint(self.checkpoint_dir, self.adapter_args.apply)
        return self._base

    @property
    def prompt_style(self) -> PromptStyle:
        """The prompt style of the prepared data (alpaca without a data module)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return datamodule.prompt_style if isinstance(datamodule, AlpacaDataModule) else "alpaca"

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
        """One micro-batch's part of the step loss (as ``training.accumulate_gradients``), scaled up by the
        accumulation and the world size that the trainer and DDP/FSDP divide by."""
        [(input_ids, targets)], step_tokens = batch
        loss = self.train_loss_fn(self.model(input_ids), targets, "sum") / step_tokens
        self._loss_sum += loss.detach()
        self._tokens += input_ids.numel()
        return loss * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_train_start(self) -> None:
        """Reset the step metrics; a resumed run takes this run's learning rate and weight decay (and says so)."""
        self._reset_step_metrics()
        self._last_step = self.trainer.global_step
        if self.trainer.ckpt_path is not None:
            changes = adopt_hyperparameters(self.trainer.optimizers[0], self.lr_schedulers(), self.train_args)
            self.print(resumed_message(Path(self.trainer.ckpt_path), self.global_step, changes))

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
        self.log("train_loss", self._step_loss, prog_bar=True)
        self.log_dict({"learning_rate": self.lr_schedulers().get_last_lr()[0],
                       "tokens_per_s": self._tokens * self.trainer.world_size / elapsed,
                       "padding_fraction": padding_fraction(batch[0])})
        self._reset_step_metrics()
        if self.total_steps is not None and step >= self.total_steps:
            # the last step: stopping here makes the trainer validate once more before it ends
            self.trainer.should_stop = True

    def _reset_step_metrics(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._tokens = 0
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        input_ids, targets = batch
        self._val_losses.append(torch.stack([loss_fn(self.model(input_ids), targets, "sum"),
                                             (targets != IGNORE_INDEX).sum().float()]))

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` (per response token over batches and ranks, as ``training.validate``) and, on every
        rank, generate the sample response."""
        totals = sum(self._val_losses, torch.zeros(2, device=self.device))
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        val_loss = totals[0] / totals[1]
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        instruction = self.eval_args.instruction
        response = sample_response(self.model, self.base.tokenizer, instruction, self.eval_args.max_new_tokens,
                                   self.prompt_style)
        self.print(f"\nstep {self.global_step}: val loss {val_loss.item():.4f}\n{instruction}\n> {response}")

    # ------------------------------------------------------------------------------------------ files

    def on_train_end(self) -> None:
        """Write the trained adapter (gathered from all ranks) to ``out_dir/adapter.safetensors``."""
        adapter, _ = adapter_and_optimizer_state(self.model, self.trainer.optimizers[0])
        directory = self.out_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            save_adapter(directory / ADAPTER_FILE, self.model, self.model.config, self.prompt_style, state_dict=adapter)
        self.trainer.strategy.barrier()
        self.print(f"Saved the adapter to {directory / ADAPTER_FILE}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter's weights: the frozen base stays in checkpoint_dir."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_param(k)}
        checkpoint["model_config"] = asdict(self.model.config)
        checkpoint["data_layout"] = self._data_layout()

    def _data_layout(self) -> dict[str, Any]:
        """What the data position of a checkpoint (micro-batches per rank) depends on."""
        datamodule = self.trainer.datamodule
        return {"world_size": self.trainer.world_size,
                "micro_batch_size": getattr(datamodule, "micro_batch_size", None),
                "global_batch_size": getattr(datamodule, "global_batch_size", None),
                "seed": getattr(datamodule, "seed", None)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose adapter does not fit; make the data continue where the checkpoint left it."""
        if "state_dict" in checkpoint:  # (ModelParallelStrategy has loaded and removed it already)
            expected = {name: tuple(p.shape) for name, p in self.named_parameters() if is_adapter_param(name)}
            missing, unexpected, wrong = compare_shapes(expected, shapes_of(checkpoint["state_dict"]))
            shapes = [f"{key} {shape} (expected {wanted})" for key, shape, wanted in wrong]
            if missing or unexpected or shapes:
                raise UserError(f"the checkpoint's weights do not fit this adapter: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if not isinstance(datamodule, AlpacaDataModule):
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


class AdapterCLI(LightningCLI):
    """``LightningCLI`` for ``AdapterModule`` and ``AlpacaDataModule`` whose Trainer is set from the model's arguments.

    Derived from ``--model.train.*`` / ``--model.eval.*``, and therefore not options of their own: the data's micro
    batch size, gradient accumulation (global_batch_size / (micro_batch_size x devices)), the validation interval
    (eval.interval optimizer steps), ``use_distributed_sampler=False`` (the data module deals batches to ranks) and
    the gradient clipping (train.max_grad_norm). ``--trainer.strategy fsdp`` is FSDP2
    (``strategies.trainer_strategy``), ``--trainer.precision bf16-true`` keeps the adapter in float32
    (``strategies.trainer_precision``).
    """

    DERIVED_TRAINER_ARGS = {"accumulate_grad_batches", "use_distributed_sampler", "val_check_interval",
                            "gradient_clip_val", "gradient_clip_algorithm"}

    def __init__(self, args: Optional[list[str]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"description": main.__doc__})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # config.yaml of the run, beside its logs
        super().__init__(AdapterModule, AlpacaDataModule, args=args, run=False, auto_configure_optimizers=False,
                         seed_everything_default=1337, trainer_defaults={
                             "default_root_dir": "out/adapter_trainer/alpaca", "num_sanity_val_steps": 0,
                             "check_val_every_n_epoch": None}, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # as LightningCLI does, less the Trainer options that are derived from the model's arguments
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=self.DERIVED_TRAINER_ARGS)
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()})
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_lightning_class_args(self._datamodule_class, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.train.micro_batch_size", "data.micro_batch_size")
        parser.link_arguments("model.train.global_batch_size", "data.global_batch_size")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume from this Lightning checkpoint (a .ckpt of a run's checkpoints/: adapter, "
                                 "optimizer, schedule and data position), or last (the newest .ckpt below "
                                 "--trainer.default_root_dir), with the same devices and batch sizes; the learning "
                                 "rate and weight decay may change.")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer of the command line, with the settings that follow from the model's arguments."""
        config = {**self.config_init.get("trainer", {}), **kwargs}
        model: AdapterModule = self.model
        train, eval = model.train_args, model.eval_args
        if eval.interval < 1 or eval.max_batches < 1:
            raise UserError("model.eval.interval and model.eval.max_batches must be at least 1")
        check_train_args(train, prefix="model.train.")
        if train.micro_batch_tokens is not None:
            raise UserError("the Trainer accumulates a fixed number of micro-batches: use --model.train.micro_batch_size "
                            "without --model.train.micro_batch_tokens (finetune/adapter.py takes both)")
        accumulation_steps(train, 1)  # a bad batch size fails before any process starts
        check_can_create(Path(config.get("default_root_dir") or "."), "--trainer.default_root_dir")
        overrides: dict[str, Any] = {"use_distributed_sampler": False, "check_val_every_n_epoch": None,
                                     "val_check_interval": eval.interval}
        if config.get("max_steps", -1) == -1 and config.get("max_epochs") is None:
            if train.max_steps is not None:
                overrides["max_steps"] = train.max_steps
            else:
                overrides["max_epochs"] = train.epochs
        if config.get("limit_val_batches") is None:
            overrides["limit_val_batches"] = eval.max_batches
        if config.get("log_every_n_steps") is None:
            overrides["log_every_n_steps"] = train.log_interval
        if config.get("logger") in (None, True):
            overrides["logger"] = TensorBoardLogger(save_dir=config.get("default_root_dir") or ".", name="logs")
        fsdp_size = None
        if config.get("strategy") == "fsdp":
            devices = requested_devices(config.get("devices", "auto"), config.get("accelerator", "auto"))
            fsdp_size = devices * config.get("num_nodes", 1)
            overrides["strategy"] = trainer_strategy("fsdp", fsdp_size)
        precision = config.get("precision")
        if precision is None:
            precision = default_precision(config.get("accelerator") in ("auto", "gpu", "cuda")
                                          and torch.cuda.is_available())
        if precision not in get_args(TrainingPrecision) or precision == "fp8-base":
            raise UserError(f"--trainer.precision {precision} is not supported here: choose one of "
                            f"{', '.join(p for p in get_args(TrainingPrecision) if p != 'fp8-base')} (fp8-base: "
                            "finetune/adapter.py)")
        overrides.update({"precision": None, **trainer_precision(precision)})
        overrides["plugins"] = overrides.get("plugins", []) + [AtomicCheckpointIO()]
        if config.get("plugins"):
            plugins = config["plugins"]
            overrides["plugins"] = (plugins if isinstance(plugins, list) else [plugins]) + overrides["plugins"]
        try:
            trainer = super().instantiate_trainer(**overrides)
        except (RuntimeError, ValueError, MisconfigurationException) as err:  # e.g. no GPU, or fewer than devices
            detail = str(err).strip().splitlines()[0]
            raise UserError(f"cannot build the Trainer from the --trainer options: {detail}") from None
        world_size = trainer.num_devices * trainer.num_nodes
        if fsdp_size not in (None, world_size):
            raise UserError(f"--trainer.devices {config.get('devices')} means {trainer.num_devices} devices here; "
                            "pass their number")
        # gradient accumulation and the validation interval (in micro-batches) depend on the number of devices
        accumulate = accumulation_steps(train, world_size)
        trainer.accumulate_grad_batches = accumulate
        trainer.val_check_interval = eval.interval * accumulate
        return trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every file here: complete or not at all, one line on a full disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def requested_devices(devices: Any, accelerator: Any) -> int:
    """How many devices on each node ``--trainer.devices`` asks for (a number, a list of indices, or "auto")."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        gpus = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpus else 1
    if "," in text:
        return len([index for index in text.split(",") if index.strip()])
    return int(text)


def resolve_ckpt_path(ckpt_path: Optional[str], root_dir: Path) -> Optional[str]:
    """The checkpoint file that ``--ckpt_path`` means, checked before the model is built; only files are read.

    "last" is the newest .ckpt below ``root_dir`` (the runs of --trainer.default_root_dir): none is an error, not a
    fresh start. Directories (distributed checkpoints, whose .metadata is a pickle that could run code), URLs and
    Lightning's other names are refused; a file is loaded as tensors only, so a truncated one or one that carries
    code fails in one line.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = sorted(root_dir.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"--ckpt_path last: no checkpoint (.ckpt) below {root_dir}; pass one, or leave "
                            "--ckpt_path out to start afresh")
        ckpt_path = str(found[-1])
    path = Path(ckpt_path)
    if path.is_dir():
        raise UserError(f"--ckpt_path {ckpt_path} is a directory (a distributed checkpoint?): only single .ckpt files "
                        "are read, as tensors (a distributed checkpoint's .metadata is a pickle that can run code)")
    if not path.is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file (pass a .ckpt from the checkpoints/ "
                        "directory of an earlier run, or last)")
    checkpoint = torch_load(path)  # a one-line error for a truncated file or a pickle that would run code
    if not isinstance(checkpoint, dict) or not {"state_dict", "model_config", "loops"} <= checkpoint.keys():
        raise UserError(f"--ckpt_path {ckpt_path} is not a checkpoint of finetune/adapter_trainer.py (a training "
                        "state of finetune/adapter.py resumes with finetune/adapter.py --resume)")
    return ckpt_path


def main(args: Optional[list[str]] = None) -> None:
    """Fine-tune a LLaMA-Adapter on prepared Alpaca data with the Lightning Trainer (LightningCLI).

    The same model, loss, optimizer, schedule and adapter files as finetune/adapter.py (Fabric). Example:
    python finetune/adapter_trainer.py --model.checkpoint_dir checkpoints/stories260K --data.data_dir data/alpaca
    --trainer.devices 2 --trainer.strategy fsdp --trainer.precision bf16-true --model.train.max_steps 1000.
    --trainer.strategy fsdp is FSDP2 (every block sharded; the adapter is gathered to save). --trainer.precision is
    one of bf16-true (the base stored and run in bfloat16, the adapter and its optimizer state in float32; the
    default on GPUs with bfloat16), bf16-mixed and 32-true (the default elsewhere). Gradient accumulation
    (model.train.global_batch_size / (micro_batch_size x devices)), the validation interval (model.eval.interval
    optimizer steps) and gradient clipping (model.train.max_grad_norm) follow from the model's options; left
    unset, so do --trainer.max_steps or --trainer.max_epochs (model.train.max_steps or epochs),
    --trainer.limit_val_batches (model.eval.max_batches) and --trainer.log_every_n_steps (model.train.log_interval).
    The logger is TensorBoard's, in <default_root_dir>/logs. The adapter goes to --model.out_dir (default: the log
    directory, out/adapter_trainer/alpaca/logs/version_N); Lightning checkpoints (adapter and optimizer only) go to
    its checkpoints/, and --ckpt_path resumes from one.
    """
    with exit_on_user_error(OUT_OF_MEMORY_HINT):
        cli = AdapterCLI(args=args)
        ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), Path(cli.trainer.default_root_dir))
        try:
            cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
        except SystemExit as exit:  # Lightning ends Ctrl-C with 1 and SIGTERM with 0: the shell's statuses instead
            if isinstance(exit, SIGTERMException):
                sys.exit(128 + signal.SIGTERM)
            sys.exit(EXIT_INTERRUPTED if cli.trainer.state.status == TrainerStatus.INTERRUPTED else exit.code)
