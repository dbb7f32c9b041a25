"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199) on top of the base model.

Every layer from ``adapter_start_layer`` up learns ``adapter_prompt_length`` prompt vectors. The layer's own
frozen key/value projection turns them into keys and values; the queries attend to them with a softmax of
their own, and the result is added to the attention output through a gate per head that starts at zero,
so training starts from exactly the base model. Only prompts and gates train.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.config import Config
from lit_adapter.model import GPT, CausalSelfAttention, KVCache

ADAPTER_PARAM_PREFIX = "adapter_"


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus gated attention over learnable prompts."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # the official code keeps the prompts in an nn.Embedding, hence the unit-normal initialisation
        self.adapter_prompt = nn.Parameter(torch.randn(config.adapter_prompt_length, config.n_embd))
        self.adapter_gate = nn.Parameter(torch.zeros(config.n_head))
        self.prompt_cache: Optional[KVCache] = None
        self.prompt_cache_filled = False

    def reset_parameters(self) -> None:
        """Fresh prompts and zero gates (the projections are child modules with their own initialisation)."""
        nn.init.normal_(self.adapter_prompt)
        nn.init.zeros_(self.adapter_gate)

    def prompt_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompts (computed in ``dtype``), gate folded into the values: each
        (1, H, prompt_length, D). They come from the layer's own frozen projection, whatever form it takes (FP8)."""
        k, v = self.qkv(self.adapter_prompt.to(dtype))[:, self.q_size:].split(self.kv_size, dim=-1)
        heads = self.config.n_head
        k = k.view(1, -1, self.config.n_kv_head, self.config.head_dim).transpose(1, 2)
        v = v.view(1, -1, self.config.n_kv_head, self.config.head_dim).transpose(1, 2)
        k = k.repeat_interleave(heads // self.config.n_kv_head, dim=1)
        v = v.repeat_interleave(heads // self.config.n_kv_head, dim=1)
        # gate_h * softmax(q k^T) v == softmax(q k^T) (gate_h * v)
        return k, v * self.adapter_gate.to(v.dtype).view(1, heads, 1, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        y = super().attend(q, k, v, mask)
        if self.kv_cache is None:
            prompt_k, prompt_v = (t.expand(q.size(0), -1, -1, -1) for t in self.prompt_kv(q.dtype))
        else:
            prompt_k, prompt_v = self.generation_prompt_kv()
        return y + F.scaled_dot_product_attention(q, prompt_k, prompt_v)

    def generation_prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt keys/values, computed once per generation (at the first forward after ``set_kv_cache``).

        Computing them inside the forward pass, not in ``set_kv_cache``, lets sharded (FSDP) weights be gathered;
        keeping them in preallocated buffers gives a compiled decoding step fixed addresses (no copies per step).
        Training never comes here (it has no KV cache), so the prompts keep learning.
        """
        if not self.prompt_cache_filled:
            with torch.no_grad():
                k, v = self.prompt_kv(self.prompt_cache.k.dtype)
                self.prompt_cache.k.copy_(k.expand_as(self.prompt_cache.k))
                self.prompt_cache.v.copy_(v.expand_as(self.prompt_cache.v))
            self.prompt_cache_filled = True
        return self.prompt_cache.k, self.prompt_cache.v

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device: torch.device, dtype: torch.dtype) -> None:
        super().set_kv_cache(batch_size, max_seq_length, device, dtype)
        c = self.config
        self.prompt_cache = KVCache(batch_size, c.adapter_prompt_length, c.n_head, c.head_dim, device, dtype)
        self.prompt_cache_filled = False

    def clear_kv_cache(self) -> None:
        super().clear_kv_cache()
        self.prompt_cache = None
        self.prompt_cache_filled = False


class AdapterGPT(GPT):
    """The base model with ``AdapterAttention`` in the layers from ``adapter_start_layer`` up."""

    def make_attention(self, layer: int) -> CausalSelfAttention:
        if layer >= self.config.adapter_start_layer:
            return AdapterAttention(self.config)
        return CausalSelfAttention(self.config)

    def reset_adapter(self) -> None:
        """Fresh prompts and zero gates in every adapted layer."""
        for module in self.modules():
            if isinstance(module, AdapterAttention):
                module.reset_parameters()


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
