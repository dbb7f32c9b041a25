"""The checkpoint folder and the adapter file: every file that holds a model.

A checkpoint folder (a converted base model) holds ``model.safetensors``, ``model_config.yaml`` (the base
``Config``) and the tokenizer files (``tokenizer.json`` with ``tokenizer_config.json``, or a SentencePiece
``tokenizer.model``). An adapter file holds the adapter's tensors only, with its shape, its base model's shape and
fingerprint (``BaseCheckpoint.fingerprint``) and its prompt style as metadata. Everything read is safetensors or
``torch.load(weights_only=True)``.
"""

import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Type

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lit_adapter.adapter import AdapterConfig, AdapterLLaMA, adapter_state_dict, is_adapter_param
from lit_adapter.config import ROPE_SCALING_PARAMETERS, Config
from lit_adapter.cli import progress
from lit_adapter.errors import UserError
from lit_adapter.files import (atomic_dir, atomic_path, check_can_create, compare_shapes, file_fingerprint,
                               open_safetensors, preview_keys, read_safetensors, read_safetensors_metadata,
                               read_yaml_mapping, require_file, shapes_of, write_yaml)
from lit_adapter.model import Block, LLaMA
from lit_adapter.prompts import LEGACY_STYLE, get_style
from lit_adapter.tokenizer import Tokenizer, TokenizerFiles, tokenizer_files

QUICK_START_CHECKPOINT = Path("quickstart/checkpoints/smollm2-135m-instruct")
"""The checkpoint folder scripts/quickstart.sh writes: every script's default."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
ADAPTER_FORMAT = "lit_adapter.adapter/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")
LEGACY_CONFIG_KEYS = ("adapter_prompt_length", "adapter_start_layer")
"""Keys that model_config.yaml held before the adapter shape left the base config: read and ignored."""


# ---------------------------------------------------------------------------------------------- the checkpoint folder

def read_config(path: Path) -> Config:
    """The base ``Config`` of a ``model_config.yaml`` (or of the one inside a checkpoint folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: a checkpoint directory must hold {CONFIG_FILE} (run "
                        "scripts/convert_checkpoint.py)")
    values = {k: v for k, v in read_yaml_mapping(path).items() if k not in LEGACY_CONFIG_KEYS}
    unknown = sorted(set(values) - {f.name for f in fields(Config)})
    if unknown:
        raise UserError(f"{path}: unknown config keys {unknown}")
    try:
        return Config(**values)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise UserError(f"{path} is not a valid model config: {err}") from None


def save_config(config: Config, directory: Path) -> None:
    """Write the base shape of ``config`` as ``model_config.yaml`` into ``directory``, atomically. Without RoPE
    scaling, the scaling's parameters are left out: they mean nothing then."""
    values = asdict(config.base() if isinstance(config, AdapterConfig) else config)
    if config.rope_scaling_factor is None:
        for key in ROPE_SCALING_PARAMETERS:
            del values[key]
    write_yaml(Path(directory) / CONFIG_FILE, values)


def load_config(checkpoint_dir: Path) -> Config:
    """The base config of a checkpoint folder, which must exist."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        what = "is a file, not a directory" if checkpoint_dir.exists() else "not found"
        raise UserError(f"checkpoint directory {checkpoint_dir} {what} (create it with scripts/convert_checkpoint.py)")
    return read_config(checkpoint_dir / CONFIG_FILE)


def save_checkpoint_dir(state_dict: dict[str, torch.Tensor], config: Config,
                        tokenizer: Optional[Path | TokenizerFiles], output_dir: Path) -> None:
    """Write a converted base model: weights, config and (if given) the tokenizer: its files, or a tokenizer file or
    folder whose tokenizer files are copied.

    A new (or empty) ``output_dir`` appears complete or not at all; in a used one, each file is replaced atomically.
    """
    output_dir = Path(output_dir)
    check_can_create(output_dir, "output directory")
    check_state_dict(LLaMA, config, shapes_of(state_dict), source="converted weights")
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
    save_config(config, directory)
    if tokenizer is not None:
        save_tokenizer_files(tokenizer if isinstance(tokenizer, dict) else tokenizer_files(tokenizer), directory)


def save_tokenizer_files(files: TokenizerFiles, output_dir: Path) -> None:
    """Copy or write the tokenizer files into a converted checkpoint directory, each atomically."""
    for name, source in files.items():
        destination = Path(output_dir) / name
        if isinstance(source, Path) and destination.exists() and destination.samefile(source):
            continue
        with atomic_path(destination) as tmp:
            if isinstance(source, Path):
                shutil.copyfile(source, tmp)
            else:
                tmp.write_bytes(source.encode() if isinstance(source, str) else source)


def check_state_dict(model_class: Type[LLaMA], config: Config, shapes: dict[str, tuple[int, ...]], source: str,
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


def check_tokenizer_fits(tokenizer: Tokenizer, config: Config) -> None:
    """Refuse a tokenizer of another vocabulary size than the model's, as conversion does: with more tokens, some
    have no embedding; with fewer, the model can generate ids that the tokenizer cannot decode."""
    if tokenizer.vocab_size != config.vocab_size:
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

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """What tells this base model from another of its shape (Llama-2-7B from Llama-2-7B-chat): a hash of its
        weights (the first row of every tensor, rounded to bfloat16, so that a conversion to another float dtype
        keeps it) and one of its tokenizer file. Adapters record it; ``check_adapter_base`` compares it."""
        weights = hashlib.sha256()
        with open_safetensors(self.directory / WEIGHTS_FILE) as f:
            for key in sorted(f.keys()):
                tensor = f.get_slice(key)
                first_row = tensor[:1] if len(tensor.get_shape()) > 1 else tensor[:]
                weights.update(key.encode() + first_row.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        return {"weights": weights.hexdigest()[:16], "tokenizer": file_fingerprint(self.tokenizer.path)["sha256"][:16]}


def open_checkpoint(directory: Path, shape: Callable[[Config], Config] = lambda config: config) -> BaseCheckpoint:
    """Read the config of ``directory`` (changed by ``shape``, e.g. to an adapter's shape) and its tokenizer."""
    config = shape(load_config(directory))
    tokenizer = Tokenizer(directory)
    check_tokenizer_fits(tokenizer, config)
    return BaseCheckpoint(Path(directory), config, tokenizer)


def load_model(checkpoint_dir: Path, adapter: bool = False, config: Optional[Config] = None,
               device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
               quantize: Optional[Callable[[nn.Module], int]] = None) -> LLaMA:
    """The base model of a checkpoint directory (an ``AdapterLLaMA`` with fresh adapter if ``adapter``), its
    blocks' frozen linear layers stored by ``quantize`` if given (``precision.Precision.quantize``).

    The tensors are read one at a time from the memory-mapped safetensors file into a model built part by part
    (``build_model``): nothing is initialised twice, no second copy of the weights is held, and a quantized base
    never sits whole on ``device`` in ``dtype``. Adapter parameters stay float32 whatever ``dtype`` the base gets.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or load_config(checkpoint_dir)
    model_class = AdapterLLaMA if adapter else LLaMA
    weights_path = checkpoint_dir / WEIGHTS_FILE
    with open_safetensors(weights_path) as f:
        # the config's sizes are checked against the stored tensors before anything is allocated
        stored = set(f.keys())
        check_state_dict(model_class, config, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()},
                         source=str(weights_path))
        check_float_dtypes(f, weights_path)
        with progress(None, len(stored), f"loading {checkpoint_dir.name}", "tensor") as bar:
            def fill(prefix: str, part: nn.Module) -> None:
                for key, param in part.named_parameters(prefix):
                    if key in stored:
                        param.copy_(f.get_tensor(key))
                        bar.update()

            return build_model(config, adapter, device or "cpu", dtype, fill, quantize)


def build_model(config: Config, adapter: bool, device: torch.device | str, dtype: Optional[torch.dtype],
                fill: Callable[[str, nn.Module], None],
                quantize: Optional[Callable[[nn.Module], int]] = None) -> LLaMA:
    """A model created on the meta device, then allocated on ``device`` one part at a time, each part filled by
    ``fill(prefix, part)`` (``prefix``: the part's name in the model's state dict): everything outside the blocks
    first, then block by block, each block's frozen linear layers stored by ``quantize`` before the next block is
    allocated. The adapter (if ``adapter``) is fresh and float32."""
    with torch.device("meta"):
        model = (AdapterLLaMA if adapter else LLaMA)(config)
    if dtype is not None:
        model.to(dtype)
    parts = [(name, child) for name, child in model.named_children() if name != "blocks"]
    with torch.no_grad():
        for prefix, part in parts + [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]:
            part.to_empty(device=device)
            fill(prefix, part)
            if quantize is not None and isinstance(part, Block):
                quantize(part)
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


# ---------------------------------------------------------------------------------------------- the adapter file

def save_adapter(path: Path, model: Optional[nn.Module], config: Config, prompt_style: str = LEGACY_STYLE,
                 state_dict: Optional[dict[str, torch.Tensor]] = None, name: Optional[str] = None,
                 fingerprint: Optional[dict[str, str]] = None) -> None:
    """Write the adapter weights (only) as safetensors, with the adapter shape, the base identity (its shape and
    ``fingerprint``, if known), the prompt style it was trained with and its ``name`` (if given) as metadata.

    The weights are ``state_dict`` if given, else taken from ``model``.
    """
    state_dict = adapter_state_dict(model) if state_dict is None else state_dict
    config = AdapterConfig.of(config)  # a base config: the default adapter shape
    metadata = {
        "format": ADAPTER_FORMAT,
        "base": json.dumps({"name": config.name, **config.base_shape()}),
        "adapter": json.dumps(config.adapter_shape()),
        "prompt_style": get_style(prompt_style).name,
        **({"name": check_adapter_name(name)} if name else {}),
        **({"base_fingerprint": json.dumps(fingerprint)} if fingerprint else {}),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=metadata)


def check_adapter_name(name: str) -> str:
    """``name`` if it can name an adapter (letters, digits, '.', '_', '-'), else a one-line ``UserError``."""
    if not ADAPTER_NAME.fullmatch(name):
        raise UserError(f"the adapter name {name!r} may hold only letters, digits, '.', '_' and '-'")
    return name


def adapter_name(path: Path) -> Optional[str]:
    """The name an adapter file was saved under (None for files from before names were recorded)."""
    return read_safetensors_metadata(path).get("name")


def adapter_config(path: Path, base: Config) -> AdapterConfig:
    """``base`` with the adapter shape recorded in the adapter file at ``path``; a file made for another base is
    refused."""
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
    except (KeyError, ValueError, AttributeError, RecursionError):
        raise UserError(f"{path} has damaged lit_adapter metadata (no readable 'base' and 'adapter' entries)") from None
    current = base.base_shape()
    diff = {k: (v, current.get(k)) for k, v in saved_base.items() if current.get(k) != v}
    if diff:
        raise UserError(f"{path} was trained for base {saved_name or '?'} but the checkpoint is {base.name or '?'}: "
                        + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
    if not isinstance(saved_adapter, dict) or set(saved_adapter) != set(LEGACY_CONFIG_KEYS):
        raise UserError(f"{path}: unexpected adapter metadata {saved_adapter}")
    try:
        config = AdapterConfig.of(base, **saved_adapter)
    except UserError as err:
        raise UserError(f"{path}: unexpected adapter metadata {saved_adapter} ({err})") from None
    with open_safetensors(path) as f:  # only the header: the declared shape must be the stored one
        check_state_dict(AdapterLLaMA, config, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()},
                         source=str(path), only_adapter=True)
    return config


def check_adapter_base(path: Path, base: BaseCheckpoint) -> None:
    """Refuse an adapter file trained on another base of the same shape (its recorded fingerprint differs from
    ``base``'s; files from before fingerprints were recorded are not checked)."""
    metadata = read_safetensors_metadata(path)
    if "base_fingerprint" not in metadata:
        return
    current = base.fingerprint
    try:
        saved = json.loads(metadata["base_fingerprint"])
        differing = [part for part, value in current.items() if saved[part] != value]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UserError(f"{path} has damaged lit_adapter metadata (an unreadable 'base_fingerprint')") from None
    if differing:
        raise UserError(f"{path} was trained on another base than {base.directory}: "
                        + ", ".join(f"{part} fingerprint {saved[part]} vs {current[part]}" for part in differing)
                        + " (same shape, other weights or tokenizer): use the base it was trained on, or pass "
                          "--allow_other_base true to use it anyway")


def adapter_prompt_style(path: Path) -> str:
    """The name of the prompt style an adapter file was trained with (files from before styles: the legacy style)."""
    try:
        return get_style(read_safetensors_metadata(path).get("prompt_style")).name
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def read_adapter(model: LLaMA, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, checked strictly against ``model``: every adapter key, no other, same shapes."""
    state_dict = read_safetensors(path)
    check_state_dict(type(model), model.config, shapes_of(state_dict), source=str(path), only_adapter=True)
    for key, tensor in state_dict.items():
        if not tensor.isfinite().all():
            raise UserError(f"{path}: {key} holds nan or inf values (saved from a diverged training?): use an "
                            "adapter of an earlier step")
    return state_dict


def load_adapter(model: LLaMA, path: Path) -> None:
    """Load an adapter file into ``model``'s adapter parameters (checked as by ``read_adapter``)."""
    state_dict = read_adapter(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state_dict:
                param.copy_(state_dict[name])
