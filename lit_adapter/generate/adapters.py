"""Adapters served together on one base model: their names, files and prompt styles, and the model that holds them
all (each row of a batch picks its own, or the base)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from lit_adapter.adapter import AdapterLLaMA
from lit_adapter.checkpoint import (BaseCheckpoint, adapter_config, adapter_name, adapter_prompt_style,
                                    check_adapter_base, check_adapter_name, load_model, read_adapter)
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model import LLaMA
from lit_adapter.precision import PRECISIONS, base_dtype, check_device, default_precision
from lit_adapter.prompts import BASE_MODEL_STYLE


@dataclass(frozen=True)
class AdapterSet:
    """Adapter files served together: a name each (``name=path``, else the name saved in the file, else the file
    name without its suffix), the prompt style each was trained in, and the config of the base with their common
    adapter shape."""

    names: list[str]
    paths: list[Path]
    styles: list[str]
    config: Config

    def index(self, name: Optional[str]) -> Optional[int]:
        """The adapter called ``name`` (None: the base model, which is None too); an unknown name is refused."""
        if name is None:
            return None
        if name not in self.names:
            raise UserError(f"unknown adapter {name!r}; loaded: {', '.join(self.names) or 'none'}")
        return self.names.index(name)

    def prompt_style(self, name: Optional[str], option: Optional[str] = None) -> str:
        """How prompts to adapter ``name`` are written: the ``option`` given, else the style it was trained in, else
        (the base model) ``BASE_MODEL_STYLE``."""
        index = self.index(name)
        return option or (BASE_MODEL_STYLE if index is None else self.styles[index])


def open_adapters(specs: Sequence[str | Path], base: BaseCheckpoint, allow_other_base: bool = False) -> AdapterSet:
    """The adapters of ``specs`` (each ``name=path`` or a path) on ``base``: every file must fit the base (its shape,
    and unless ``allow_other_base`` its fingerprint), and all must share one adapter shape and have different
    names."""
    named = [str(spec).split("=", 1) if "=" in str(spec) else [None, str(spec)] for spec in specs]
    paths = [Path(path) for _, path in named]
    configs = [adapter_config(path, base.config) for path in paths]  # each file checked before its name is read
    if not allow_other_base:
        for path in paths:
            check_adapter_base(path, base)
    names = [check_adapter_name(name) if name else adapter_name(path) or path.stem
             for (name, _), path in zip(named, paths)]
    for path, config in zip(paths[1:], configs[1:]):
        if config.adapter_shape() != configs[0].adapter_shape():
            raise UserError(f"{path} has adapter shape {config.adapter_shape()} but {paths[0]} has "
                            f"{configs[0].adapter_shape()}: adapters served together need the same shape")
    if len(set(names)) < len(names) or not all(names):
        raise UserError(f"adapters served together need different names (the name picks the adapter): "
                        f"{', '.join(names)}; name them with name=path")
    return AdapterSet(names, paths, [adapter_prompt_style(path) for path in paths],
                      configs[0] if configs else base.config)


def load_generation_model(base: BaseCheckpoint, adapters: AdapterSet, device: torch.device,
                          precision: Optional[str] = None) -> LLaMA:
    """The base model in ``precision`` (default: ``precision.default_precision``'s) on ``device``, holding every
    adapter of ``adapters`` (a plain base without any)."""
    precision = precision or default_precision(device.type == "cuda", purpose="generation")
    check_device(precision, device)
    model = load_model(base.directory, adapter=bool(adapters.names), config=adapters.config, device=device,
                       dtype=base_dtype(precision, device.type), quantize=PRECISIONS[precision].quantize)
    if isinstance(model, AdapterLLaMA):
        model.register_adapters([read_adapter(model, path) for path in adapters.paths])
    return model.eval()
