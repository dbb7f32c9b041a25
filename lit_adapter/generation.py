"""Text generation: prefill the prompts, then decode one token at a time from a static KV cache.

The one-token step has fixed shapes and fixed addresses, so on a GPU it is captured as is in a CUDA graph
(``GraphDecode``, ready in about a second) or compiled into one (``compile_decode``, a minute of warm-up for the
last few percent); sampling stays on the device (no host synchronisation inside the step). A batch holds prompts
of different lengths, each row at its own positions and, with an adapter model, with its own adapter.
Requests files, adapter sets and conversations are prepared in ``lit_adapter.serving``.
"""

import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Literal, Optional, Sequence, TextIO

import torch

from lit_adapter.adapter import AdapterGPT
from lit_adapter.checkpoint import adapter_prompt_style, check_tokenizer_fits, load_config, load_model, read_adapter
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.precision import GenerationPrecision, base_dtype, default_precision
from lit_adapter.prompts import Message, PromptStyle, encode_prompt, user_message
from lit_adapter.serving import (Request, adapter_index, adapter_set_config, batches, check_request, read_requests,
                                 write_results)
from lit_adapter.tokenizer import Tokenizer

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
    """One decoding step: each row's token (B, 1) at its own position ``input_pos`` (B, 1) in, the next (B, 1) out."""
    logits = model(token, input_pos)[:, -1]
    return sample(logits, temperature, top_k, top_p)


def compile_decode(fn: DecodeFn = decode_one_token) -> DecodeFn:
    """The decoding step compiled into a CUDA graph (on CPU: compiled without graphs).

    Coordinate-descent tuning picks the launch shapes of the matrix-vector kernels of batch-1 decoding,
    which then read the weights near the memory bandwidth.
    """
    return torch.compile(fn, fullgraph=True, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})


class GraphDecode:
    """The eager decoding step captured in a CUDA graph: no compiler, so it is ready within about a second.

    The KV cache is static and the graph keeps its own token and position buffers, so every address is fixed; a
    call copies the inputs in and replays. It captures again for another batch size, sampling options or KV cache
    (``set_kv_cache``). Off CUDA (tests) a replay runs the same step eagerly on the same buffers.
    """

    def __init__(self, fn: DecodeFn = decode_one_token) -> None:
        self.fn = fn
        self.captured_for: Optional[tuple] = None
        self.cache: Optional[torch.Tensor] = None

    def __call__(self, model: GPT, token: torch.Tensor, input_pos: torch.Tensor, temperature: float,
                 top_k: Optional[int], top_p: float) -> torch.Tensor:
        key = (id(model), tuple(token.shape), temperature, top_k, top_p)
        if key != self.captured_for or model.mask_cache is not self.cache:
            self.capture(model, token, input_pos, temperature, top_k, top_p)
            self.captured_for, self.cache = key, model.mask_cache
        self.token.copy_(token)
        self.input_pos.copy_(input_pos)
        self.replay()
        return self.next_token

    def capture(self, model: GPT, token: torch.Tensor, input_pos: torch.Tensor, *sampling: Any) -> None:
        self.token, self.input_pos = token.clone(), input_pos.clone()

        def step() -> torch.Tensor:
            return self.fn(model, self.token, self.input_pos, *sampling)

        if token.device.type != "cuda":
            self.next_token = step()
            self.replay = lambda: self.next_token.copy_(step())
            return
        # warm-up on a side stream, so lazy initialisations (library handles, workspaces) are not captured; it
        # writes the same keys/values the real step writes next
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_token = step()
        self.replay = self.graph.replay


@torch.no_grad()
def generate_steps(model: GPT, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int],
                   temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
                   decode_fn: DecodeFn = decode_one_token) -> Iterator[list[int]]:
    """Yield the next token id of every row, as many times as the largest ``max_new_tokens`` (one per row or shared).

    Prompts (1-D ids) of different lengths are prefilled together, right-padded; each row then decodes at its own
    positions, writing over its padding before it attends to it, so every row sees exactly its own tokens. A row
    past its own ``max_new_tokens`` keeps its last cache slot (its tokens are then meaningless).
    The model's KV cache (``model.set_kv_cache``) needs one row per prompt, each with room for its new tokens.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = [p.numel() for p in prompts]
    cache_length = model.mask_cache.size(0) if model.mask_cache is not None else 0
    for length, limit in zip(lengths, limits):
        if length + limit > cache_length:
            raise UserError(f"prompt ({length} tokens) + max_new_tokens ({limit}) exceed the KV cache "
                            f"({cache_length}); the model's context is {model.config.block_size} tokens")
    T = max(lengths)
    device = model.embed.weight.device
    padded = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, :prompt.numel()] = prompt
    last = torch.tensor(lengths, device=device) - 1
    logits = model(padded.to(device), torch.arange(T, device=device))
    token = sample(logits[torch.arange(len(prompts), device=device), last], temperature, top_k, top_p)
    input_pos = (last + 1)[:, None]
    # The host reads step i's tokens from a pinned copy while the device already computes step i + 1.
    on_cuda = device.type == "cuda"
    host_token = torch.empty(token.shape, dtype=torch.long, pin_memory=on_cuda)
    copied = torch.cuda.Event() if on_cuda else None
    steps = max(limits)
    for i in range(steps):
        host_token.copy_(token, non_blocking=on_cuda)
        if on_cuda:
            copied.record()
        if i < steps - 1:
            token = decode_fn(model, token, input_pos, temperature, top_k, top_p).clone()
            input_pos.add_(1).clamp_(max=cache_length - 1)
        if on_cuda:
            copied.synchronize()
        yield host_token[:, 0].tolist()


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Collection[int] = (),
             decode_fn: DecodeFn = decode_one_token) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids following ``prompt`` (1-D ids), the last one a stop id if one came.

    The model must have a KV cache (``model.set_kv_cache``) long enough for prompt + new tokens.
    """
    for (token_id,) in generate_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, decode_fn):
        yield token_id
        if token_id in stop_ids:
            return


def generate_batch(model: GPT, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int],
                   temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
                   stop_ids: Collection[int] = (), decode_fn: DecodeFn = decode_one_token) -> list[list[int]]:
    """Each prompt's new token ids, generated as one batch: up to its ``max_new_tokens``, ending at a stop id.

    With an adapter model, ``model.select_adapters`` (after ``set_kv_cache``) gives each row its adapter.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in generate_steps(model, prompts, limits, temperature, top_k, top_p, decode_fn):
        for row, token_id in enumerate(step):
            if not done[row]:
                outputs[row].append(token_id)
                done[row] = token_id in stop_ids or len(outputs[row]) == limits[row]
        if all(done):
            break
    return outputs


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int], out: Optional[TextIO] = None,
                stop_ids: Optional[Collection[int]] = None) -> list[int]:
    """Print the text of ``tokens`` to ``out`` (stdout) as they arrive, up to a stop id (default: the tokenizer's stop
    tokens, not printed); return the ids."""
    out = out or sys.stdout
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    ids: list[int] = []
    printed = ""
    for token_id in tokens:
        if token_id in stop_ids:
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


def main(checkpoint_dir: Path = Path("checkpoints/stories260K"), prompt: str = "Once upon a time",
         adapter_path: Optional[Path | list[Path]] = None, adapter: Optional[str] = None,
         requests_path: Optional[Path] = None, output_path: Optional[Path] = None, batch_size: int = 16,
         interactive: bool = False, max_new_tokens: int = 100, temperature: float = 0.8, top_k: Optional[int] = 200,
         top_p: float = 1.0, seed: int = 1234, num_samples: int = 1, precision: Optional[GenerationPrecision] = None,
         compile: bool = False, cuda_graph: bool = True,
         prompt_style: Optional[Literal["plain", "alpaca", "chat"]] = None) -> list[str]:
    """Generate text from a converted checkpoint, streaming it to stdout; timings go to stderr.

    Args:
        checkpoint_dir: Directory from scripts/convert_checkpoint.py (model.safetensors, model_config.yaml, tokenizer).
        prompt: The text to continue, or with an adapter the instruction to answer (in the adapter's prompt style).
        adapter_path: Adapter files (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py, served
            together on the one base; a file's name without ".safetensors" is the adapter's name.
        adapter: The adapter (by name) that answers --prompt or --interactive (default: the first one) and the
            requests that name none (default: the base model).
        requests_path: A JSON-lines file of requests to answer in batches instead of --prompt, one object per line:
            "prompt", optional "adapter" (a name; absent or null: the base model) and optional max_new_tokens,
            temperature, top_k, top_p (default: these options).
        output_path: Where the answers to --requests_path go as JSON lines (default: stdout).
        batch_size: Most requests generated together.
        interactive: Chat: read messages from stdin (an empty line ends), keep the conversation in the prompt style.
        max_new_tokens: Most tokens to generate; generation stops earlier at the end-of-sequence token.
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (1.0: all).
        seed: Random seed, for reproducible samples.
        num_samples: How many samples to generate for --prompt, one after another.
        precision: Weights and compute precision (default: bf16-true on a GPU that supports it, else 32-true).
        compile: Compile the decoding step with torch.compile (fastest, after a warm-up of about a minute for 7B).
        cuda_graph: On a GPU, replay the eager decoding step as a CUDA graph (ready in about a second).
        prompt_style: How prompts are written for the model. Default: each adapter's own style (recorded in its
            file: "alpaca" or "chat"), plain text for the base model. "plain", "alpaca" (the Alpaca template) or
            "chat" (the model's chat template, e.g. for an instruct base model) apply to every prompt.
    """
    defaults = Request(prompt, adapter, max_new_tokens, temperature, top_k, top_p)
    check_request(defaults)
    if num_samples < 1 or batch_size < 1:
        raise UserError("num_samples and batch_size must be at least 1")
    if interactive and requests_path is not None:
        raise UserError("--interactive and --requests_path exclude each other: chat, or answer a file")
    device = default_device()
    dtype = base_dtype(precision or default_precision(device.type == "cuda", gpu_without_bf16="16-true"))
    torch.manual_seed(seed)

    start = time.perf_counter()
    config = load_config(checkpoint_dir)
    paths = [adapter_path] if isinstance(adapter_path, (str, Path)) else list(adapter_path or [])
    names: list[str] = []
    if paths:
        config, names = adapter_set_config(paths, config)
    tokenizer = Tokenizer(checkpoint_dir)
    check_tokenizer_fits(tokenizer, config)
    if requests_path is not None:
        requests = read_requests(requests_path, defaults)
    else:
        requests = [defaults] if adapter or not names else [replace(defaults, adapter=names[0])]
    rows = [adapter_index(r.adapter, names) for r in requests]
    styles = {name: adapter_prompt_style(path) for name, path in zip(names, paths)}
    style_of = partial(request_style, prompt_style, styles)
    prompt_ids = [encode_prompt(style_of(r), tokenizer, [user_message(r.prompt)]) for r in requests]
    for number, (ids, request) in enumerate(zip(prompt_ids, requests), start=1):
        if ids.numel() + request.max_new_tokens > config.block_size:
            where = f"request {number}: " if requests_path is not None else ""
            raise UserError(f"{where}the prompt is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} "
                            f"it exceeds the model's context of {config.block_size} tokens")
    model = load_model(checkpoint_dir, adapter=bool(paths), config=config, device=device, dtype=dtype)
    if paths:
        model.register_adapters([read_adapter(model, path) for path in paths])
    model.eval()
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    decode_fn = decode_one_token
    if compile or (cuda_graph and device.type == "cuda"):
        decode_fn = compile_decode() if compile else GraphDecode()
    stop_ids = tokenizer.stop_ids
    if interactive:
        texts = chat(model, tokenizer, requests[0], rows[0], style_of(requests[0]), stop_ids, decode_fn)
    elif requests_path is not None:
        texts, n_tokens = answer_requests(model, tokenizer, requests, rows, prompt_ids, batch_size, stop_ids, decode_fn)
        for line in write_results(output_path, requests, texts, n_tokens):
            if output_path is None:
                print(line)
    else:
        texts = stream_samples(model, tokenizer, requests[0], rows[0], prompt_ids[0], num_samples, stop_ids, decode_fn)
    if device.type == "cuda":
        print(f"Peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    return texts


def request_style(option: Optional[str], styles: dict[str, PromptStyle], request: Request) -> Optional[PromptStyle]:
    """How ``request``'s prompt is written: the ``--prompt_style`` option, else its adapter's style (None: plain)."""
    if option is not None:
        return None if option == "plain" else option
    return styles.get(request.adapter)


def select_rows(model: GPT, rows: list[int]) -> None:
    """Give row b of the next generation its adapter ``rows[b]`` (a base model has none to choose)."""
    if isinstance(model, AdapterGPT):
        model.select_adapters(rows)


def stream_samples(model: GPT, tokenizer: Tokenizer, request: Request, row: int, prompt_ids: torch.Tensor,
                   num_samples: int, stop_ids: Collection[int], decode_fn: DecodeFn) -> list[str]:
    """Answer one prompt ``num_samples`` times, streaming each answer to stdout."""
    model.set_kv_cache(batch_size=1, max_seq_length=prompt_ids.numel() + request.max_new_tokens)
    select_rows(model, [row])
    texts = []
    for _ in range(num_samples):
        start = time.perf_counter()
        tokens = generate(model, prompt_ids, request.max_new_tokens, *request.sampling(), stop_ids, decode_fn)
        ids = stream_text(tokenizer, tokens, stop_ids=stop_ids)
        elapsed = time.perf_counter() - start
        texts.append(tokenizer.decode(ids))
        print(f"{len(ids)} tokens in {elapsed:.2f} s: {len(ids) / elapsed:.1f} tokens/s", file=sys.stderr)
    return texts


def answer_requests(model: GPT, tokenizer: Tokenizer, requests: list[Request], rows: list[int],
                    prompt_ids: list[torch.Tensor], batch_size: int, stop_ids: Collection[int],
                    decode_fn: DecodeFn) -> tuple[list[str], list[int]]:
    """The answers to ``requests`` and their token counts, generated in batches of one size (short ones padded)."""
    start = time.perf_counter()
    size = min(batch_size, len(requests))
    model.set_kv_cache(size, max(ids.numel() + r.max_new_tokens for ids, r in zip(prompt_ids, requests)))
    texts, n_tokens = [""] * len(requests), [0] * len(requests)
    for batch in batches(requests, size):
        filler = [batch[0]] * (size - len(batch))  # fixed shapes: one captured decoding step serves every batch
        select_rows(model, [rows[i] for i in batch + filler])
        outputs = generate_batch(model, [prompt_ids[i] for i in batch + filler],
                                 [requests[i].max_new_tokens for i in batch] + [1] * len(filler),
                                 *requests[batch[0]].sampling(), stop_ids, decode_fn)
        for i, ids in zip(batch, outputs):
            ids = [t for t in ids if t not in stop_ids]
            texts[i], n_tokens[i] = tokenizer.decode(ids), len(ids)
    elapsed = time.perf_counter() - start
    print(f"{len(requests)} requests, {sum(n_tokens)} tokens in {elapsed:.2f} s: {sum(n_tokens) / elapsed:.1f} "
          "tokens/s", file=sys.stderr)
    return texts, n_tokens


def chat(model: GPT, tokenizer: Tokenizer, request: Request, row: int, style: Optional[PromptStyle],
         stop_ids: Collection[int], decode_fn: DecodeFn) -> list[str]:
    """Answer the messages read from stdin until an empty line, each in the light of the conversation so far.

    The oldest exchanges are dropped when the conversation no longer fits the context.
    """
    model.set_kv_cache(batch_size=1)
    select_rows(model, [row])
    messages: list[Message] = []
    replies = []
    print("Chat: type a message and Enter; an empty line ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = encode_prompt(style, tokenizer, messages)
        while ids.numel() + request.max_new_tokens > model.config.block_size and len(messages) > 1:
            messages = messages[2:]
            ids = encode_prompt(style, tokenizer, messages)
        if ids.numel() + request.max_new_tokens > model.config.block_size:
            raise UserError(f"the message is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} it "
                            f"exceeds the model's context of {model.config.block_size} tokens")
        tokens = generate(model, ids, request.max_new_tokens, *request.sampling(), stop_ids, decode_fn)
        replies.append(tokenizer.decode(stream_text(tokenizer, tokens, stop_ids=stop_ids)))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies
