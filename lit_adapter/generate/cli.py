"""Generation from the command line (``generate/base.py``, ``generate/adapter.py`` run ``main``): one prompt
streamed, a file of requests answered by the batch engine, or a chat, with several adapters on one base."""

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Collection, Optional

import torch
from tqdm import tqdm

from lit_adapter.adapter import AdapterLLaMA
from lit_adapter.checkpoint import BaseCheckpoint, open_checkpoint
from lit_adapter.errors import UserError
from lit_adapter.generate.adapters import AdapterSet, load_generation_model, open_adapters
from lit_adapter.generate.decode import DecodeFn, GraphDecode, compile_decode, decode_one_token, generate, stream_text
from lit_adapter.generate.engine import Engine, Job
from lit_adapter.generate.requests import Request, check_request, read_requests, write_results
from lit_adapter.model import LLaMA
from lit_adapter.precision import GenerationPrecision, base_dtype, default_precision
from lit_adapter.prompts import Message, StyleName, get_style, user_message
from lit_adapter.tokenizer import Tokenizer


def main(checkpoint_dir: Path = Path("checkpoints/stories260K"), prompt: str = "Once upon a time",
         adapter_path: Optional[Path | list[Path]] = None, adapter: Optional[str] = None,
         requests_path: Optional[Path] = None, output_path: Optional[Path] = None, batch_size: int = 16,
         interactive: bool = False, chat_context: int = 4096, max_new_tokens: int = 100, temperature: float = 0.8,
         top_k: Optional[int] = 200, top_p: float = 1.0, seed: int = 1234, num_samples: int = 1,
         precision: Optional[GenerationPrecision] = None, compile: bool = False, cuda_graph: bool = True,
         prompt_style: Optional[StyleName] = None) -> list[str]:
    """Generate text from a converted checkpoint, streaming it to stdout; timings go to stderr.

    Args:
        checkpoint_dir: Directory from scripts/convert_checkpoint.py (model.safetensors, model_config.yaml, tokenizer).
        prompt: The text to continue, or with an adapter the instruction to answer (in the adapter's prompt style).
        adapter_path: Adapter files (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py, served
            together on the one base, each as name=path or a path (named by its file name without ".safetensors").
        adapter: The adapter (by name) that answers --prompt or --interactive (default: the first one) and the
            requests that name none (default: the base model).
        requests_path: A JSON-lines file of requests to answer instead of --prompt, one object per line: "prompt",
            optional "adapter" (a name; absent or null: the base model) and optional max_new_tokens, temperature,
            top_k, top_p (default: these options). They run in one continuously refilled batch.
        output_path: Where the answers to --requests_path go as JSON lines (default: stdout).
        batch_size: Most requests generated together (the batch's rows; finished ones take the next request).
        interactive: Chat: read messages from stdin (an empty line ends), keep the conversation in the prompt style.
        chat_context: Chat: the most tokens of conversation kept, answer included (at most the model's context;
            older exchanges are dropped beyond it); each new token attends to all, so it sets a token's cost.
        max_new_tokens: Most tokens to generate; generation stops earlier at the end-of-sequence token.
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only among the most likely tokens whose probabilities reach top_p (1.0: all).
        seed: Random seed, for reproducible samples.
        num_samples: How many samples to generate for --prompt, one after another.
        precision: Weights and compute precision (default: bf16-true on a GPU that supports it, else 32-true).
        compile: Compile the decoding step with torch.compile (fastest, after a warm-up of a minute or more).
        cuda_graph: On a GPU, replay the eager decoding step as a CUDA graph (ready within seconds).
        prompt_style: How prompts are written for the model (one of lit_adapter/prompts.py's styles). Default: each
            adapter's own style (recorded in its file), plain text for the base model; a style given here applies
            to every prompt (the chat style, for instance, to an instruct base model).
    """
    defaults = Request(prompt, adapter, max_new_tokens, temperature, top_k, top_p)
    check_options(defaults, num_samples, batch_size, chat_context, interactive, requests_path)
    torch.manual_seed(seed)
    base, adapters, requests, prompts, model = load(checkpoint_dir, adapter_path, requests_path, defaults,
                                                    prompt_style, precision)
    device = model.embed.weight.device
    decode_fn = compile_decode() if compile else GraphDecode() if cuda_graph and device.type == "cuda" else \
        decode_one_token
    if interactive:
        texts = chat(model, base.tokenizer, requests[0], adapters.index(requests[0].adapter),
                     adapters.prompt_style(requests[0].adapter, prompt_style), decode_fn,
                     min(chat_context, base.config.block_size))
    elif requests_path is not None:
        texts = answer_requests(model, base.tokenizer, requests, adapters, prompts, batch_size, decode_fn, output_path)
    else:
        texts = stream_samples(model, base.tokenizer, requests[0], adapters.index(requests[0].adapter), prompts[0],
                               num_samples, decode_fn)
    if device.type == "cuda":
        print(f"Peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    return texts


def load(checkpoint_dir: Path, adapter_path: Optional[Path | list[Path]], requests_path: Optional[Path],
         defaults: Request, prompt_style: Optional[str], precision: Optional[str]
         ) -> tuple[BaseCheckpoint, AdapterSet, list[Request], list[torch.Tensor], LLaMA]:
    """The checkpoint, the adapters, the requests and their prompt ids (all checked first), then the model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    base = open_checkpoint(checkpoint_dir)
    adapters = open_adapters(adapter_path if isinstance(adapter_path, list) else [adapter_path] if adapter_path else [],
                             base.config)
    requests = read_requests(requests_path, defaults) if requests_path else [first_adapter(defaults, adapters)]
    prompts = encode_requests(requests, adapters, prompt_style, base, numbered=requests_path is not None)
    dtype = base_dtype(precision or default_precision(device.type == "cuda", purpose="generation"))
    model = load_generation_model(base, adapters, device, dtype)
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return base, adapters, requests, prompts, model


def check_options(defaults: Request, num_samples: int, batch_size: int, chat_context: int, interactive: bool,
                  requests_path: Optional[Path]) -> None:
    check_request(defaults)
    if num_samples < 1 or batch_size < 1 or chat_context < 1:
        raise UserError("num_samples, batch_size and chat_context must be at least 1")
    if interactive and requests_path is not None:
        raise UserError("--interactive and --requests_path exclude each other: chat, or answer a file")


def first_adapter(request: Request, adapters: AdapterSet) -> Request:
    """The one --prompt request: answered by --adapter, else by the first adapter loaded (if any)."""
    return request if request.adapter or not adapters.names else replace(request, adapter=adapters.names[0])


def encode_requests(requests: list[Request], adapters: AdapterSet, prompt_style: Optional[str], base: BaseCheckpoint,
                    numbered: bool) -> list[torch.Tensor]:
    """Each request's prompt ids, in --prompt_style or its adapter's style (plain for the base); a prompt that does
    not fit the model's context with its answer is refused (``numbered``: naming the request)."""
    prompts = []
    for number, request in enumerate(requests, start=1):
        style = get_style(adapters.prompt_style(request.adapter, prompt_style))
        ids = style.encode(base.tokenizer, [user_message(request.prompt)])
        if ids.numel() + request.max_new_tokens > base.config.block_size:
            where = f"request {number}: " if numbered else ""
            raise UserError(f"{where}the prompt is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} "
                            f"it exceeds the model's context of {base.config.block_size} tokens")
        prompts.append(ids)
    return prompts


def select_row(model: LLaMA, adapter: Optional[int]) -> None:
    """Give the one row of the next generation ``adapter`` (None: the base; a base model has none to choose)."""
    if isinstance(model, AdapterLLaMA):
        model.select_adapters([adapter])


def stream_samples(model: LLaMA, tokenizer: Tokenizer, request: Request, adapter: Optional[int],
                   prompt_ids: torch.Tensor, num_samples: int, decode_fn: DecodeFn) -> list[str]:
    """Answer one prompt ``num_samples`` times, streaming each answer to stdout."""
    model.set_kv_cache(batch_size=1, max_seq_length=prompt_ids.numel() + request.max_new_tokens)
    select_row(model, adapter)
    texts = []
    for _ in range(num_samples):
        start = time.perf_counter()
        tokens = generate(model, prompt_ids, request.max_new_tokens, request.temperature, request.top_k,
                          request.top_p, tokenizer.stop_ids, decode_fn)
        ids = stream_text(tokenizer, tokens)
        elapsed = time.perf_counter() - start
        texts.append(tokenizer.decode(ids))
        print(f"{len(ids)} tokens in {elapsed:.2f} s: {len(ids) / elapsed:.1f} tokens/s", file=sys.stderr)
    return texts


def answer_requests(model: LLaMA, tokenizer: Tokenizer, requests: list[Request], adapters: AdapterSet,
                    prompts: list[torch.Tensor], batch_size: int, decode_fn: DecodeFn,
                    output_path: Optional[Path]) -> list[str]:
    """Answer ``requests`` with the batch engine; write the answers as JSON lines (stdout without ``output_path``)."""
    start = time.perf_counter()
    engine = Engine(model, max_batch=min(batch_size, len(requests)), decode_fn=decode_fn,
                    max_seq_length=max(ids.numel() + r.max_new_tokens for ids, r in zip(prompts, requests)))
    with tqdm(total=len(requests), desc="requests", unit="request", file=sys.stderr) as bar:
        jobs = [Job(ids, r.max_new_tokens, adapters.index(r.adapter), r.sampling(), tokenizer.stop_ids,
                    on_finish=lambda job: bar.update(1)) for ids, r in zip(prompts, requests)]
        for job in jobs:
            engine.submit(job)
        engine.run_until_done()
    texts = [tokenizer.decode(job.tokens) for job in jobs]
    n_tokens = [len(job.tokens) for job in jobs]
    elapsed = time.perf_counter() - start
    print(f"{len(requests)} requests, {sum(n_tokens)} tokens in {elapsed:.2f} s: {sum(n_tokens) / elapsed:.1f} "
          "tokens/s", file=sys.stderr)
    for line in write_results(output_path, requests, texts, n_tokens):
        if output_path is None:
            print(line)
    return texts


def chat(model: LLaMA, tokenizer: Tokenizer, request: Request, adapter: Optional[int], style: str,
         decode_fn: DecodeFn, context: int) -> list[str]:
    """Answer the messages read from stdin until an empty line, each in the light of the conversation so far.

    The oldest exchanges are dropped when the conversation and the answer no longer fit ``context`` tokens.
    """
    model.set_kv_cache(batch_size=1, max_seq_length=context)
    select_row(model, adapter)
    messages: list[Message] = []
    replies = []
    print("Chat: type a message and Enter; an empty line ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = get_style(style).encode(tokenizer, messages)
        while ids.numel() + request.max_new_tokens > context and len(messages) > 1:
            messages = messages[2:]
            ids = get_style(style).encode(tokenizer, messages)
        if ids.numel() + request.max_new_tokens > context:
            raise UserError(f"the message is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} it "
                            f"exceeds the chat's context of {context} tokens (--chat_context, at most the "
                            f"model's {model.config.block_size})")
        tokens = generate(model, ids, request.max_new_tokens, request.temperature, request.top_k, request.top_p,
                          tokenizer.stop_ids, decode_fn)
        replies.append(tokenizer.decode(stream_text(tokenizer, tokens)))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies
