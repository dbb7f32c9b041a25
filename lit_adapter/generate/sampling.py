"""Sampling the next token on the device, without host synchronisation: greedy at temperature 0, else a draw from
the temperature-scaled distribution restricted to the top k tokens and the top-p nucleus.

The options are numbers for the whole batch, or (B, 1) tensors with a value per row (a running batch whose rows
belong to different requests). The draw is ``argmax(p / E)`` with E ~ Exp(1) per token: from torch's generator, or
from ``seeded_noise``, which depends only on a row's seed and position, so a seeded request draws the same tokens
whatever else runs in its batch. A row whose logits are not all finite draws ``NON_FINITE``, which the host refuses
(``check_token``) when it reads the token.
"""

from typing import Optional, Union

import torch

from lit_adapter.errors import UserError

Option = Union[float, int, torch.Tensor]
"""A sampling option: a number for every row, or a (B, 1) tensor of one per row."""
TINY = torch.finfo(torch.float32).tiny
"""Temperatures below this are greedy (a smaller one would be 0 in float32)."""
MASK64 = (1 << 64) - 1
NON_FINITE = -1
"""The token of a row whose logits hold inf or nan: no token (the next step reads token 0 in its place)."""


def sample(logits: torch.Tensor, temperature: Option = 1.0, top_k: Optional[Option] = None, top_p: Option = 1.0,
           noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, vocab); a temperature of 0 is greedy.

    ``top_k`` None (or a row's value at least the vocabulary) keeps every token; ``noise``: Exp(1) draws shaped like
    the logits (default: drawn from torch's generator).
    """
    finite = logits.isfinite().all(dim=-1, keepdim=True)
    return torch.where(finite, _draw(logits, temperature, top_k, top_p, noise), NON_FINITE)


def check_token(token: int) -> int:
    """``token``, or a one-line ``UserError`` where it is ``NON_FINITE``."""
    if token == NON_FINITE:
        raise UserError("the model's next-token scores are not finite (inf or nan): an adapter holds values far "
                        "beyond trained ones, or the model overflows its precision (try --precision bf16-true)")
    return token


def _draw(logits: torch.Tensor, temperature: Option, top_k: Optional[Option], top_p: Option,
          noise: Optional[torch.Tensor]) -> torch.Tensor:
    greedy = logits.argmax(dim=-1, keepdim=True)
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and temperature < TINY:
        return greedy
    # scaled after subtracting the maximum: a tiny temperature then gives -inf, never nan (inf - inf)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / (temperature.clamp(min=TINY) if per_row else temperature)
    logits = keep_top(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1) if noise is None else noise
    drawn = torch.argmax(probs / noise, dim=-1, keepdim=True)
    return torch.where(temperature < TINY, greedy, drawn) if per_row else drawn


def keep_top(logits: torch.Tensor, top_k: Optional[Option], top_p: Option) -> torch.Tensor:
    """``logits`` with -inf outside each row's ``top_k`` most likely tokens and, of those, outside the smallest set
    whose probabilities reach ``top_p`` (the most likely token always stays)."""
    per_row = isinstance(top_k, torch.Tensor) or isinstance(top_p, torch.Tensor)
    if not per_row and top_p >= 1.0:
        if top_k is None:
            return logits
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        return logits.masked_fill(logits < kth_best, float("-inf"))
    sorted_logits, order = torch.sort(logits, descending=True)
    if top_k is not None:
        rank = torch.arange(logits.size(-1), device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # drop a token once the more likely ones already reach top_p; the most likely one always stays
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p) | sorted_logits.isneginf()
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def seeded_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) draws (B, vocab) that depend only on each row's seed (B,) and position (B,): a counter-based hash
    (SplitMix64's finaliser) of (seed, position, token), computed on the device."""
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.long)
    x = (seeds.long()[:, None] * 0x2545F4914F6CDD1D + positions.long().view(-1, 1) * 0x632BE59BD9B4E019
         + tokens * _signed(0x9E3779B97F4A7C15))
    x = _mix(x)
    uniform = ((x >> 40) & 0xFFFFFF).float().add_(0.5).mul_(2.0 ** -24)  # 24 bits in (0, 1)
    return -torch.log(uniform)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (wrapping products; the shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value
