"""Model hyperparameters and the named presets (LLaMA, Llama 2 and 3.x, CodeLlama, TinyLlama, SmolLM2, TinyStories,
tiny)."""

from dataclasses import asdict, dataclass
from typing import Any, Optional

from lit_adapter.errors import UserError


@dataclass(frozen=True)
class Config:
    """The shape of a LLaMA model (its adapter's shape is ``adapter.AdapterConfig``'s)."""

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
    rope_scaling_factor: Optional[float] = None
    """Llama 3.1's RoPE frequency scaling ("llama3") by this factor; None: no scaling."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    """The context the model was pretrained with, before its RoPE scaling."""
    tie_embeddings: bool = False
    """Whether the output head reuses the token embedding matrix."""

    def __post_init__(self) -> None:
        """Check every field (type, range, heads that divide the width) whoever gives it: a preset, a
        model_config.yaml or the metadata of a file being converted. Numbers of float fields become floats."""
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if not isinstance(self.name, str):
            raise UserError(f"name must be a string, got {self.name!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise UserError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name, (kind, low, high) in FIELD_RANGES.items():
            if name != "rope_scaling_factor" or self.rope_scaling_factor is not None:
                object.__setattr__(self, name, checked_number(name, getattr(self, name), kind, low, high))
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise UserError(f"the head size n_embd / n_head = {self.n_embd} / {self.n_head} = "
                            f"{self.n_embd // self.n_head} must be even (rotary embeddings turn pairs of values)")
        if self.rope_low_freq_factor >= self.rope_high_freq_factor:
            raise UserError(f"rope_low_freq_factor ({self.rope_low_freq_factor}) must be below rope_high_freq_factor "
                            f"({self.rope_high_freq_factor})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """The named preset as this class (a subclass adds its own fields), with any field replaced by ``overrides``."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **overrides})

    def base_shape(self) -> dict:
        """The fields that tell base models apart (used to match adapters to bases): shapes and numerics."""
        keys = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "tie_embeddings",
                "norm_eps", "rope_base", "rope_scaling_factor", *ROPE_SCALING_PARAMETERS)
        return {k: getattr(self, k) for k in keys}


MAX_CONTEXT = 1 << 22
"""The longest context accepted: 4,194,304 positions, as long as the longest released Llama 3 context extension."""
FIELD_RANGES: dict[str, tuple[type, float, float]] = {
    "block_size": (int, 1, MAX_CONTEXT),
    "vocab_size": (int, 1, 1 << 21),
    "n_layer": (int, 1, 1024),
    "n_head": (int, 1, 1024),
    "n_kv_head": (int, 1, 1024),
    "n_embd": (int, 1, 1 << 16),
    "intermediate_size": (int, 1, 1 << 18),
    "norm_eps": (float, 1e-12, 0.1),
    "rope_base": (float, 1.0, 1e12),
    "rope_scaling_factor": (float, 1.0, 1024.0),
    "rope_low_freq_factor": (float, 1e-3, 1e3),
    "rope_high_freq_factor": (float, 1e-3, 1e3),
    "rope_original_max_positions": (int, 1, MAX_CONTEXT),
}
"""The type and the range of each number of a ``Config``: wide enough for every released model (Llama 3.1 405B has
126 layers, a width of 16,384 and 53,248 MLP units), narrow enough that no file can make us allocate absurdly."""


def checked_number(name: str, value: Any, kind: type, low: float, high: float) -> Any:
    """``value`` if it is a number of ``kind`` (int: a whole number; float: any, returned as float) in [low, high],
    else a one-line ``UserError`` naming ``name``."""
    kinds = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:  # nan is in no range
        what = f"a whole number from {low} to {high}" if kind is int else f"a number from {low:g} to {high:g}"
        raise UserError(f"{name} must be {what}, got {value!r}")
    return kind(value)


ROPE_SCALING_PARAMETERS = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions")
"""The fields of Llama 3.1's RoPE scaling besides its factor."""


def swiglu_hidden_size(dim: int, multiple_of: int = 32, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU width in Meta's and llama2.c's code: 2/3 of 4 * dim, scaled, rounded up to ``multiple_of`` (each
    checked first, as a ``Config`` field is)."""
    dim = checked_number("dim", dim, *FIELD_RANGES["n_embd"])
    multiple_of = checked_number("multiple_of", multiple_of, int, 1, 1 << 16)
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(checked_number("ffn_dim_multiplier", ffn_dim_multiplier, float, 1e-2, 1e2) * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama3_presets() -> list[Config]:
    """Llama 3 (8k context), 3.1 (128k, RoPE scaled by 8) and 3.2 1B/3B (128k, scaled by 32, tied head)."""
    common = dict(vocab_size=128256, n_kv_head=8, norm_eps=1e-5, rope_base=500000.0)
    long = dict(common, block_size=131072)
    return [
        Config("llama-3-8b", block_size=8192, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336, **common),
        Config("llama-3-70b", block_size=8192, n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672, **common),
        Config("llama-3.1-8b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336, rope_scaling_factor=8.0,
               **long),
        Config("llama-3.1-70b", n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672, rope_scaling_factor=8.0,
               **long),
        Config("llama-3.2-1b", n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192, rope_scaling_factor=32.0,
               tie_embeddings=True, **long),
        Config("llama-3.2-3b", n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192, rope_scaling_factor=32.0,
               tie_embeddings=True, **long),
    ]


PRESETS = {
    c.name: c
    for c in [
        # LLaMA (Touvron et al. 2023, params.json of the original release)
        Config("llama-7b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
        Config("llama-13b", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
        Config("llama-30b", n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920),
        Config("llama-65b", n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016),
        # Llama 2: 4k context, eps 1e-5, grouped-query attention for 70B
        Config("llama-2-7b", block_size=4096, norm_eps=1e-5, n_layer=32, n_head=32, n_embd=4096,
               intermediate_size=11008),
        Config("llama-2-13b", block_size=4096, norm_eps=1e-5, n_layer=40, n_head=40, n_embd=5120,
               intermediate_size=13824),
        Config("llama-2-70b", block_size=4096, norm_eps=1e-5, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
               intermediate_size=28672),
        # Llama 3 / 3.1 / 3.2: Meta's params.json (dim, layers, heads, multiple_of 1024 / 4096 with ffn_dim_multiplier
        # 1.3 -> 14336 / 28672) and the Hugging Face config.json of meta-llama/Llama-3.x (rope_scaling "llama3")
        *llama3_presets(),
        # CodeLlama: codellama/CodeLlama-*-hf config.json (rope_theta 1e6, 16k context; 7B/13B add 16 infilling tokens)
        Config("codellama-7b", block_size=16384, vocab_size=32016, n_layer=32, n_head=32, n_embd=4096,
               intermediate_size=11008, norm_eps=1e-5, rope_base=1e6),
        Config("codellama-13b", block_size=16384, vocab_size=32016, n_layer=40, n_head=40, n_embd=5120,
               intermediate_size=13824, norm_eps=1e-5, rope_base=1e6),
        Config("codellama-34b", block_size=16384, vocab_size=32000, n_layer=48, n_head=64, n_kv_head=8, n_embd=8192,
               intermediate_size=22016, norm_eps=1e-5, rope_base=1e6),
        # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T and -Chat-v1.0 config.json
        Config("tinyllama-1.1b", block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
               intermediate_size=5632, norm_eps=1e-5),
        # HuggingFaceTB/SmolLM2-{135M,360M,1.7B}(-Instruct) config.json (tied head, 49152 tokens, 8k context)
        Config("smollm2-135m", block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
               intermediate_size=1536, norm_eps=1e-5, rope_base=100000.0, tie_embeddings=True),
        Config("smollm2-360m", block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
               intermediate_size=2560, norm_eps=1e-5, rope_base=100000.0, tie_embeddings=True),
        Config("smollm2-1.7b", block_size=8192, vocab_size=49152, n_layer=24, n_head=32, n_embd=2048,
               intermediate_size=8192, norm_eps=1e-5, rope_base=130000.0, tie_embeddings=True),
        # karpathy/llama2.c TinyStories models (tied embeddings)
        Config("stories260K", block_size=512, vocab_size=512, n_layer=5, n_head=8, n_kv_head=4, n_embd=64,
               intermediate_size=172, norm_eps=1e-5, tie_embeddings=True),
        Config("stories15M", block_size=256, n_layer=6, n_head=6, n_embd=288, intermediate_size=swiglu_hidden_size(288),
               norm_eps=1e-5, tie_embeddings=True),
        Config("stories42M", block_size=1024, n_layer=8, n_head=8, n_embd=512,
               intermediate_size=swiglu_hidden_size(512), norm_eps=1e-5, tie_embeddings=True),
        Config("stories110M", block_size=1024, n_layer=12, n_head=12, n_embd=768,
               intermediate_size=swiglu_hidden_size(768), norm_eps=1e-5, tie_embeddings=True),
        # a few-thousand-parameter model for tests
        Config("tiny", block_size=128, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
               intermediate_size=64, norm_eps=1e-5),
    ]
}
