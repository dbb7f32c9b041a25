"""Model hyperparameters and the named presets (LLaMA, Llama 2, TinyStories, a tiny test model)."""

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from lit_adapter.errors import UserError

CONFIG_FILE = "model_config.yaml"


@dataclass(frozen=True)
class Config:
    """The shape of a LLaMA model and of its LLaMA-Adapter."""

    name: str = ""
    block_size: int = 2048
    """Longest sequence the model is used with (rotary cache length)."""
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    n_embd: int = 4096
    intermediate_size: int = 11008
    """Hidden width of the SwiGLU MLP."""
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    """Whether the output head reuses the token embedding matrix."""
    adapter_prompt_length: int = 10
    """Learnable prompt vectors per adapted layer."""
    adapter_start_layer: int = 2
    """First layer that gets adaption prompts (the top n_layer - adapter_start_layer layers do)."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise UserError(f"the head size n_embd / n_head = {self.n_embd} / {self.n_head} = "
                            f"{self.n_embd // self.n_head} must be even (rotary embeddings turn pairs of values)")
        if self.adapter_prompt_length < 1:
            raise UserError(f"adapter_prompt_length ({self.adapter_prompt_length}) must be at least 1")
        if not 0 <= self.adapter_start_layer <= self.n_layer:
            raise UserError(f"adapter_start_layer ({self.adapter_start_layer}) must lie in [0, n_layer={self.n_layer}]")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_adapter_layers(self) -> int:
        return self.n_layer - self.adapter_start_layer

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """The named preset, with any field replaced by ``overrides``."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_file(cls, path: Path) -> "Config":
        """Read a ``model_config.yaml`` (or the one inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"{path} not found: a checkpoint directory must hold {CONFIG_FILE} (run scripts/convert_checkpoint.py)")
        values = read_yaml_mapping(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{path}: unknown config keys {unknown}")
        try:
            return cls(**values)
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
            raise UserError(f"{path} is not a valid model config: {err}") from None

    def save(self, directory: Path) -> None:
        """Write this config as ``model_config.yaml`` into ``directory`` (atomically)."""
        from lit_adapter.checkpoint import atomic_path  # checkpoint imports this module

        with atomic_path(Path(directory) / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    def base_shape(self) -> dict:
        """The fields that tell base models apart (used to match adapters to bases): shapes and numerics."""
        keys = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "tie_embeddings",
                "norm_eps", "rope_base")
        return {k: getattr(self, k) for k in keys}

    def adapter_shape(self) -> dict:
        """The fields that define the adapter's parameters."""
        return {"adapter_prompt_length": self.adapter_prompt_length, "adapter_start_layer": self.adapter_start_layer}


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file (plain YAML only: tags that would build objects are refused), or a ``UserError``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a YAML file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path} is not a readable plain-YAML file ({detail})") from None
    if not isinstance(values, dict):
        what = "empty" if values is None else f"a YAML {type(values).__name__}"
        raise UserError(f"{path} is {what}, expected a mapping of keys to values (regenerate it)")
    return values


def _llama2c_hidden(dim: int, multiple_of: int = 32) -> int:
    """llama2.c's SwiGLU width: 2/3 of 4*dim, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS = {
    c.name: c
    for c in [
        # LLaMA (Touvron et al. 2023, params.json of the original release)
        Config("llama-7b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
        Config("llama-13b", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
        Config("llama-30b", n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920),
        Config("llama-65b", n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016),
        # Llama 2: 4k context, eps 1e-5, grouped-query attention for 70B
        Config("llama-2-7b", block_size=4096, norm_eps=1e-5, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
        Config("llama-2-13b", block_size=4096, norm_eps=1e-5, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
        Config("llama-2-70b", block_size=4096, norm_eps=1e-5, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672),
        # karpathy/llama2.c TinyStories models (tied embeddings)
        Config("stories260K", block_size=512, vocab_size=512, n_layer=5, n_head=8, n_kv_head=4, n_embd=64,
               intermediate_size=172, norm_eps=1e-5, tie_embeddings=True),
        Config("stories15M", block_size=256, n_layer=6, n_head=6, n_embd=288, intermediate_size=_llama2c_hidden(288),
               norm_eps=1e-5, tie_embeddings=True),
        Config("stories42M", block_size=1024, n_layer=8, n_head=8, n_embd=512, intermediate_size=_llama2c_hidden(512),
               norm_eps=1e-5, tie_embeddings=True),
        Config("stories110M", block_size=1024, n_layer=12, n_head=12, n_embd=768, intermediate_size=_llama2c_hidden(768),
               norm_eps=1e-5, tie_embeddings=True),
        # a few-thousand-parameter model for tests
        Config("tiny", block_size=128, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
               norm_eps=1e-5, adapter_prompt_length=4, adapter_start_layer=1),
    ]
}
