"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199) on top of the base model.

Every layer from ``adapter_start_layer`` up learns ``adapter_prompt_length`` prompt vectors. The layer's own
frozen key/value projection turns them into keys and values; the queries attend to them with a softmax of
their own, and the result is added to the attention output through a gate per head that starts at zero,
so training starts from exactly the base model. Only prompts and gates train.
"""

from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model import CacheView, CausalSelfAttention, KVCache, LLaMA

ADAPTER_PARAM_PREFIX = "adapter_"
DEFAULT_PROMPT_LENGTH = 10
"""Learnable prompt vectors per adapted layer: the paper's 10."""
PAPER_ADAPTED_SHARE = 30 / 32
"""The paper adapts the top 30 of LLaMA-7B's 32 layers."""
SMALL_MODEL_WIDTH = 1024
"""Models narrower than this adapt only the top half of their layers (``default_start_layer``)."""


def default_start_layer(n_layer: int, n_embd: int) -> int:
    """The first adapted layer by default: the paper's share of the top layers, but on a small model (narrower than
    ``SMALL_MODEL_WIDTH``) the top half. On SmolLM2-135M (30 layers) the top 16 learned more in 40 steps of the quick
    start than the paper's 28, in a fifth less time (bench/RESULTS.md): the prompts of the lowest layers of a small
    model cost backward passes and buy little. At least one layer is adapted."""
    share = PAPER_ADAPTED_SHARE if n_embd >= SMALL_MODEL_WIDTH else 1 / 2
    return n_layer - max(1, int(share * n_layer))


@dataclass(frozen=True)
class AdapterConfig(Config):
    """A base model's shape and its adapter's: ``adapter_prompt_length`` prompts in each layer from
    ``adapter_start_layer`` up. The adapter's part is recorded in adapter files and training states, never in a
    checkpoint folder's ``model_config.yaml``."""

    adapter_prompt_length: int = DEFAULT_PROMPT_LENGTH
    """Learnable prompt vectors per adapted layer."""
    adapter_start_layer: Optional[int] = None
    """First adapted layer; the layers from it to the top get prompts. None: ``default_start_layer``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_start_layer is None:
            object.__setattr__(self, "adapter_start_layer", default_start_layer(self.n_layer, self.n_embd))
        if isinstance(self.adapter_prompt_length, bool) or not isinstance(self.adapter_prompt_length, int) or \
                self.adapter_prompt_length < 1:
            raise UserError(f"adapter_prompt_length must be a whole number of at least 1, got "
                            f"{self.adapter_prompt_length!r}")
        if isinstance(self.adapter_start_layer, bool) or not isinstance(self.adapter_start_layer, int) or \
                not 0 <= self.adapter_start_layer < self.n_layer:
            raise UserError(f"adapter_start_layer must lie in [0, {self.n_layer - 1}] for this {self.n_layer}-layer "
                            f"model, got {self.adapter_start_layer!r}")

    @classmethod
    def of(cls, base: Config, adapter_prompt_length: Optional[int] = None,
           adapter_start_layer: Optional[int] = None) -> "AdapterConfig":
        """``base`` with this adapter shape (None: ``base``'s own if it has one, else the default)."""
        shape = base.adapter_shape() if isinstance(base, AdapterConfig) else {}
        given = {"adapter_prompt_length": adapter_prompt_length, "adapter_start_layer": adapter_start_layer}
        shape.update({key: value for key, value in given.items() if value is not None})
        return cls(**{f.name: getattr(base, f.name) for f in fields(Config)}, **shape)

    @property
    def n_adapter_layers(self) -> int:
        return self.n_layer - self.adapter_start_layer

    def adapter_shape(self) -> dict:
        """The fields that define the adapter's parameters."""
        return {"adapter_prompt_length": self.adapter_prompt_length, "adapter_start_layer": self.adapter_start_layer}

    def base(self) -> Config:
        """The base model's shape alone."""
        return Config(**{f.name: getattr(self, f.name) for f in fields(Config)})


@dataclass
class AdapterArgs:
    """The adapter's shape as fine-tuning's options give it (recorded in the adapter file)."""

    prompt_length: Optional[int] = None
    """Learnable prompt vectors per adapted layer (default: the paper's 10)."""
    start_layer: Optional[int] = None
    """First adapted layer; the layers from it to the top get prompts (default: the paper's share, the top 30 of 32
    layers, scaled to the model's depth)."""

    def config(self, base: Config, option: str = "--adapter.") -> AdapterConfig:
        """``base`` with this adapter shape; a shape that does not fit the model is refused in one line that names
        the ``option``."""
        try:
            return AdapterConfig.of(base, self.prompt_length, self.start_layer)
        except UserError as err:
            raise UserError(option + str(err).removeprefix("adapter_")) from None


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus gated attention over learnable prompts.

    For generation, the rows of a batch may each use another adapter: ``register_adapters`` stacks several adapters'
    prompts and gates, ``select_adapters`` picks one per row, and the prompt cache holds each row's keys/values.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        # the official code keeps the prompts in an nn.Embedding, hence the unit-normal initialisation
        self.adapter_prompt = nn.Parameter(torch.randn(config.adapter_prompt_length, config.n_embd))
        self.adapter_gate = nn.Parameter(torch.zeros(config.n_head))
        self.prompt_cache: Optional[KVCache] = None
        self.prompt_cache_filled = False
        self.served: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        """Registered adapters for generation: prompts (A, P, C) and gates (A, H); None serves this layer's own."""
        self.row_adapters: Optional[torch.Tensor] = None
        """Each row's adapter index (B,) into ``adapter_table``; None: adapter 0 for every row."""

    def reset_parameters(self) -> None:
        """Fresh prompts and zero gates (the projections are child modules with their own initialisation)."""
        nn.init.normal_(self.adapter_prompt)
        nn.init.zeros_(self.adapter_gate)

    def prompt_kv(self, prompts: torch.Tensor, gates: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of A adapters' prompts (A, P, C), gates (A, H) folded into the values: each (A, H, P, D),
        computed in ``dtype`` by the layer's own frozen projection, whatever form it takes (FP8)."""
        k, v = self.qkv(prompts.to(dtype))[..., self.q_size:].split(self.kv_size, dim=-1)
        A, H, G, D = prompts.size(0), self.config.n_head, self.config.n_kv_head, self.config.head_dim
        k = k.view(A, -1, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
        v = v.view(A, -1, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
        # gate_h * softmax(q k^T) v == softmax(q k^T) (gate_h * v)
        return k, v * gates.to(v.dtype).view(A, H, 1, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               view: Optional[CacheView] = None) -> torch.Tensor:
        y = super().attend(q, k, v, mask, view)
        if self.kv_cache is None:
            own = self.prompt_kv(self.adapter_prompt[None], self.adapter_gate[None], q.dtype)
            prompt_k, prompt_v = (t.expand(q.size(0), -1, -1, -1) for t in own)
        else:
            prompt_k, prompt_v = (t[view.rows] for t in self.generation_prompt_kv())
        return y + F.scaled_dot_product_attention(q, prompt_k, prompt_v)

    def adapter_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (A + 1, P, C) and gates (A + 1, H) to pick from: the served adapters, then the base (zero gates)."""
        prompts, gates = self.served or (self.adapter_prompt[None], self.adapter_gate[None])
        return torch.cat([prompts, prompts[:1]]), torch.cat([gates, torch.zeros_like(gates[:1])])

    def generation_prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's prompt keys/values, computed once per generation (at the first forward after ``set_kv_cache``).

        Computing them inside the forward pass, not in ``set_kv_cache``, lets sharded (FSDP) weights be gathered;
        keeping them in preallocated buffers gives a compiled or captured decoding step fixed addresses (no copies
        per step). Training never comes here (it has no KV cache), so the prompts keep learning.
        """
        if not self.prompt_cache_filled:
            with torch.no_grad():
                k, v = self.prompt_kv(*self.adapter_table(), self.prompt_cache.k.dtype)
                rows = 0 if self.row_adapters is None else self.row_adapters
                self.prompt_cache.k.copy_(k[rows])
                self.prompt_cache.v.copy_(v[rows])
            self.prompt_cache_filled = True
        return self.prompt_cache.k, self.prompt_cache.v

    def select_adapters(self, rows: Optional[torch.Tensor]) -> None:
        """Give row b the adapter ``rows[b]`` from the next forward on (None: adapter 0 for every row)."""
        self.row_adapters = rows
        self.prompt_cache_filled = False

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device: torch.device, dtype: torch.dtype) -> None:
        super().set_kv_cache(batch_size, max_seq_length, device, dtype)
        c = self.config
        self.prompt_cache = KVCache(batch_size, c.adapter_prompt_length, c.n_head, c.head_dim, device, dtype)
        self.select_adapters(None)

    def clear_kv_cache(self) -> None:
        super().clear_kv_cache()
        self.prompt_cache = None
        self.select_adapters(None)


class AdapterLLaMA(LLaMA):
    """The base model with ``AdapterAttention`` in the layers from ``adapter_start_layer`` up."""

    def __init__(self, config: Config) -> None:
        super().__init__(config if isinstance(config, AdapterConfig) else AdapterConfig.of(config))

    def make_attention(self, layer: int) -> CausalSelfAttention:
        if layer >= self.config.adapter_start_layer:
            return AdapterAttention(self.config)
        return CausalSelfAttention(self.config)

    def reset_adapter(self) -> None:
        """Fresh prompts and zero gates in every adapted layer."""
        for module in self.adapted_layers():
            module.reset_parameters()

    def adapted_layers(self) -> Iterator[AdapterAttention]:
        return (module for module in self.modules() if isinstance(module, AdapterAttention))

    @property
    def n_adapters(self) -> int:
        """How many adapters generation serves (the registered ones, else the model's own); this index is the base."""
        return next((len(m.served[0]) for m in self.adapted_layers() if m.served is not None), 1)

    def register_adapters(self, state_dicts: list[dict[str, torch.Tensor]]) -> None:
        """Serve these adapters (``adapter_state_dict`` keys) together in generation, instead of the model's own."""
        device = self.embed.weight.device
        for name, module in self.named_modules():
            if isinstance(module, AdapterAttention):
                prompts, gates = ([sd[f"{name}.{ADAPTER_PARAM_PREFIX}{kind}"] for sd in state_dicts]
                                  for kind in ("prompt", "gate"))
                module.served = (torch.stack(prompts).to(device, torch.float32),
                                 torch.stack(gates).to(device, torch.float32))

    def select_adapters(self, rows: Sequence[Optional[int]]) -> None:
        """Row b of the next generation uses adapter ``rows[b]`` (None or ``n_adapters``: the base); after
        ``set_kv_cache``."""
        rows = [self.n_adapters if i is None else i for i in rows]
        if any(not 0 <= i <= self.n_adapters for i in rows):
            raise UserError(f"adapter indices {rows} out of range: {self.n_adapters} adapters, "
                            f"{self.n_adapters} is the base model")
        index = torch.tensor(rows, device=self.embed.weight.device)
        for module in self.adapted_layers():
            module.select_adapters(index)


def is_adapter_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PARAM_PREFIX)


def mark_only_adapter_trainable(model: nn.Module) -> None:
    """Freeze the base model; leave only prompts and gates trainable."""
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_param(name)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters only (prompts and gates), keyed as in the full model's state dict."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_param(name)}


def num_trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_summary(model: nn.Module, config: AdapterConfig) -> str:
    """The line both training routes print: how many parameters train, and in what shape."""
    return (f"{num_trainable_params(model):,} trainable adapter parameters ({config.n_adapter_layers} layers x "
            f"{config.adapter_prompt_length} prompts + gates)")


AdapterGPT = AdapterLLaMA
"""The name before 2026-12-07, kept for old imports."""
