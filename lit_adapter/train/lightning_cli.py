"""The Trainer route's command line (``finetune/adapter_trainer.py`` runs ``main``): ``AdapterCLI`` is a
``LightningCLI`` with the subcommands ``fit`` and ``validate`` (arguments that do not start with one are ``fit``'s);
it builds the ``Trainer`` for ``lightning_module.AdapterModule`` and ``InstructionDataModule`` from the model's
arguments, checks ``--ckpt_path`` before any work, and ends with the shell's exit statuses. It uses LightningCLI's
public hooks only.
"""

import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_adapter.cli import EXIT_INTERRUPTED, check_seed, exit_on_user_error, out_of_memory_hint
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.errors import UserError, message_line
from lit_adapter.files import atomic_path, check_can_create, torch_load
from lit_adapter.precision import PRECISIONS, default_precision
from lit_adapter.train.args import accumulation_steps, check_eval_args, check_train_args, with_defaults
from lit_adapter.train.lightning_module import AdapterModule
from lit_adapter.train.state import is_trainer_checkpoint, log_version
from lit_adapter.train.strategies import trainer_precision, trainer_strategy

TRAINER_PRECISIONS = [name for name, p in PRECISIONS.items() if p.training and p.quantize is None]
"""What --trainer.precision takes; a quantized base is --model.quantized_base, which runs under bf16-true."""


class AdapterCLI(LightningCLI):
    """``LightningCLI`` for ``AdapterModule`` and ``InstructionDataModule`` whose Trainer is set from the model's
    arguments.

    Subcommands: ``fit`` (also when the arguments do not start with a subcommand) and ``validate``; ``run=False``
    only builds the classes. Derived from ``--model.train.*`` / ``--model.eval.*``, and therefore not options of
    their own: the data's micro batch size, gradient accumulation (global_batch_size / (micro_batch_size x
    devices)), the validation interval (eval.interval optimizer steps), ``use_distributed_sampler=False`` (the data
    module deals batches to ranks) and the gradient clipping (train.max_grad_norm). ``--trainer.strategy fsdp`` is
    FSDP2 (``strategies.trainer_strategy``), ``--trainer.precision bf16-true`` keeps the adapter in float32
    (``strategies.trainer_precision``).
    """

    DERIVED_TRAINER_ARGS = {"accumulate_grad_batches", "use_distributed_sampler", "val_check_interval",
                            "gradient_clip_val", "gradient_clip_algorithm"}

    def __init__(self, args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> None:
        self.default_subcommand = "fit" if run else None
        # an option mistake raises (one line from main), the main parser's and each subcommand's
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, **{
            name: {"description": main.__doc__, "exit_on_error": False} for name in self.subcommands()}})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # config.yaml of the run, beside its logs
        super().__init__(AdapterModule, InstructionDataModule, args=args, run=run, auto_configure_optimizers=False,
                         seed_everything_default=1337, trainer_defaults={
                             "default_root_dir": "out/adapter_trainer/alpaca", "num_sanity_val_steps": 0,
                             "check_val_every_n_epoch": None}, **kwargs)

    def _set_seed(self) -> None:
        """Lightning's seeding, after a check of --seed_everything (Lightning raises a ValueError)."""
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            check_seed(seed, "--seed_everything")
        super()._set_seed()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit and validate, with this CLI's own --ckpt_path (checked, read as tensors only) instead of
        the Trainer's --ckpt_path and --weights_only."""
        own = {"ckpt_path", "weights_only"}
        return {name: skip | own for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def parse_arguments(self, parser: LightningArgumentParser, args: Optional[list[str]]) -> None:
        """Parse the command line (arguments that do not start with a subcommand are those of ``fit``), and check
        ``--ckpt_path`` before any work, "last" resolved; the checkpoint's run gives the defaults of the --model and
        --data options, so that ``validate --ckpt_path last`` alone evaluates that run."""
        args = sys.argv[1:] if args is None else args
        if self.default_subcommand and (not args or args[0] not in self.subcommands()):
            args = [self.default_subcommand, *args]
        self.config = parser.parse_args(args)
        config = self.config.get(str(self.config.get("subcommand")), self.config)  # (run=False: no subcommand)
        ckpt_path, saved = resolve_ckpt_path(config.ckpt_path, Path(config.trainer.default_root_dir or "."))
        if saved and self.config.get("subcommand"):  # the run's own options, under the command line's
            self.config = parser.parse_args([args[0], *(f"--{group}={json.dumps(saved[group])}" for group in saved),
                                             *args[1:]])
            config = self.config[self.config.subcommand]
        config.ckpt_path = ckpt_path

    def fit(self, **kwargs: Any) -> None:
        """``Trainer.fit`` from this CLI's --ckpt_path (the subcommand ``fit``); one that ends without training, so
        without an adapter, is an error (a finished run resumed, or --trainer.max_time 0)."""
        self.run_with_exit_statuses(self.trainer.fit, **kwargs)
        if self.model.adapter_path is None:
            raise UserError(f"the Trainer stopped before training (at step {self.trainer.global_step}, its limits "
                            "reached), so no adapter was written: raise --trainer.max_steps, max_epochs or max_time")

    def validate(self, **kwargs: Any) -> None:
        """``Trainer.validate`` of this CLI's --ckpt_path (the subcommand ``validate``)."""
        self.run_with_exit_statuses(self.trainer.validate, **kwargs)

    def run_with_exit_statuses(self, method: Callable, **kwargs: Any) -> None:
        """Run a Trainer method, ending an interrupted run with the shell's statuses (Lightning ends Ctrl-C with 1
        and SIGTERM with 0)."""
        try:
            method(ckpt_path=self.config_init[self.subcommand].ckpt_path, **kwargs)
        except SystemExit as exit:
            if isinstance(exit, SIGTERMException):
                sys.exit(128 + signal.SIGTERM)
            sys.exit(EXIT_INTERRUPTED if self.trainer.state.status == TrainerStatus.INTERRUPTED else exit.code)
        except BaseException:
            self.remove_empty_log_dir()
            raise

    def remove_empty_log_dir(self) -> None:
        """A run that failed leaves no empty log folder behind. The first process looks, without a collective
        (``Trainer.log_dir`` broadcasts): a failure of its own, such as a full disk, leaves the others waiting in
        another one."""
        logger = self.trainer.logger
        log_dir = self.trainer.default_root_dir if logger is None else getattr(logger, "log_dir", logger.save_dir)
        if self.trainer.is_global_zero and log_dir and Path(log_dir).is_dir() and not any(Path(log_dir).iterdir()):
            Path(log_dir).rmdir()

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
                            help="A Lightning checkpoint (a .ckpt of a run's checkpoints/), or last (the newest .ckpt "
                                 "below --trainer.default_root_dir). fit resumes from it (adapter, optimizer, "
                                 "schedule and data position) with the same devices and batch sizes; the learning "
                                 "rate and weight decay may change. validate evaluates its adapter (default: the "
                                 "base model with a fresh adapter, whose zero gates leave the base unchanged).")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer of the command line, with the settings that follow from the model's arguments."""
        config = {**self._get(self.config_init, "trainer", {}), **kwargs}
        fsdp_size = None
        if config.get("strategy") == "fsdp":
            devices = requested_devices(config.get("devices", "auto"), config.get("accelerator", "auto"))
            fsdp_size = devices * config.get("num_nodes", 1)
        overrides = self.derived_trainer_settings(config, fsdp_size)
        try:
            trainer = super().instantiate_trainer(**overrides)
        except (RuntimeError, ValueError, MisconfigurationException) as err:  # e.g. no GPU, or fewer than devices
            raise UserError(f"cannot build the Trainer from the --trainer options: {message_line(err)}") from None
        world_size = trainer.num_devices * trainer.num_nodes
        if fsdp_size not in (None, world_size):
            raise UserError(f"--trainer.devices {config.get('devices')} means {trainer.num_devices} devices here; "
                            "pass their number")
        self.apply_data_defaults(world_size)
        # gradient accumulation and the validation interval (in micro-batches) depend on the number of devices
        accumulate = accumulation_steps(self.model.train_args, world_size)
        trainer.accumulate_grad_batches = accumulate
        trainer.val_check_interval = self.model.eval_args.interval * accumulate
        return trainer

    def apply_data_defaults(self, world_size: int) -> None:
        """The model's options with the defaults that follow from the prepared set (``args.with_defaults``), and
        the data module's global batch with them."""
        data: InstructionDataModule = self.datamodule
        data.setup()
        model: AdapterModule = self.model
        model.train_args, model.eval_args = with_defaults(model.train_args, model.eval_args, len(data.splits["train"]),
                                                          data.sample_instruction, world_size, prefix="model.train.")
        data.global_batch_size = model.train_args.global_batch_size

    def derived_trainer_settings(self, config: dict[str, Any], fsdp_size: Optional[int]) -> dict[str, Any]:
        """The Trainer settings that follow from the model's arguments, checked first (with the --trainer options
        given in ``config``, and the number of processes FSDP shards over if it is the strategy)."""
        train, eval = self.model.train_args, self.model.eval_args
        check_eval_args(eval, prefix="model.eval.")
        check_train_args(train, prefix="model.train.")
        if train.micro_batch_tokens is not None:
            raise UserError("the Trainer accumulates a fixed number of micro-batches: use "
                            "--model.train.micro_batch_size without --model.train.micro_batch_tokens "
                            "(finetune/adapter.py takes both)")
        accumulation_steps(train, 1)  # a bad batch size fails before any process starts
        check_trains_something(config)
        root_dir = config.get("default_root_dir") or "."
        check_can_create(Path(root_dir), "--trainer.default_root_dir")
        overrides: dict[str, Any] = {"use_distributed_sampler": False, "check_val_every_n_epoch": None,
                                     "val_check_interval": eval.interval}
        if config.get("max_steps", -1) == -1 and config.get("max_epochs") is None:
            overrides.update({"max_steps": train.max_steps} if train.max_steps is not None else
                             {"max_epochs": train.epochs})
        defaults = {"limit_val_batches": eval.max_batches, "log_every_n_steps": train.log_interval}
        overrides.update({key: value for key, value in defaults.items() if config.get(key) is None})
        if config.get("logger") in (None, True):
            ckpt_path = self.config_init[self.subcommand].ckpt_path if self.subcommand else None
            overrides["logger"] = TensorBoardLogger(save_dir=root_dir, name="logs", default_hp_metric=False,
                                                    version=log_version(Path(root_dir) / "logs", ckpt_path))
        if fsdp_size is not None:
            overrides["strategy"] = trainer_strategy("fsdp", fsdp_size)
        precision = self.checked_precision(config, self.model.quantized_base)
        if fsdp_size is not None and not PRECISIONS[precision].shardable:
            raise UserError(f"--model.quantized_base {precision} does not shard: use --trainer.strategy auto or ddp")
        overrides.update({"precision": None, **trainer_precision(precision, "cuda" if on_gpu(config) else "cpu")})
        given = config.get("plugins") or []
        overrides["plugins"] = (given if isinstance(given, list) else [given]) + overrides.get("plugins", []) + [
            AtomicCheckpointIO()]
        return overrides

    @staticmethod
    def checked_precision(config: dict[str, Any], quantized_base: Optional[str] = None) -> str:
        """--model.quantized_base, else --trainer.precision or its default; a precision the Trainer route cannot run
        is refused."""
        precision = config.get("precision")
        if quantized_base is not None:
            if precision not in (None, PRECISIONS[quantized_base].lightning):
                raise UserError(f"--model.quantized_base {quantized_base} runs under --trainer.precision "
                                f"{PRECISIONS[quantized_base].lightning}, not {precision}: "
                                "leave --trainer.precision out")
            return quantized_base
        if precision is None:
            precision = default_precision(on_gpu(config))
        if precision not in TRAINER_PRECISIONS:
            raise UserError(f"--trainer.precision {precision} is not supported here: choose one of "
                            f"{', '.join(TRAINER_PRECISIONS)} (a quantized base: --model.quantized_base)")
        return precision


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every file here: complete or not at all, one line on a full disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def on_gpu(config: dict[str, Any]) -> bool:
    """Whether the --trainer options (``config``) run on a GPU."""
    return config.get("accelerator") in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def check_trains_something(config: dict[str, Any]) -> None:
    """Refuse --trainer options that end a fit before its first step (it would write no adapter)."""
    for option in ("max_steps", "max_epochs", "limit_train_batches"):
        if config.get(option) == 0:
            raise UserError(f"--trainer.{option} 0 trains nothing (and writes no adapter): give a positive value, "
                            "or leave it out")


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


def resolve_ckpt_path(ckpt_path: Optional[str], root_dir: Path) -> tuple[Optional[str], dict[str, dict]]:
    """The checkpoint file that ``--ckpt_path`` means, checked before the model is built; only files are read.

    "last" is the newest .ckpt below ``root_dir`` (the runs of --trainer.default_root_dir): none is an error, not a
    fresh start. Directories (distributed checkpoints, whose .metadata is a pickle that could run code), URLs and
    Lightning's other names are refused; a file is loaded as tensors only, so a truncated one or one that carries
    code fails in one line. Also returns the options of the checkpoint's run (``AdapterModule.run_options``).
    """
    if ckpt_path is None:
        return None, {}
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
    if not is_trainer_checkpoint(checkpoint):
        raise UserError(f"--ckpt_path {ckpt_path} is not a checkpoint of finetune/adapter_trainer.py (a training "
                        "state of finetune/adapter.py resumes with finetune/adapter.py --resume)")
    return ckpt_path, checkpoint.get("run_options") or {}


def main(args: Optional[list[str]] = None) -> None:
    """Fine-tune (fit) or validate a LLaMA-Adapter on prepared Alpaca data with the Lightning Trainer (LightningCLI).

    fit trains the same model, loss, optimizer, schedule and adapter files as finetune/adapter.py (Fabric); it is
    also what runs when the arguments do not start with a subcommand. validate prints and logs the validation loss
    (val_loss, over --model.eval.max_batches batches, as fit evaluates) of a checkpoint's adapter (--ckpt_path) or
    of the base model. Example: python finetune/adapter_trainer.py fit --model.checkpoint_dir
    checkpoints/stories260K --data.data_dir data/alpaca --trainer.devices 2 --trainer.strategy fsdp
    --trainer.precision bf16-true --model.train.max_steps 1000; then python finetune/adapter_trainer.py validate
    --ckpt_path last (with the same --model and --data options). --trainer.strategy fsdp is FSDP2 (every block
    sharded; the adapter is gathered to save). --trainer.precision is one of bf16-true (the base stored and run in
    bfloat16, the adapter and its optimizer state in float32; the default on GPUs with bfloat16), bf16-mixed and
    32-true (the default elsewhere); --model.quantized_base nf4-base or fp8-base stores the frozen base in 4 or 8 bits
    (under bf16-true). Gradient accumulation (model.train.global_batch_size / (micro_batch_size x
    devices)), the validation interval (model.eval.interval optimizer steps) and gradient clipping
    (model.train.max_grad_norm) follow from the model's options; left unset, so do --trainer.max_steps or
    --trainer.max_epochs (model.train.max_steps or epochs), --trainer.limit_val_batches (model.eval.max_batches)
    and --trainer.log_every_n_steps (model.train.log_interval). The logger is TensorBoard's, in
    <default_root_dir>/logs. The adapter goes to --model.out_dir (default: the log directory,
    out/adapter_trainer/alpaca/logs/version_N); Lightning checkpoints (adapter and optimizer only) go to its
    checkpoints/, and --ckpt_path resumes from one.
    """
    with exit_on_user_error(out_of_memory_hint("--model.")):
        AdapterCLI(args=args)
