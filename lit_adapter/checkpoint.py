"""Every file name and format on disk: the converted base model directory, adapter-only files, training states
(with their hyperparameters), and the atomic writes they all go through.

A checkpoint directory holds ``model.safetensors`` (base weights), ``model_config.yaml`` and the tokenizer files
(``tokenizer.json`` with ``tokenizer_config.json``, or a SentencePiece ``tokenizer.model``).
Everything we read is safetensors or ``torch.load(weights_only=True)``: a file that carries code is refused.
"""

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Type, Union

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lit_adapter.adapter import AdapterGPT, adapter_state_dict, is_adapter_param
from lit_adapter.config import CONFIG_FILE, Config
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.prompts import PromptStyle, check_prompt_style
from lit_adapter.tokenizer import Tokenizer, TokenizerFiles, save_tokenizer_files, tokenizer_files

WEIGHTS_FILE = "model.safetensors"
ADAPTER_FORMAT = "lit_adapter.adapter/1"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
HPARAMS_FILE = "hyperparameters.yaml"
STEP_DIR = re.compile(r"step-(\d+)$")
RUN_LOCK = ".run.lock"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step, else it is removed.

    A reader therefore sees the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        reason = unwritable_reason(path.parent) or err.strerror
        raise UserError(f"cannot write {path}: {reason}; choose another location") from None
    os.close(fd)
    try:
        with disk_full_is_user_error(path):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; give them the usual mode
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


DISK_FULL_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28", "os error 122")
NEARLY_FULL_BYTES = 1 << 20


@contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``path`` into a one-line ``UserError``."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not ran_out_of_space(err, path.parent):
            raise
        raise UserError(f"cannot write {path}: no space left on device; free some space or choose another location "
                        "(the unfinished file was removed)") from None


def ran_out_of_space(err: Exception, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or EDQUOT, said in the message (safetensors), or a failure of
    torch's zip writer (whose message does not say why) on a disk with (almost) no room left."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(err) for m in DISK_FULL_MESSAGES):
        return True
    return isinstance(err, RuntimeError) and free_bytes(directory) < NEARLY_FULL_BYTES


def free_bytes(directory: Path) -> int:
    """Bytes that this user can still write in ``directory``'s file system."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` in one rename on success (else it is removed).

    ``path`` must be absent or empty: a reader sees no directory or the complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with disk_full_is_user_error(path):
            yield tmp
            os.chmod(tmp, 0o777 & ~current_umask())
            os.replace(tmp, path)  # replaces an empty directory
    except UserError as err:  # name the files where the user will look for them
        raise UserError(str(err).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_can_create(directory: Path, option: str) -> None:
    """Fail before any long work if ``directory`` (given by ``option``) can neither be used nor created.

    Nothing is created here.
    """
    reason = unwritable_reason(directory)
    if reason:
        raise UserError(f"cannot write to {option} {directory}: {reason}; choose another location")


def unwritable_reason(directory: Path) -> Optional[str]:
    """Why files cannot be created in ``directory`` (made if missing), or None where they can be."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_file(path: Path, what: str = "", hint: str = "") -> None:
    """A one-line ``UserError`` unless ``path`` is a file: it is missing, or a directory where a file is expected."""
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise UserError(f"{label} is a directory, expected a file{hint}")
    if not path.is_file():
        raise UserError(f"{label} not found{hint}")


def torch_load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers; pickles that would run code are refused."""
    path = Path(path)
    require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, SafetensorError) as err:
        code = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if code:  # the pickle names a function or class to call: never run it
            raise UserError(f"{path} was refused: it holds more than tensors (loading it would call {code[1]}, "
                            "which can run code); only tensors and plain containers are read") from None
        raise UserError(f"{path} is not a readable torch checkpoint (truncated, corrupt or another format?): "
                        f"{_torch_load_detail(err)}") from None


def _torch_load_detail(err: Exception) -> str:
    """The informative first sentence of a ``torch.load`` error, without its generic advice about ``weights_only``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = next((line for line in lines if not line.startswith(generic)), "empty or unknown content")
    return detail.split(". ")[0].rstrip(".")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read into CPU memory."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """A lazy reader of a safetensors file (``keys()``, ``get_slice(k).get_shape()``, ``get_tensor(k)``, ``metadata()``)."""
    path = Path(path)
    require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors header."""
    with open_safetensors(path) as f:
        return f.metadata() or {}


def save_checkpoint_dir(state_dict: dict[str, torch.Tensor], config: Config,
                        tokenizer: Optional[Path | TokenizerFiles], output_dir: Path) -> None:
    """Write a converted base model: weights, config and (if given) the tokenizer: its files, or a tokenizer file or
    folder whose tokenizer files are copied.

    A new (or empty) ``output_dir`` appears complete or not at all; in a used one, each file is replaced atomically.
    """
    output_dir = Path(output_dir)
    check_can_create(output_dir, "output directory")
    check_state_dict(GPT, config, shapes_of(state_dict), source="converted weights")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        write_checkpoint_files(state_dict, config, tokenizer, output_dir)
        return
    with atomic_dir(output_dir) as tmp:
        write_checkpoint_files(state_dict, config, tokenizer, tmp)


def write_checkpoint_files(state_dict: dict[str, torch.Tensor], config: Config,
                           tokenizer: Optional[Path | TokenizerFiles], directory: Path) -> None:
    """Weights, config and tokenizer into ``directory``, each file atomically."""
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp)
    config.save(directory)
    if tokenizer is not None:
        save_tokenizer_files(tokenizer if isinstance(tokenizer, dict) else tokenizer_files(tokenizer), directory)


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def check_state_dict(model_class: Type[GPT], config: Config, shapes: dict[str, tuple[int, ...]], source: str,
                     only_adapter: bool = False) -> None:
    """Raise a one-line ``UserError`` unless ``shapes`` (name -> shape) has exactly the model's keys and shapes."""
    with torch.device("meta"):
        reference = model_class(config).state_dict()
    reference = {k: tuple(v.shape) for k, v in reference.items() if is_adapter_param(k) == only_adapter}
    missing, unexpected, wrong = compare_shapes(reference, shapes)
    if missing or unexpected:
        raise UserError(f"{source} does not fit the model {config.name or ''}: "
                        f"missing keys [{preview_keys(missing)}], unexpected keys [{preview_keys(unexpected)}]")
    if wrong:
        key, shape, expected = wrong[0]
        raise UserError(f"{source}: {key} has shape {shape}, the model expects {expected}")


ShapeMismatch = tuple[str, tuple[int, ...], tuple[int, ...]]


def compare_shapes(expected: dict[str, tuple[int, ...]],
                   found: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[ShapeMismatch]]:
    """The keys missing from ``found``, those it has in excess, and (key, found shape, expected shape) of the
    common keys whose shapes differ (in ``found``'s order)."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [(key, tuple(shape), tuple(expected[key])) for key, shape in found.items()
             if key in expected and tuple(shape) != tuple(expected[key])]
    return missing, unexpected, wrong


def preview_keys(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys, comma-separated, and how many there are in all when more."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_config(checkpoint_dir: Path) -> Config:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        what = "is a file, not a directory" if checkpoint_dir.exists() else "not found"
        raise UserError(f"checkpoint directory {checkpoint_dir} {what} (create it with scripts/convert_checkpoint.py)")
    return Config.from_file(checkpoint_dir / CONFIG_FILE)


def check_tokenizer_fits(tokenizer: Tokenizer, config: Config) -> None:
    """Refuse a tokenizer with ids the model has no embedding for."""
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model {config.name or ''} knows "
                        f"{config.vocab_size}: put the model's own tokenizer.model in the checkpoint directory")


@dataclass(frozen=True)
class BaseCheckpoint:
    """A converted base model directory, opened once: its config and its tokenizer, checked to fit each other.

    The weights are read when the model is built: ``load_model(base.directory, config=base.config, ...)``.
    """

    directory: Path
    config: Config
    tokenizer: Tokenizer


def open_checkpoint(directory: Path, shape: Callable[[Config], Config] = lambda config: config) -> BaseCheckpoint:
    """Read the config of ``directory`` (changed by ``shape``, e.g. to an adapter's shape) and its tokenizer."""
    config = shape(load_config(directory))
    tokenizer = Tokenizer(directory)
    check_tokenizer_fits(tokenizer, config)
    return BaseCheckpoint(Path(directory), config, tokenizer)


def load_model(checkpoint_dir: Path, adapter: bool = False, config: Optional[Config] = None,
               device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> GPT:
    """The base model of a checkpoint directory (an ``AdapterGPT`` with fresh adapter if ``adapter``).

    The model is created on the meta device, allocated on ``device`` and filled one tensor at a time from
    the safetensors file, so nothing is initialised twice and no second copy of the weights is held. Adapter
    parameters stay float32 whatever ``dtype`` the base gets.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or load_config(checkpoint_dir)
    model_class = AdapterGPT if adapter else GPT
    weights_path = checkpoint_dir / WEIGHTS_FILE
    with torch.device("meta"):
        model = model_class(config)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device or "cpu")
    with open_safetensors(weights_path) as f:
        check_state_dict(model_class, config, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()},
                         source=str(weights_path))
        check_float_dtypes(f, weights_path)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in f.keys():  # one tensor at a time: memory stays at the model's size
                params[key].copy_(f.get_tensor(key))
    model.reset_parameters()
    if adapter:
        with torch.device(model.embed.weight.device):
            model.reset_adapter()
        keep_adapter_float32(model)
    return model


FLOAT_DTYPES = {"F32", "F16", "BF16"}


def check_float_dtypes(f: Any, path: Path) -> None:
    """Refuse a safetensors file (open as ``f``) whose tensors are not float32, float16 or bfloat16."""
    for key in f.keys():
        dtype = f.get_slice(key).get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: {key} is stored as {dtype}, not float32, float16 or bfloat16 (quantized or "
                            "converted by another tool?): convert the weights again with scripts/convert_checkpoint.py")


def keep_adapter_float32(model: nn.Module) -> None:
    """Store the adapter's parameters in float32 (the frozen base may be bf16)."""
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            param.data = param.data.float()


def save_adapter(path: Path, model: Optional[nn.Module], config: Config, prompt_style: PromptStyle = "alpaca",
                 state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the adapter weights (only) as safetensors, with the adapter shape, the base identity and the prompt
    style it was trained with as metadata.

    The weights are ``state_dict`` if given, else taken from ``model``.
    """
    state_dict = adapter_state_dict(model) if state_dict is None else state_dict
    metadata = {
        "format": ADAPTER_FORMAT,
        "base": json.dumps({"name": config.name, **config.base_shape()}),
        "adapter": json.dumps(config.adapter_shape()),
        "prompt_style": check_prompt_style(prompt_style),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=metadata)


def adapter_config(path: Path, base: Config) -> Config:
    """``base`` with the adapter shape recorded in the adapter file at ``path``; a file made for another base is refused."""
    path = Path(path)
    require_file(path, "adapter file")
    if zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable safetensors file but a PyTorch file: for a training state, run "
                        f"scripts/extract_adapter.py --state_path {path} and pass the adapter.safetensors it writes")
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{path} is not a lit_adapter adapter file (no '{ADAPTER_FORMAT}' metadata); "
                        "for a training checkpoint, run scripts/extract_adapter.py first")
    try:
        saved_base, saved_adapter = json.loads(metadata["base"]), json.loads(metadata["adapter"])
        saved_name = saved_base.pop("name", "")
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path} has damaged lit_adapter metadata (no readable 'base' and 'adapter' entries)") from None
    current = base.base_shape()
    diff = {k: (v, current.get(k)) for k, v in saved_base.items() if current.get(k) != v}
    if diff:
        raise UserError(f"{path} was trained for base {saved_name or '?'} but the checkpoint is {base.name or '?'}: "
                        + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
    if set(saved_adapter) != set(base.adapter_shape()) or not all(type(v) is int for v in saved_adapter.values()):
        raise UserError(f"{path}: unexpected adapter metadata {saved_adapter}")
    config = replace(base, **saved_adapter)
    with open_safetensors(path) as f:  # only the header: the declared shape must be the stored one
        check_state_dict(AdapterGPT, config, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()},
                         source=str(path), only_adapter=True)
    return config


def adapter_prompt_style(path: Path) -> PromptStyle:
    """The prompt style an adapter file was trained with (files from before styles existed: alpaca)."""
    style = read_safetensors_metadata(path).get("prompt_style", "alpaca")
    try:
        return check_prompt_style(style)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def read_adapter(model: GPT, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, checked strictly against ``model``: every adapter key, no other, same shapes."""
    state_dict = read_safetensors(path)
    check_state_dict(type(model), model.config, shapes_of(state_dict), source=str(path), only_adapter=True)
    for key, tensor in state_dict.items():
        if not tensor.isfinite().all():
            raise UserError(f"{path}: {key} holds nan or inf values (saved from a diverged training?): use an "
                            "adapter of an earlier step")
    return state_dict


def load_adapter(model: GPT, path: Path) -> None:
    """Load an adapter file into ``model``'s adapter parameters (checked as by ``read_adapter``)."""
    state_dict = read_adapter(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state_dict:
                param.copy_(state_dict[name])


# ---------------------------------------------------------------------------------------------- training states
# finetune/adapter.py writes out_dir/step-NNNNNN/ (STEP_DIR) with the adapter, the hyperparameters and the state
# to resume from; out_dir itself gets the final adapter and hyperparameters, and the RUN_LOCK of the live run.


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


TRAINER_CHECKPOINT_KEYS = {"state_dict", "model_config", "loops"}
"""A Lightning checkpoint of finetune/adapter_trainer.py: Lightning's keys, and the adapter's model config and prompt
style that ``AdapterModule.on_save_checkpoint`` adds (its state_dict holds only the adapter)."""


def is_trainer_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and TRAINER_CHECKPOINT_KEYS <= checkpoint.keys()


def read_state_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict, PromptStyle]:
    """The adapter weights, model config and prompt style of a training state of finetune/adapter.py (its
    training_state.pt) or of a checkpoint of finetune/adapter_trainer.py (states from before prompt styles
    existed: alpaca)."""
    state = torch_load(path)
    if is_trainer_checkpoint(state):
        adapter = {key.removeprefix("model."): value for key, value in state["state_dict"].items()}
    elif isinstance(state, dict) and {"adapter", "model_config"} <= state.keys():
        adapter = state["adapter"]
    else:
        raise UserError(f"{path} is not a training state of finetune/adapter.py nor a checkpoint of "
                        "finetune/adapter_trainer.py (it has no adapter weights and model config)")
    return adapter, state["model_config"], state.get("prompt_style", "alpaca")


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
