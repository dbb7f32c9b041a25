"""Generation from the command line (``generate/base.py``, ``generate/adapter.py`` run ``main``): one prompt
streamed, a file of requests answered by the batch engine, or a chat, with several adapters on one base."""

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from tqdm import tqdm

from lit_adapter.adapter import AdapterLLaMA
from lit_adapter.cli import check_seed
from lit_adapter.checkpoint import QUICK_START_CHECKPOINT, BaseCheckpoint, open_checkpoint
from lit_adapter.errors import UserError
from lit_adapter.files import check_can_write_file
from lit_adapter.generate.adapters import AdapterSet, load_generation_model, open_adapters
from lit_adapter.generate.decode import (COMPILED_STEPS, DecodeFn, GraphDecode, StoredDecode, compile_decode,
                                         decode_one_token, generate, rounded_cache_length, stream_text)
from lit_adapter.generate.engine import Engine, Job
from lit_adapter.generate.requests import Request, check_request, read_requests, write_results
from lit_adapter.model import LLaMA
from lit_adapter.precision import GenerationPrecision
from lit_adapter.prompts import BASE_MODEL_STYLE, Message, StyleName, chat_style_for, get_style, user_message
from lit_adapter.tokenizer import Tokenizer


def main(checkpoint_dir: Path = QUICK_START_CHECKPOINT, prompt: str = "Once upon a time",
         adapter_path: Optional[Path | list[Path]] = None, adapter: Optional[str] = None,
         requests_path: Optional[Path] = None, output_path: Optional[Path] = None, batch_size: int = 16,
         interactive: bool = False, chat_context: int = 4096, max_new_tokens: int = 100, temperature: float = 0.8,
         top_k: Optional[int] = 200, top_p: float = 1.0, seed: int = 1234, num_samples: int = 1,
         precision: Optional[GenerationPrecision] = None, compile: Optional[bool] = None,
         compiled_steps: Optional[Path] = COMPILED_STEPS, cuda_graph: bool = True,
         prompt_style: Optional[StyleName] = None, system: Optional[str] = None,
         accelerator: Literal["auto", "cpu", "cuda"] = "auto", allow_other_base: bool = False) -> list[str]:
    """Generate text from a converted checkpoint, streaming it to stdout; timings go to stderr.

    Args:
        checkpoint_dir: Directory from scripts/convert_checkpoint.py (default: the quick start's SmolLM2).
        prompt: The text to continue, or with an adapter the instruction to answer (in the adapter's prompt style).
        adapter_path: Adapter files (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py, served
            together on the one base, each as name=path or a path (named by its file name without ".safetensors").
        adapter: The adapter (by name) that answers --prompt or --interactive (default: the first one).
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
        precision: Weights and compute precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU
            that supports it, else 32-true), or a quantized base computed in bf16: int8-base, int4-base (Ampere or
            newer GPUs; the fastest to decode), nf4-base (these three need torchao; a training format, slow to
            decode) or fp8-base (Hopper GPUs). One adapter file works on every precision of its base.
        compile: Compile the decoding step with torch.compile, stored in --compiled_steps: the first run with a new
            model shape or kind of call compiles for a minute or more, later runs load it within seconds. null (the
            default): on a GPU for --prompt and --interactive (--requests_path replays the CUDA graph: its buckets
            of rows and positions would each compile a step), not on the CPU. false: the eager step, on a GPU in a
            CUDA graph. A step that cannot be stored (int8-base's) is compiled in each run with true, not at all by
            default.
        compiled_steps: The folder of stored compiled decoding steps, one file per model shape, precision and kind
            of call (greedy, sampling, sampling with top_k/top_p). null: nothing stored; by default the CUDA graph,
            with --compile true a step compiled in every run (a minute or more each time; Inductor's tuning then
            makes it about 6% faster than a stored one).
        cuda_graph: On a GPU, replay the eager decoding step as a CUDA graph (ready within seconds).
        prompt_style: How prompts are written (a style of lit_adapter/prompts.py; default: each adapter's own, plain
            text for the base). Given, it applies to every prompt (e.g. the chat style to an instruct base model).
        system: A system message before every prompt and chat (the Alpaca template has no place for one).
        accelerator: "cpu", "cuda" or "auto" (a GPU if there is one).
        allow_other_base: Use adapters trained on another base of the same shape (their recorded fingerprint of
            the weights or tokenizer differs from checkpoint_dir's), which is otherwise refused.
    """
    defaults = Request(prompt, adapter, max_new_tokens, temperature, top_k, top_p)
    check_options(defaults, num_samples, batch_size, chat_context, seed, interactive, requests_path, output_path)
    torch.manual_seed(seed)
    prompting = Prompting(prompt_style, system)
    base, adapters, requests, prompts, model = load(checkpoint_dir, adapter_path, requests_path, defaults, prompting,
                                                    precision, accelerator, allow_other_base)
    device = model.embed.weight.device
    decode_fn = decode_step(compile, compiled_steps, cuda_graph, device, batches=requests_path is not None)
    first = requests[0]
    if interactive:
        texts = chat(model, base.tokenizer, first, adapters.index(first.adapter), prompting.style(adapters, first),
                     system, decode_fn, min(chat_context, base.config.block_size))
    elif requests_path is not None:
        texts = answer_requests(model, base.tokenizer, requests, adapters, prompts,
                                [prompting.style(adapters, r) for r in requests], batch_size, decode_fn, output_path)
    else:
        texts = stream_samples(model, base.tokenizer, first, adapters.index(first.adapter), prompts[0], num_samples,
                               decode_fn, prompting.style(adapters, first))
    if device.type == "cuda":
        print(f"Peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    return texts


def decode_step(compile: Optional[bool], compiled_steps: Optional[Path], cuda_graph: bool, device: torch.device,
                batches: bool) -> DecodeFn:
    """The decoding step the options ask for (see main's --compile and --compiled_steps)."""
    graph = cuda_graph and device.type == "cuda"
    compiled = compile if compile is not None else graph and compiled_steps is not None and not batches
    if not compiled:
        return GraphDecode() if graph else decode_one_token
    if compiled_steps is None:
        return compile_decode()
    return StoredDecode(compiled_steps, compile_unstorable=compile is True)


@dataclass(frozen=True)
class Prompting:
    """How the command line's prompts are written: in ``option`` (None: each adapter's own style, plain text for the
    base model), after the ``system`` message if one is given."""

    option: Optional[str]
    system: Optional[str]

    def style(self, adapters: AdapterSet, request: Request) -> str:
        return adapters.prompt_style(request.adapter, self.option)

    def encode(self, adapters: AdapterSet, request: Request, tokenizer: Tokenizer) -> torch.Tensor:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return get_style(self.style(adapters, request)).encode(tokenizer, [*system, user_message(request.prompt)])


def load(checkpoint_dir: Path, adapter_path: Optional[Path | list[Path]], requests_path: Optional[Path],
         defaults: Request, prompting: Prompting, precision: Optional[str], accelerator: str,
         allow_other_base: bool = False
         ) -> tuple[BaseCheckpoint, AdapterSet, list[Request], list[torch.Tensor], LLaMA]:
    """The checkpoint, the adapters, the requests and their prompt ids (all checked first), then the model."""
    device = pick_device(accelerator)
    start = time.perf_counter()
    base = open_checkpoint(checkpoint_dir)
    adapters = open_adapters(adapter_path if isinstance(adapter_path, list) else [adapter_path] if adapter_path else [],
                             base, allow_other_base)
    requests = read_requests(requests_path, defaults) if requests_path else [first_adapter(defaults, adapters)]
    warn_about_overridden_styles(adapters, {r.adapter for r in requests}, prompting.option)
    prompts = encode_requests(requests, adapters, prompting, base, numbered=requests_path is not None)
    model = load_generation_model(base, adapters, device, precision)
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return base, adapters, requests, prompts, model


def pick_device(accelerator: str) -> torch.device:
    """The device --accelerator asks for; a GPU that is not there is refused in one line."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda: PyTorch sees no GPU here (check nvidia-smi and that PyTorch is a CUDA "
                        "build), or use --accelerator cpu")
    return torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")


def warn_about_overridden_styles(adapters: AdapterSet, used: set[Optional[str]], option: Optional[str]) -> None:
    """A warning for each adapter in use trained in another prompt style than --prompt_style."""
    for name in sorted(n for n in used if n is not None):
        trained = adapters.prompt_style(name)
        if option is not None and option != trained:
            print(f"warning: --prompt_style {option} writes the prompts to adapter {name!r}, which was trained in the "
                  f"{trained} style", file=sys.stderr)


def check_options(defaults: Request, num_samples: int, batch_size: int, chat_context: int, seed: int,
                  interactive: bool, requests_path: Optional[Path], output_path: Optional[Path]) -> None:
    check_request(defaults)
    if num_samples < 1 or batch_size < 1 or chat_context < 1:
        raise UserError("num_samples, batch_size and chat_context must be at least 1")
    check_seed(seed)
    if interactive and requests_path is not None:
        raise UserError("--interactive and --requests_path exclude each other: chat, or answer a file")
    if output_path is not None:
        if requests_path is None:
            raise UserError("--output_path is where the answers to --requests_path go: give --requests_path too")
        check_can_write_file(output_path, "--output_path")


def first_adapter(request: Request, adapters: AdapterSet) -> Request:
    """The one --prompt request: answered by --adapter, else by the first adapter loaded (if any)."""
    return request if request.adapter or not adapters.names else replace(request, adapter=adapters.names[0])


def encode_requests(requests: list[Request], adapters: AdapterSet, prompting: Prompting, base: BaseCheckpoint,
                    numbered: bool) -> list[torch.Tensor]:
    """Each request's prompt ids, written as ``prompting`` says; a prompt that does not fit the model's context with
    its answer is refused (``numbered``: naming the request)."""
    prompts = []
    for number, request in enumerate(requests, start=1):
        ids = prompting.encode(adapters, request, base.tokenizer)
        where = f"request {number}: " if numbered else ""
        if ids.numel() == 0:
            raise UserError(f"{where}the prompt is empty and the model has no BOS token to begin with: give a prompt")
        if ids.numel() + request.max_new_tokens > base.config.block_size:
            raise UserError(f"{where}the prompt is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} "
                            f"it exceeds the model's context of {base.config.block_size} tokens")
        prompts.append(ids)
    return prompts


def select_row(model: LLaMA, adapter: Optional[int]) -> None:
    """Give the one row of the next generation ``adapter`` (None: the base; a base model has none to choose)."""
    if isinstance(model, AdapterLLaMA):
        model.select_adapters([adapter])


def stream_samples(model: LLaMA, tokenizer: Tokenizer, request: Request, adapter: Optional[int],
                   prompt_ids: torch.Tensor, num_samples: int, decode_fn: DecodeFn, style: str) -> list[str]:
    """Answer one prompt ``num_samples`` times, streaming each answer to stdout."""
    needed = prompt_ids.numel() + request.max_new_tokens
    model.set_kv_cache(batch_size=1, max_seq_length=rounded_cache_length(needed, model.config.block_size))
    select_row(model, adapter)
    texts = []
    for _ in range(num_samples):
        start, arrivals = time.perf_counter(), []
        tokens = generate(model, prompt_ids, request.max_new_tokens, request.temperature, request.top_k,
                          request.top_p, tokenizer.stop_ids, decode_fn)
        ids = stream_text(tokenizer, clocked(tokens, arrivals))
        texts.append(tokenizer.decode(ids))
        print(speed_line(len(ids), start, arrivals, time.perf_counter()), file=sys.stderr)
        if not ids:
            print(empty_answer_note(tokenizer, [style]), file=sys.stderr)
    return texts


def clocked(tokens: Iterator[int], arrivals: list[float]) -> Iterator[int]:
    """``tokens``, the time each one arrives appended to ``arrivals``."""
    for token in tokens:
        arrivals.append(time.perf_counter())
        yield token


def speed_line(n_tokens: int, start: float, arrivals: list[float], end: float) -> str:
    """An answer's timing: its ``n_tokens`` in all, the first token's wait (prefill, and a first call's compiling
    or loading of the decoding step) and the decoding speed after it."""
    line = f"{n_tokens} token{'s' * (n_tokens != 1)} in {end - start:.2f} s"
    if n_tokens:
        line += f": the first after {arrivals[0] - start:.2f} s"
    if n_tokens > 1:
        line += f", then {(n_tokens - 1) / max(arrivals[n_tokens - 1] - arrivals[0], 1e-9):.1f} tokens/s"
    return line


def empty_answer_note(tokenizer: Tokenizer, styles: list[str]) -> str:
    """What to say about answers that ended at once, written in ``styles``: a chat model asked in plain text,
    usually."""
    what = "the answer is empty" if len(styles) == 1 else f"{len(styles)} answers are empty"
    hint = ("; the model has a chat template: write its prompts in it with --prompt_style chat"
            if tokenizer.chat_template and chat_style_for(tokenizer) != BASE_MODEL_STYLE and BASE_MODEL_STYLE in styles
            else "")
    return f"note: {what}: the model ended at once (an end-of-text or end-of-turn token came first){hint}"


def answer_requests(model: LLaMA, tokenizer: Tokenizer, requests: list[Request], adapters: AdapterSet,
                    prompts: list[torch.Tensor], styles: list[str], batch_size: int, decode_fn: DecodeFn,
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
    if 0 in n_tokens:
        print(empty_answer_note(tokenizer, [style for style, n in zip(styles, n_tokens) if not n]), file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(f"{len(requests)} requests, {sum(n_tokens)} tokens in {elapsed:.2f} s: {sum(n_tokens) / elapsed:.1f} "
          "tokens/s", file=sys.stderr)
    for line in write_results(output_path, requests, texts, n_tokens):
        if output_path is None:
            print(line)
    return texts


def chat(model: LLaMA, tokenizer: Tokenizer, request: Request, adapter: Optional[int], style: str,
         system: Optional[str], decode_fn: DecodeFn, context: int) -> list[str]:
    """Answer the messages read from stdin until an empty line, each in the light of the conversation so far (after
    the ``system`` message, if any).

    The oldest exchanges are dropped when the conversation and the answer no longer fit ``context`` tokens.
    """
    model.set_kv_cache(batch_size=1, max_seq_length=context)
    select_row(model, adapter)
    lead: list[Message] = [{"role": "system", "content": system}] if system else []
    messages: list[Message] = []
    replies = []
    print("Chat: type a message and Enter; an empty line ends.", file=sys.stderr)
    for line in stdin_lines():
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = get_style(style).encode(tokenizer, lead + messages)
        while ids.numel() + request.max_new_tokens > context and len(messages) > 1:
            messages = messages[2:]
            ids = get_style(style).encode(tokenizer, lead + messages)
        if ids.numel() + request.max_new_tokens > context:
            raise UserError(f"the message is {ids.numel()} tokens; with max_new_tokens={request.max_new_tokens} it "
                            f"exceeds the chat's context of {context} tokens (--chat_context, at most the "
                            f"model's {model.config.block_size})")
        tokens = generate(model, ids, request.max_new_tokens, request.temperature, request.top_k, request.top_p,
                          tokenizer.stop_ids, decode_fn)
        replies.append(tokenizer.decode(stream_text(tokenizer, tokens)))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def stdin_lines() -> Iterator[str]:
    """The lines typed on stdin, read as UTF-8 whatever the locale; a line that is not UTF-8 is a ``UserError``."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="strict")
    try:
        yield from sys.stdin
    except UnicodeDecodeError as err:
        raise UserError(f"the message typed is not UTF-8 text (byte {err.start}): type UTF-8, or set a UTF-8 "
                        "locale") from None
