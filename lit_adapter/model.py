"""A LLaMA in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, a static KV cache.

Shapes: B batch, T sequence, C = n_embd, H query heads, G key/value heads, D = head_dim.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.config import Config


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (PyTorch computes it in float32 for half-precision inputs)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def build_rope_cache(seq_len: int, head_dim: int, base: float, device: Optional[torch.device] = None,
                     scaling: Optional[Config] = None) -> torch.Tensor:
    """cos and sin of every position's rotation angles: shape (seq_len, head_dim // 2, 2).

    ``scaling``: a config whose ``rope_scaling_factor`` is set gets Llama 3.1's frequency scaling.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is not None and scaling.rope_scaling_factor is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def llama3_scaled_frequencies(inv_freq: torch.Tensor, c: Config) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: low frequencies divided by the factor, high ones kept, a smooth blend between."""
    wavelength = 2 * torch.pi / inv_freq
    low_freq_wavelength = c.rope_original_max_positions / c.rope_low_freq_factor
    high_freq_wavelength = c.rope_original_max_positions / c.rope_high_freq_factor
    smooth = (c.rope_original_max_positions / wavelength - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / c.rope_scaling_factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / c.rope_scaling_factor, blended)
    return torch.where(wavelength < high_freq_wavelength, inv_freq, scaled)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of each head of x (B, T, heads, D) by ``rope``.

    ``rope`` is (T, D/2, 2) when all rows share their positions, (B, T, D/2, 2) when each row has its own.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[..., None, :, :1], rope[..., None, :, 1:]
    # (a, b) -> (a cos - b sin, b cos + a sin)
    swapped = torch.cat([-pairs[..., 1:], pairs[..., :1]], dim=-1)
    return (pairs * cos + swapped * sin).flatten(-2).type_as(x)


@dataclass(frozen=True)
class CacheView:
    """The part of the KV cache a forward pass works on: the rows ``start`` to ``stop`` - 1 (the batch's rows, in
    order) and the first ``length`` positions (a query attends to no position beyond them). A running batch decodes in
    a view of the rows in use and the positions reached, and prefills a new request in a view of its one row."""

    start: int
    stop: int
    length: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


class KVCache(nn.Module):
    """Preallocated keys and values of past positions, so every decoding step has the same shapes."""

    def __init__(self, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None], persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               view: CacheView) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, G, T, D) at ``input_pos`` ((T,) for every row or (B, T) per row) of the ``view``'s rows;
        return the view's keys and values (views of the cache, not copies).

        Indexed assignment, not ``scatter_``: compiled, it writes the T positions in place, where a scatter made
        Inductor copy the whole cache twice per layer and step.
        """
        rows = self.rows[view.rows]
        self.k[rows, :, input_pos] = k.transpose(1, 2)  # (B, T) positions, each (G, D)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[view.rows, :, :view.length], self.v[view.rows, :, :view.length]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query keys/values (G <= H heads) and rotary positions."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.q_size = config.n_head * config.head_dim
        self.kv_size = config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=False)
        self.proj = nn.Linear(self.q_size, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, view: Optional[CacheView] = None) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.config.head_dim
        qk, v = self.qkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        q, k = apply_rope(qk.view(B, T, -1, D), rope).split([self.config.n_head, self.config.n_kv_head], dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, G, T, D)
        v = v.view(B, T, -1, D).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, view)
        y = self.attend(q, k, v, mask, view)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.q_size))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               view: Optional[CacheView] = None) -> torch.Tensor:
        """Causal attention of the queries over the keys/values (a boolean ``mask`` replaces causality when cached;
        ``view`` is the cache's part in use)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.size(1) != k.size(1))

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.kv_cache = KVCache(batch_size, max_seq_length, self.config.n_kv_head, self.config.head_dim, device, dtype)

    def clear_kv_cache(self) -> None:
        self.kv_cache = None


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: Config, attn: CausalSelfAttention) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, view: Optional[CacheView] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, input_pos, view)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(nn.Module):
    """The LLaMA decoder: token embedding, ``n_layer`` blocks, final norm, output head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, self.make_attention(i)) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.register_buffer("rope_cache", self.build_rope(), persistent=False)
        self.cache_positions: Optional[torch.Tensor] = None
        """Positions 0..S-1 of the KV cache's S slots (None: no cache); a new tensor for every new cache."""

    def make_attention(self, layer: int) -> CausalSelfAttention:
        """The attention module of ``layer``; subclasses (the adapter) override it."""
        return CausalSelfAttention(self.config)

    def build_rope(self, device: Optional[torch.device] = None) -> torch.Tensor:
        c = self.config
        return build_rope_cache(c.block_size, c.head_dim, c.rope_base, device, scaling=c)

    def reset_parameters(self) -> None:
        """Recompute the rotary cache, the model's own state (after it was created on the meta device)."""
        self.rope_cache = self.build_rope(self.embed.weight.device)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                logits_at: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                view: Optional[CacheView] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); with a KV cache, ``input_pos`` gives their positions:
        (T,) shared by all rows, or (B, T) for rows at different positions (a batch of prompts of different lengths),
        in the cache's ``view`` (default: its first B rows and all its positions).

        ``logits_at``, a (rows, columns) pair of N indices, asks for the logits of those positions only: (N, vocab),
        without the output head's work and memory for the others (a prefill needs each prompt's last position,
        training without compilation the positions whose target is learned).
        """
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {self.config.block_size}")
        if input_pos is None:
            rope, mask = self.rope_cache[:T], None
        else:
            if self.cache_positions is None:
                raise RuntimeError("input_pos needs a KV cache: call set_kv_cache() first")
            view = view or CacheView(0, idx.size(0), self.cache_positions.numel())
            rope = self.rope_cache[input_pos]
            # causal over the cache: a query at position p sees the slots 0..p
            mask = (self.cache_positions[:view.length] <= input_pos[..., None]).view(-1, 1, T, view.length)
        x = self.embed(idx)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, input_pos, view, use_reentrant=False)
            else:
                x = block(x, rope, mask, input_pos, view)
        if logits_at is not None:
            x = x[logits_at]
        return self.logits(self.norm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states onto the vocabulary."""
        return F.linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device: Optional[torch.device] = None,
                     dtype: Optional[torch.dtype] = None) -> None:
        """Allocate a static KV cache in every layer for decoding up to ``max_seq_length`` positions (sized by the
        caller: a model's whole context, 131,072 positions for Llama 3.1, would make every step attend to all)."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's block_size {self.config.block_size}")
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        for block in self.blocks:
            block.attn.set_kv_cache(batch_size, max_seq_length, device, dtype)
        self.cache_positions = torch.arange(max_seq_length, device=device)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.clear_kv_cache()
        self.cache_positions = None


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random initialisation for a model trained or benchmarked from scratch (normal weights, unit norms)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()


GPT = LLaMA
"""The name before 2026-12-07 (nanoGPT's), kept for old imports."""
