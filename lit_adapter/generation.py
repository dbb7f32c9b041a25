"""Text generation: prefill the prompt, then decode one token at a time from a static KV cache.

The one-token step has fixed shapes, so ``torch.compile(mode="reduce-overhead")`` turns it into a CUDA
graph; sampling stays on the device (no host synchronisation inside the step).
"""

import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, TextIO

import torch

from lit_adapter.checkpoint import adapter_config, check_tokenizer_fits, load_adapter, load_config, load_model
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.prompts import alpaca_prompt
from lit_adapter.tokenizer import Tokenizer

Precision = Literal["bf16-true", "16-true", "32-true"]
DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
DecodeFn = Callable[..., torch.Tensor]


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, vocab); temperature 0 is greedy."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that it would be 0 in float32: greedy
        return logits.argmax(dim=-1, keepdim=True)
    # scaled after subtracting the maximum: a tiny temperature then gives -inf, never nan (inf - inf)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already reach top_p; the most likely one always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    # argmax of p / Exp(1) noise draws from p without a host synchronisation (unlike torch.multinomial)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, temperature: float,
                     top_k: Optional[int], top_p: float) -> torch.Tensor:
    """One decoding step: the token (1, 1) at ``input_pos`` (1,) in, the next token (1, 1) out."""
    logits = model(token, input_pos)[:, -1]
    return sample(logits, temperature, top_k, top_p)


def compile_decode(fn: DecodeFn = decode_one_token) -> DecodeFn:
    """The decoding step compiled into a CUDA graph (on CPU: compiled without graphs).

    Coordinate-descent tuning picks the launch shapes of the matrix-vector kernels of batch-1 decoding,
    which then read the weights near the memory bandwidth.
    """
    return torch.compile(fn, fullgraph=True, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, eos_id: Optional[int] = None,
             decode_fn: DecodeFn = decode_one_token) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids following ``prompt`` (1-D ids); stops after ``eos_id``.

    The model must have a KV cache (``model.set_kv_cache``) long enough for prompt + new tokens.
    """
    T = prompt.numel()
    cache_length = model.mask_cache.size(0) if model.mask_cache is not None else 0
    if T + max_new_tokens > cache_length:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed the KV cache "
                        f"({cache_length}); the model's context is {model.config.block_size} tokens")
    device = model.embed.weight.device
    input_pos = torch.arange(T, device=device)
    logits = model(prompt.to(device).view(1, -1), input_pos)[:, -1]
    token = sample(logits, temperature, top_k, top_p)
    input_pos = torch.tensor([T], device=device)
    # The host reads token i from a pinned copy while the device already computes token i + 1.
    on_cuda = device.type == "cuda"
    host_token = torch.empty((1, 1), dtype=torch.long, pin_memory=on_cuda)
    copied = torch.cuda.Event() if on_cuda else None
    for i in range(max_new_tokens):
        host_token.copy_(token, non_blocking=on_cuda)
        if on_cuda:
            copied.record()
        if i < max_new_tokens - 1:
            token = decode_fn(model, token, input_pos, temperature, top_k, top_p).clone()
            input_pos += 1
        if on_cuda:
            copied.synchronize()
        token_id = int(host_token)
        yield token_id
        if token_id == eos_id:
            return


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int], out: Optional[TextIO] = None) -> list[int]:
    """Print the text of ``tokens`` to ``out`` (stdout) as they arrive (EOS not printed); return the ids."""
    out = out or sys.stdout
    ids: list[int] = []
    printed = ""
    for token_id in tokens:
        if token_id == tokenizer.eos_id:
            break
        ids.append(token_id)
        text = tokenizer.decode(ids)
        # SentencePiece may change the tail of the text as bytes complete a character; print only settled text
        if not text.endswith("\ufffd"):
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tokenizer.decode(ids)[len(printed):] + "\n")
    out.flush()
    return ids


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device: torch.device) -> Precision:
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def main(checkpoint_dir: Path = Path("checkpoints/stories260K"), prompt: str = "Once upon a time",
         adapter_path: Optional[Path] = None, max_new_tokens: int = 100, temperature: float = 0.8,
         top_k: Optional[int] = 200, top_p: float = 1.0, seed: int = 1234, num_samples: int = 1,
         precision: Optional[Precision] = None, compile: bool = False) -> list[str]:
    """Generate text from a converted checkpoint, streaming it to stdout; timings go to stderr.

    Args:
        checkpoint_dir: Directory from scripts/convert_checkpoint.py (model.safetensors, model_config.yaml, tokenizer.model).
        prompt: The text to continue (with an adapter: the instruction, wrapped in the Alpaca template).
        adapter_path: Adapter file (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py.
        max_new_tokens: Most tokens to generate; generation stops earlier at the end-of-sequence token.
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (1.0: all).
        seed: Random seed, for reproducible samples.
        num_samples: How many samples to generate, one after another.
        precision: Weights and compute precision (default: bf16-true on a GPU that supports it, else 32-true).
        compile: Compile the decoding step with torch.compile into a CUDA graph (fast after a warm-up).
    """
    if max_new_tokens < 1 or num_samples < 1:
        raise UserError("max_new_tokens and num_samples must be at least 1")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1 or (top_k is not None and top_k < 1):
        raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1")
    device = default_device()
    dtype = DTYPES[precision or default_precision(device)]
    torch.manual_seed(seed)

    start = time.perf_counter()
    config = load_config(checkpoint_dir)
    if adapter_path is not None:
        config = adapter_config(adapter_path, config)
    tokenizer = Tokenizer(checkpoint_dir)
    check_tokenizer_fits(tokenizer, config)
    prompt_ids = tokenizer.encode(prompt if adapter_path is None else alpaca_prompt(prompt), bos=True)
    if prompt_ids.numel() + max_new_tokens > config.block_size:
        raise UserError(f"the prompt is {prompt_ids.numel()} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                        f"the model's context of {config.block_size} tokens")
    model = load_model(checkpoint_dir, adapter=adapter_path is not None, config=config, device=device, dtype=dtype)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    model.eval()
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    model.set_kv_cache(batch_size=1, max_seq_length=prompt_ids.numel() + max_new_tokens)
    decode_fn = compile_decode() if compile else decode_one_token

    texts = []
    for _ in range(num_samples):
        start = time.perf_counter()
        tokens = generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                          eos_id=tokenizer.eos_id, decode_fn=decode_fn)
        ids = stream_text(tokenizer, tokens)
        elapsed = time.perf_counter() - start
        texts.append(tokenizer.decode(ids))
        print(f"{len(ids)} tokens in {elapsed:.2f} s: {len(ids) / elapsed:.1f} tokens/s", file=sys.stderr)
    if device.type == "cuda":
        print(f"Peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    return texts
