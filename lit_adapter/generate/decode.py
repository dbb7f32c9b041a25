"""The decoding core: prefill the prompts, then decode one token at a time from a static KV cache.

The one-token step has fixed shapes and fixed addresses, so on a GPU it is captured as is in a CUDA graph
(``GraphDecode``, ready within seconds) or compiled into one (``compile_decode``: a long warm-up, then faster;
``StoredDecode`` keeps the compiled step on disk, so later starts skip the warm-up; bench/RESULTS.md has the
figures); sampling stays on the device (no host synchronisation inside the step). A batch
holds prompts of different lengths, each row at its own positions and, with an adapter model, with its own adapter.
The command line around it is ``lit_adapter.generate.cli``.
"""

import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional, Sequence, TextIO

import torch

from lit_adapter.errors import UserError, one_line
from lit_adapter.files import atomic_path
from lit_adapter.generate.sampling import TINY, Option, check_token, sample, seeded_noise
from lit_adapter.model import CacheView, LLaMA
from lit_adapter.tokenizer import Tokenizer

DecodeFn = Callable[..., torch.Tensor]


def decode_one_token(model: LLaMA, token: torch.Tensor, input_pos: torch.Tensor, temperature: Option,
                     top_k: Optional[Option], top_p: Option, seeds: Optional[torch.Tensor] = None,
                     view: Optional[CacheView] = None) -> torch.Tensor:
    """One decoding step: each row's token (B, 1) at its own position ``input_pos`` (B, 1) in, the next (B, 1) out,
    drawn with torch's generator or, given ``seeds`` (B,), with each row's ``seeded_noise``. A row whose token
    is ``NON_FINITE`` (its job has failed) reads token 0."""
    logits = model(token.clamp(min=0), input_pos, view=view)[:, -1]  # a NON_FINITE row reads token 0
    noise = None if seeds is None else seeded_noise(seeds, input_pos + 1, logits.size(-1))
    return sample(logits, temperature, top_k, top_p, noise)


COMPILE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
"""Inductor's options for the decoding step: CUDA graphs (on CPU: none), and coordinate-descent tuning, which picks
the launch shapes of batch-1 decoding's matrix-vector kernels so that they read the weights near the bandwidth."""

STORED_OPTIONS: dict[str, Any] = {}
"""Inductor's options for a stored step: its defaults (see ``StoredDecode`` for why)."""

COMPILED_STEPS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_adapter" / "decode"
"""Where the command line stores compiled decoding steps (``StoredDecode``) unless told otherwise."""

CACHE_MULTIPLE = 256


def rounded_cache_length(needed: int, block_size: int) -> int:
    """KV cache positions for ``needed`` (prompt and new tokens): rounded up to a multiple of 256, at most the
    model's ``block_size``, so that prompts of similar lengths share one compiled (or stored) decoding step."""
    return min(-(-needed // CACHE_MULTIPLE) * CACHE_MULTIPLE, block_size)


def compile_decode(fn: DecodeFn = decode_one_token) -> DecodeFn:
    """The decoding step compiled into a CUDA graph (on CPU: compiled without graphs)."""
    return torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS)


class StoredDecode:
    """The decoding step compiled ahead of time and stored in ``folder``: one file per model shape and kind of call,
    which later starts load within seconds instead of compiling for a minute; on a GPU it replays in a CUDA graph.

    A stored step holds Dynamo's graph and guards and Inductor's code (``torch.compile``'s ``aot_compile``); the
    weights are its inputs, so one file serves every checkpoint of that shape and precision. Its name hashes what
    the compiled code depends on: PyTorch (and torchao), the GPU, this package's source, the model's tensors (names,
    shapes, dtypes, kinds) and the call's arguments. Sampling options go in as (B, 1) tensors, so one step serves
    every temperature, top_k and top_p; the kinds of call are greedy, sampling, and sampling with filters. Where a
    step cannot be stored, ``compile_unstorable`` says whether it is compiled for the run or runs uncompiled.

    It is compiled with Inductor's defaults (``STORED_OPTIONS``) and captured by ``GraphDecode``: on PyTorch 2.11 a
    loaded step kept neither Inductor's CUDA graphs (155 tokens/s where the step that stored it ran 999) nor the
    coordinate-descent tuning's choices (21 s of tuning again at the first token; bench/RESULTS.md).
    """

    def __init__(self, folder: Path, compile_unstorable: bool = True) -> None:
        self.folder, self.compile_unstorable = Path(folder), compile_unstorable
        self.steps: dict[tuple, DecodeFn] = {}

    def __call__(self, model: LLaMA, *args: Any) -> torch.Tensor:
        args = sampling_as_rows(*args)
        key = (id(model), id(model.cache_positions), *call_signature(args))
        if key not in self.steps:
            self.steps[key] = self.load_or_compile(model, args)
        return self.steps[key](model, *args)

    def path(self, model: LLaMA, args: Sequence[Any]) -> Path:
        """The file of the stored step for calls like ``args``."""
        torchao = sys.modules.get("torchao")  # its tensor subclasses' code is traced into a quantized base's step
        parts = [torch.__version__, str(torch.version.cuda), getattr(torchao, "__version__", ""),
                 device_name(model.embed.weight.device),
                 source_fingerprint(), repr(STORED_OPTIONS),
                 type(model).__name__, repr(model.config), *tensor_signature(model), *map(repr, call_signature(args))]
        return self.folder / f"{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}.pt2"

    def load_or_compile(self, model: LLaMA, args: Sequence[Any]) -> DecodeFn:
        if not hasattr(torch.compiler, "load_compiled_function"):
            return self.unstorable(f"PyTorch {torch.__version__} cannot store it (newer versions can)")
        path = self.path(model, args)
        step = load_stored_step(path, model, args) if path.is_file() else None
        return GraphDecode(step) if step is not None else self.compile_and_store(path, model, args)

    def compile_and_store(self, path: Path, model: LLaMA, args: Sequence[Any]) -> DecodeFn:
        print(f"Compiling the decoding step for this model and kind of call (a minute or more, once; --compile false "
              f"skips it); it will be stored as {path}", file=sys.stderr)
        started = time.perf_counter()
        # PyTorch 2.11 offers aot_compile only with this setting on, later versions always; a symbolic float (top_p
        # 1.0) would make Dynamo restart its analysis, which aot_compile cannot
        settings = {"specialize_float": True}
        if hasattr(torch._dynamo.config, "enable_aot_compile"):
            settings["enable_aot_compile"] = True
        try:
            with torch._dynamo.config.patch(settings):
                compiled = torch.compile(decode_one_token, fullgraph=True, options=STORED_OPTIONS)
                step = compiled.aot_compile(((model, *args), {}))
        except Exception as err:  # e.g. torchao's int8 weights lack empty_like, which storing the guards needs
            return self.unstorable(f"compiling it to store failed: {one_line(err)}")
        try:
            with atomic_path(path) as tmp:
                step.save_compiled_function(str(tmp))
            print(f"Compiled in {time.perf_counter() - started:.0f} s and stored: later runs load it", file=sys.stderr)
        except Exception as err:  # an unwritable folder, a step that does not serialize: it still serves this run
            print(f"note: the compiled decoding step serves this run only: {one_line(err)} (--compiled_steps)",
                  file=sys.stderr)
        return GraphDecode(step)

    def unstorable(self, reason: str) -> DecodeFn:
        """The step for a model whose compiled step cannot be stored: compiled for this run, or (where compiling was
        not asked for) the eager step in a CUDA graph."""
        then = "it is compiled for this run only" if self.compile_unstorable else "it runs uncompiled"
        print(f"note: this model's decoding step cannot be stored ({reason}); {then}", file=sys.stderr)
        return compile_decode() if self.compile_unstorable else GraphDecode()


def load_stored_step(path: Path, model: LLaMA, args: Sequence[Any]) -> Optional[DecodeFn]:
    """The step stored at ``path`` if it loads and its guards hold for ``args``; else None, with a note."""
    try:
        with open(path, "rb") as f:
            step = torch.compiler.load_compiled_function(f)
        if step.guard_check(model, *args):
            return step
        reason = "its guards do not hold"
    except Exception as err:  # a damaged file, or one another PyTorch wrote
        reason = one_line(err)
    print(f"note: the stored decoding step {path} does not fit ({reason})", file=sys.stderr)
    return None


def sampling_as_rows(token: torch.Tensor, input_pos: torch.Tensor, temperature: Option, top_k: Optional[Option],
                     top_p: Option, *rest: Any) -> tuple:
    """``decode_one_token``'s arguments with the sampling options as (B, 1) tensors, so that their values are inputs of
    a compiled step, not constants. Greedy decoding (temperature 0) keeps no options; sampling without filters keeps
    top_k None and top_p 1.0; with filters, a top_k of None becomes one that keeps every token."""
    if not isinstance(temperature, torch.Tensor) and temperature < TINY:
        return token, input_pos, 0.0, None, 1.0, *rest

    def rows(value: Option, dtype: torch.dtype) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.full(token.shape, value, dtype=dtype,
                                                                        device=token.device)

    filtering = top_k is not None or isinstance(top_p, torch.Tensor) or top_p < 1.0
    if filtering:
        top_k = rows(torch.iinfo(torch.long).max if top_k is None else top_k, torch.long)
        top_p = rows(top_p, torch.float32)
    return token, input_pos, rows(temperature, torch.float32), top_k, top_p, *rest


def call_signature(args: Sequence[Any]) -> tuple:
    """What a compiled step specialises on in its arguments: tensors' shapes, dtypes and devices, other values."""
    return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args)


def tensor_signature(model: torch.nn.Module) -> list[str]:
    """Each parameter's and buffer's name, shape, dtype and kind (a quantized weight is a tensor subclass)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [f"{name}:{tuple(t.shape)}:{t.dtype}:{type(t).__name__}:{t.requires_grad}" for name, t in tensors]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def source_fingerprint() -> str:
    """A hash of this package's Python source: a stored step compiled from other code is never loaded."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


class GraphDecode:
    """The eager decoding step captured in CUDA graphs: no compiler, so it is ready within seconds.

    The KV cache is static and each graph keeps its own input buffers, so every address is fixed; a call copies the
    tensor arguments in and replays. One graph is kept per kind of call (the tensors' shapes and the other
    arguments: sampling options, cache views), all in one memory pool; a new KV cache (``set_kv_cache``) starts
    afresh. Off CUDA (tests) a replay runs the same step eagerly on the same buffers.
    """

    def __init__(self, fn: DecodeFn = decode_one_token) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[list[Any], Callable[[], None], torch.Tensor]] = {}
        self.cache: Optional[torch.Tensor] = None
        self.pool: Any = None

    def __call__(self, model: LLaMA, *args: Any) -> torch.Tensor:
        if model.cache_positions is not self.cache:
            self.graphs, self.cache = {}, model.cache_positions
        key = (id(model), *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if key not in self.graphs:
            self.graphs[key] = self.capture(model, *args)
        buffers, replay, output = self.graphs[key]
        for buffer, arg in zip(buffers, args):
            if isinstance(arg, torch.Tensor):
                buffer.copy_(arg)
        replay()
        return output

    def capture(self, model: LLaMA, *args: Any) -> tuple[list[Any], Callable[[], None], torch.Tensor]:
        """The buffers, the replay and the output of a new graph of the step for calls like ``args``."""
        buffers = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

        def step() -> torch.Tensor:
            return self.fn(model, *buffers)

        if buffers[0].device.type != "cuda":
            output = step()
            return buffers, lambda: output.copy_(step()), output
        # warm-up on a side stream, so lazy initialisations (library handles, workspaces) are not captured; it
        # writes the same keys/values the real step writes next
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        return buffers, graph.replay, output


@torch.no_grad()
def generate_steps(model: LLaMA, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int],
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
    cache_length = model.cache_positions.numel() if model.cache_positions is not None else 0
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
    logits = model(padded.to(device), torch.arange(T, device=device),
                   logits_at=(torch.arange(len(prompts), device=device), last))  # each row's last prompt position
    token = sample(logits, temperature, top_k, top_p)
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


def generate(model: LLaMA, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Collection[int] = (),
             decode_fn: DecodeFn = decode_one_token) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids following ``prompt`` (1-D ids), the last one a stop id if one came.

    The model must have a KV cache (``model.set_kv_cache``) long enough for prompt + new tokens.
    """
    for (token_id,) in generate_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, decode_fn):
        yield check_token(token_id)
        if token_id in stop_ids:
            return


def generate_batch(model: LLaMA, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int],
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
                outputs[row].append(check_token(token_id))
                done[row] = token_id in stop_ids or len(outputs[row]) == limits[row]
        if all(done):
            break
    return outputs


class TextStream:
    """The text of generated tokens, released piece by piece as it settles: never half a character, never text that
    may still turn out to start a ``stop`` string. Once the text holds a stop string, it ends before it
    (``stopped``). Each token decodes a window of the last few ids, not all of them."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to ``settled``, the settled text's tail
        self.settled = ""
        self.text, self.released, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now settled and released."""
        self.ids.append(token_id)
        self.read_window(final=False)
        return self.release(final=False)

    def finish(self) -> str:
        """The text not released yet, at the end of generation (a partial character as its replacement)."""
        self.read_window(final=True)
        return self.release(final=True)

    def read_window(self, final: bool) -> None:
        """Add the unread ids' text, unless (before the end) bytes of a character are still to come."""
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if len(window) > len(self.settled) and (final or not window.endswith("\ufffd")):
            self.text += window[len(self.settled):]
            self.prefix, self.read = self.read, len(self.ids)
            self.settled = self.tokenizer.decode(self.ids[self.prefix:self.read])

    def release(self, final: bool) -> str:
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        end = len(self.text) if final else len(self.text) - self.held_back()
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece

    def held_back(self) -> int:
        """How many of the text's last characters could begin a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if s.startswith(self.text[-n:])), default=0)


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int], out: Optional[TextIO] = None,
                stop_ids: Optional[Collection[int]] = None) -> list[int]:
    """Print the text of ``tokens`` to ``out`` (stdout) as they arrive, up to a stop id (default: the tokenizer's stop
    tokens, not printed); return the ids."""
    out = out or sys.stdout
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    stream = TextStream(tokenizer)
    for token_id in tokens:
        if token_id in stop_ids:
            break
        out.write(stream.push(token_id))
        out.flush()
    out.write(stream.finish() + "\n")
    out.flush()
    return stream.ids
