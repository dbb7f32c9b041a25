"""Generation from the command line (``generate/base.py``, ``generate/adapter.py`` run ``main``): one prompt, a
file of requests in batches, or a chat, with several adapters on one base. The decoding itself is ``decode``.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence

import torch

from lit_adapter.adapter import AdapterLLaMA
from lit_adapter.checkpoint import adapter_config, adapter_prompt_style, load_model, open_checkpoint, read_adapter
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.files import atomic_path
from lit_adapter.generate.decode import (DecodeFn, GraphDecode, compile_decode, decode_one_token, generate,
                                         generate_batch, stream_text)
from lit_adapter.model import LLaMA
from lit_adapter.precision import GenerationPrecision, base_dtype, default_precision
from lit_adapter.prompts import BASE_MODEL_STYLE, Message, StyleName, get_style, user_message
from lit_adapter.tokenizer import Tokenizer


@dataclass(frozen=True)
class Request:
    """One prompt to answer, the adapter (by name; None: the base model) and its sampling options."""

    prompt: str
    adapter: Optional[str] = None
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0

    def sampling(self) -> tuple[float, Optional[int], float]:
        """The options a batch must share (its rows sample in one call on the device)."""
        return self.temperature, self.top_k, self.top_p


def check_request(request: Request) -> None:
    """Raise a one-line ``UserError`` for options generation cannot use."""
    whole = {"max_new_tokens": request.max_new_tokens, "top_k": 1 if request.top_k is None else request.top_k}
    real = {"temperature": request.temperature, "top_p": request.top_p}
    wrong = [k for k, v in whole.items() if not isinstance(v, int) or isinstance(v, bool)]
    wrong += [k for k, v in real.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if not isinstance(request.prompt, str) or not isinstance(request.adapter, (str, type(None))):
        raise UserError("prompt must be a string, adapter a string or null")
    if wrong:
        raise UserError(f"{', '.join(wrong)} must be numbers (max_new_tokens and top_k whole numbers)")
    if request.max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    if not 0 <= request.temperature < math.inf or not 0 < request.top_p <= 1 or \
            (request.top_k is not None and request.top_k < 1):
        raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1")


def read_requests(path: Path, defaults: Request) -> list[Request]:
    """The requests of a JSON-lines file (``{"prompt": ..., "adapter": ..., "temperature": ...}`` per line).

    Options a line leaves out come from ``defaults`` (the command line's).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"requests file {path} not found")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            requests.append(parse_request(line, defaults, f"{path} line {number}"))
    if not requests:
        raise UserError(f"{path} holds no requests (one JSON object per line)")
    return requests


def parse_request(line: str, defaults: Request, where: str) -> Request:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not JSON: {err}") from None
    if not isinstance(fields, dict) or "prompt" not in fields:
        raise UserError(f"{where}: expected a JSON object with a \"prompt\"")
    unknown = sorted(set(fields) - set(asdict(defaults)))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {', '.join(asdict(defaults))}")
    request = Request(**{**asdict(defaults), **fields})
    try:
        check_request(request)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return request


def batches(requests: Sequence[Request], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``requests`` in batches of at most ``batch_size`` that share their sampling options."""
    order = sorted(range(len(requests)), key=lambda i: str(requests[i].sampling()))
    for _, group in groupby(order, key=lambda i: str(requests[i].sampling())):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def write_results(path: Optional[Path], requests: Sequence[Request], responses: Sequence[str],
                  num_tokens: Sequence[int]) -> list[str]:
    """One JSON line per request (its fields, ``response`` and ``num_tokens``), in the requests' order, to ``path``."""
    lines = [json.dumps({**asdict(r), "response": text, "num_tokens": n}, ensure_ascii=False)
             for r, text, n in zip(requests, responses, num_tokens)]
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
    return lines


def adapter_set_config(paths: Sequence[Path], base: Config) -> tuple[Config, list[str]]:
    """The config of adapters served together on ``base`` and their names (the file names without suffix).

    Each file must fit the base (one-line error otherwise); all must share one adapter shape.
    """
    configs = [adapter_config(path, base) for path in paths]
    for path, config in zip(paths[1:], configs[1:]):
        if config.adapter_shape() != configs[0].adapter_shape():
            raise UserError(f"{path} has adapter shape {config.adapter_shape()} but {paths[0]} has "
                            f"{configs[0].adapter_shape()}: adapters served together need the same shape")
    names = [Path(path).stem for path in paths]
    if len(set(names)) < len(names):
        raise UserError(f"adapter files need different names (the name picks the adapter): {', '.join(names)}")
    return configs[0], names


def adapter_index(name: Optional[str], names: Sequence[str]) -> int:
    """The row index that selects adapter ``name``; None (and no adapters at all) is the base: ``len(names)``."""
    if name is None:
        return len(names)
    if name not in names:
        raise UserError(f"unknown adapter {name!r}; loaded: {', '.join(names) or 'none'}")
    return names.index(name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(checkpoint_dir: Path = Path("checkpoints/stories260K"), prompt: str = "Once upon a time",
         adapter_path: Optional[Path | list[Path]] = None, adapter: Optional[str] = None,
         requests_path: Optional[Path] = None, output_path: Optional[Path] = None, batch_size: int = 16,
         interactive: bool = False, chat_context: int = 4096, max_new_tokens: int = 100, temperature: float = 0.8,
         top_k: Optional[int] = 200, top_p: float = 1.0, seed: int = 1234, num_samples: int = 1,
         precision: Optional[GenerationPrecision] = None,
         compile: bool = False, cuda_graph: bool = True,
         prompt_style: Optional[StyleName] = None) -> list[str]:
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
        chat_context: Chat: the most tokens of conversation kept, answer included (at most the model's context);
            older exchanges are dropped beyond it. Each new token attends to all of them, so it also sets the
            memory and time that a token costs.
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
    if num_samples < 1 or batch_size < 1 or chat_context < 1:
        raise UserError("num_samples, batch_size and chat_context must be at least 1")
    if interactive and requests_path is not None:
        raise UserError("--interactive and --requests_path exclude each other: chat, or answer a file")
    device = default_device()
    dtype = base_dtype(precision or default_precision(device.type == "cuda", purpose="generation"))
    torch.manual_seed(seed)

    start = time.perf_counter()
    base = open_checkpoint(checkpoint_dir)
    config, tokenizer = base.config, base.tokenizer
    paths = [adapter_path] if isinstance(adapter_path, (str, Path)) else list(adapter_path or [])
    names: list[str] = []
    if paths:
        config, names = adapter_set_config(paths, config)
    if requests_path is not None:
        requests = read_requests(requests_path, defaults)
    else:
        requests = [defaults] if adapter or not names else [replace(defaults, adapter=names[0])]
    rows = [adapter_index(r.adapter, names) for r in requests]
    styles = {name: adapter_prompt_style(path) for name, path in zip(names, paths)}
    style_of = partial(request_style, prompt_style, styles)
    prompt_ids = [get_style(style_of(r)).encode(tokenizer, [user_message(r.prompt)]) for r in requests]
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
        texts = chat(model, tokenizer, requests[0], rows[0], style_of(requests[0]), stop_ids, decode_fn,
                     min(chat_context, config.block_size))
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


def request_style(option: Optional[str], styles: dict[str, str], request: Request) -> str:
    """The name of the style ``request``'s prompt is written in: the ``--prompt_style`` option, else its adapter's
    style, else (the base model) plain text."""
    return option or styles.get(request.adapter) or BASE_MODEL_STYLE


def select_rows(model: LLaMA, rows: list[int]) -> None:
    """Give row b of the next generation its adapter ``rows[b]`` (a base model has none to choose)."""
    if isinstance(model, AdapterLLaMA):
        model.select_adapters(rows)


def stream_samples(model: LLaMA, tokenizer: Tokenizer, request: Request, row: int, prompt_ids: torch.Tensor,
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


def answer_requests(model: LLaMA, tokenizer: Tokenizer, requests: list[Request], rows: list[int],
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


def chat(model: LLaMA, tokenizer: Tokenizer, request: Request, row: int, style: str,
         stop_ids: Collection[int], decode_fn: DecodeFn, context: int) -> list[str]:
    """Answer the messages read from stdin until an empty line, each in the light of the conversation so far.

    The oldest exchanges are dropped when the conversation and the answer no longer fit ``context`` tokens.
    """
    model.set_kv_cache(batch_size=1, max_seq_length=context)
    select_rows(model, [row])
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
        tokens = generate(model, ids, request.max_new_tokens, *request.sampling(), stop_ids, decode_fn)
        replies.append(tokenizer.decode(stream_text(tokenizer, tokens, stop_ids=stop_ids)))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies
