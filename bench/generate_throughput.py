"""Generation speed through the project's own decoding loop: eager, CUDA graph, compiled (in this process, or
stored on disk by an earlier one), and a batch of adapters.

    python bench/generate_throughput.py --preset llama-7b --prompt_length 32 --max_new_tokens 200
    python bench/generate_throughput.py --preset tiny --device cpu --modes eager,graph,batch   # a CPU smoke check

One random base with ``batch_size`` random adapters (random prompts, non-zero gates); batch-1 modes use adapter 0,
the batch mode gives row i adapter i and a prompt of its own length, and checks each row's greedy tokens against
that adapter alone at batch 1 (on a GPU also in float32, where kernels for 1 and 16 rows differ far less).
The compiler starts from an empty cache (a fresh TORCHINDUCTOR_CACHE_DIR), unless TORCHINDUCTOR_CACHE_DIR names one:
run twice with the same folder, and the second run's first token is that of a start with warm caches, as a user's
second run on the same machine. The stored mode keeps its compiled steps (``StoredDecode``) in that folder's
``stored/``: its second run's first token is a start that loads the step instead of compiling it. The table comes
last.
"""

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cache-"))  # before torch reads it
os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth, int4_reference, median, random_model, stored_bytes  # noqa: E402
from lit_adapter.adapter import AdapterLLaMA, adapter_state_dict  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.precision import PRECISIONS, GenerationPrecision, base_dtype, check_device  # noqa: E402
from lit_adapter.generate.decode import (DecodeFn, GraphDecode, StoredDecode, compile_decode,  # noqa: E402
                                         decode_one_token, generate_steps)

MODES = ("eager", "graph", "compiled", "stored", "batch")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generation(model: AdapterLLaMA, prompts: list[torch.Tensor], max_new_tokens: int, decode_fn: DecodeFn,
                     start: Optional[float] = None) -> tuple[float, float, list[list[int]]]:
    """Seconds to the first token and in all (from ``start``, default now), and each row's tokens, of one greedy
    generation without stop ids."""
    sync(model.embed.weight.device)
    start = start or time.perf_counter()
    first, steps = None, []
    for step in generate_steps(model, prompts, max_new_tokens, temperature=0, decode_fn=decode_fn):
        first = first or time.perf_counter() - start
        steps.append(step)
    sync(model.embed.weight.device)
    return first, time.perf_counter() - start, [list(row) for row in zip(*steps)]


def prepare(model: AdapterLLaMA, prompts: list[torch.Tensor], rows: list[int], max_new_tokens: int) -> None:
    """A KV cache for ``prompts`` and ``max_new_tokens``, with adapter ``rows[b]`` in row b."""
    model.set_kv_cache(len(prompts), max(p.numel() for p in prompts) + max_new_tokens)
    model.select_adapters(rows)


def measure(model: AdapterLLaMA, prompts: list[torch.Tensor], rows: list[int], max_new_tokens: int,
            decode_fn: DecodeFn, repeats: int) -> dict:
    """The first run from the loaded model (cache and warm-up included) and the median of ``repeats`` more."""
    if model.embed.weight.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    prepare(model, prompts, rows, max_new_tokens)
    first_token, first_run, tokens = timed_generation(model, prompts, max_new_tokens, decode_fn, start)
    times = [timed_generation(model, prompts, max_new_tokens, decode_fn)[1] for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.embed.weight.is_cuda else 0.0
    return {"batch": len(prompts), "tokens/s": len(prompts) * max_new_tokens / median(times),
            "first token s": first_token, "first run s": first_run, "min s": min(times), "max s": max(times),
            "tokens": tokens, "peak GiB": peak}


def alone_at_batch_1(model: AdapterLLaMA, prompts: list[torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of prompt i with adapter i, one prompt at a time (CUDA graph decoding)."""
    model.set_kv_cache(1, max(p.numel() for p in prompts) + max_new_tokens)
    decode_fn, tokens = GraphDecode(), []
    for i, prompt in enumerate(prompts):
        model.select_adapters([i])
        tokens.append(timed_generation(model, [prompt], max_new_tokens, decode_fn)[2][0])
    return tokens


def random_adapters(model: AdapterLLaMA, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` adapters shaped like ``model``'s: unit-normal prompts, gates of standard deviation 0.1."""
    return [{name: torch.randn_like(t) * (0.1 if name.endswith("gate") else 1.0)
             for name, t in adapter_state_dict(model).items()} for _ in range(n)]


def main(preset: str = "llama-7b", prompt_length: int = 32, max_new_tokens: int = 200, repeats: int = 5,
         batch_size: int = 16, modes: str = ",".join(MODES), device: Optional[str] = None,
         precision: Optional[GenerationPrecision] = None) -> None:
    """Measure generation tokens/s with random weights (bf16 on a GPU, float32 on the CPU, or ``precision``).

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        prompt_length: Prompt tokens at batch 1; the batch's prompts have lengths from prompt_length - 7 up.
        max_new_tokens: Tokens generated per row and run.
        repeats: Timed runs per mode (the median is reported), after one warm-up run.
        batch_size: Rows of the batch mode, each with its own adapter.
        modes: Comma-separated subset of eager, graph, compiled, stored (batch 1, adapter 0; stored: compiled once
            and kept on disk, loaded by later runs) and batch (graph, batch_size adapters).
        device: cuda or cpu (default: cuda where there is one).
        precision: The base's precision as generate/adapter.py --precision takes it (default: bf16-true on a GPU,
            32-true on the CPU); with a quantized base, the batch mode's float32 check uses the bf16 base's float32
            copy, and the last lines compare the quantized model's logits of one prompt with the bf16 model's (and,
            for int4-base, with the bf16 model whose weights are int4-base's dequantized: the kernel's own error).
    """
    chosen, checks = modes.split(","), []
    if set(chosen) - set(MODES) or prompt_length < 8:
        raise SystemExit(f"modes must come from {', '.join(MODES)}; prompt_length at least 8")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    config = Config.from_name(preset)
    precision = precision or ("bf16-true" if on_cuda else "32-true")
    check_device(precision, device)
    model = adapter_model(config, batch_size, device, precision)
    weight_bytes = stored_bytes(model)
    bandwidth = copy_bandwidth() if on_cuda else None
    name = f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s" if on_cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, {precision}, {weight_bytes / 2**30:.2f} GiB of weights, "
          f"inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")

    prompt = torch.randint(0, config.vocab_size, (prompt_length,))
    if PRECISIONS[precision].quantize is not None:
        checks += logit_errors(model, config, batch_size, device, precision, prompt)
    results = {}
    decoders = {"eager": decode_one_token, "graph": GraphDecode(), "compiled": compile_decode(),
                "stored": StoredDecode(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "stored")}
    for mode in [m for m in MODES if m in chosen and m != "batch"]:
        results[mode] = measure(model, [prompt], [0], max_new_tokens, decoders[mode], repeats)
        if mode in ("compiled", "stored"):
            print("compile phases (s):", torch._dynamo.utils.compile_times(repr="str", aggregate=True))
            torch._dynamo.reset()
    if "batch" in chosen:
        prompts = [torch.randint(0, config.vocab_size, (prompt_length - i % 8,)) for i in range(batch_size)]
        results["batch"] = measure(model, prompts, list(range(batch_size)), max_new_tokens, GraphDecode(), repeats)
        checks.append(equality(str(model.embed.weight.dtype), results["batch"]["tokens"],
                               alone_at_batch_1(model, prompts, max_new_tokens)))
        if on_cuda:  # float32 as well: bf16 kernels for 1 and 16 rows may round differently (not a batching error)
            del model
            torch.cuda.empty_cache()
            exact = adapter_model(config, batch_size, device, "32-true")
            start = time.perf_counter()
            prepare(exact, prompts, list(range(batch_size)), max_new_tokens)
            batched = timed_generation(exact, prompts, max_new_tokens, GraphDecode(), start)[2]
            checks.append(equality("torch.float32", batched, alone_at_batch_1(exact, prompts, max_new_tokens)))
    print_table(results, preset, prompt_length, max_new_tokens, repeats, weight_bytes, bandwidth)
    for line in checks:
        print(line)


def adapter_model(config: Config, n_adapters: int, device: torch.device, precision: str) -> AdapterLLaMA:
    """The random base (seed 0) in ``precision`` with ``n_adapters`` random adapters registered."""
    torch.manual_seed(0)
    model = random_model(config, adapter=True, device=device, dtype=base_dtype(precision, device.type),
                         quantize=PRECISIONS[precision].quantize).eval()
    model.register_adapters(random_adapters(model, n_adapters))
    return model


def logit_errors(model: AdapterLLaMA, config: Config, n_adapters: int, device: torch.device, precision: str,
                 prompt: torch.Tensor) -> list[str]:
    """Lines: the relative error of the quantized ``model``'s logits for ``prompt`` against the same random model
    unquantized (and, for int4-base, against it with int4-base's dequantized weights)."""
    references = {"unquantized": None}
    if precision == "int4-base":
        references["dequantized int4"] = int4_reference
    idx = prompt[None].to(device)
    with torch.no_grad():
        logits = model(idx).float()
        lines = []
        for label, quantize in references.items():
            torch.manual_seed(0)
            reference = random_model(config, adapter=True, device=device, dtype=base_dtype("bf16-true", device.type),
                                     quantize=quantize).eval()
            reference.register_adapters(random_adapters(reference, n_adapters))
            expected = reference(idx).float()
            lines.append(f"{precision} logits against the {label} model: relative error "
                         f"{((logits - expected).norm() / expected.norm()).item():.4f}, same argmax at "
                         f"{(logits.argmax(-1) == expected.argmax(-1)).float().mean().item():.1%} of positions")
            del reference
    return lines


def equality(label: str, batched: list[list[int]], alone: list[list[int]]) -> str:
    """A line: how many batch rows have exactly the greedy tokens of their adapter alone, and where others differ."""
    differ = {i: next(t for t, (a, b) in enumerate(zip(row, single)) if a != b)
              for i, (row, single) in enumerate(zip(batched, alone)) if row != single}
    return (f"{label}: batch rows equal to their adapter alone at batch 1 (greedy): {len(batched) - len(differ)}"
            f"/{len(batched)}" + (f"; first differing step by row: {differ}" if differ else ""))


def print_table(results: dict, preset: str, prompt_length: int, max_new_tokens: int, repeats: int,
                weight_bytes: int, bandwidth: Optional[float]) -> None:
    print(f"\n{preset} + adapter, prompt {prompt_length}, {max_new_tokens} new tokens, median of {repeats} runs; "
          "first token: from the loaded model (cache, prefill, capture or compile included)")
    print(f"{'mode':9} {'batch':>5} {'tokens/s':>9} {'of BW limit':>11} {'first token s':>13} {'first run s':>11} "
          f"{'min..max s':>14} {'peak GiB':>8}")
    for mode, r in results.items():
        limit = f"{weight_bytes * r['tokens/s'] / r['batch'] / bandwidth:11.1%}" if bandwidth else f"{'-':>11}"
        print(f"{mode:9} {r['batch']:5d} {r['tokens/s']:9.1f} {limit} {r['first token s']:13.2f} "
              f"{r['first run s']:11.1f} {r['min s']:6.3f}..{r['max s']:6.3f} {r['peak GiB']:8.2f}")
    if "batch" in results and "graph" in results:
        print(f"batch {results['batch']['batch']} / batch 1 (graph): "
              f"{results['batch']['tokens/s'] / results['graph']['tokens/s']:.1f}x total tokens/s")


if __name__ == "__main__":
    run_cli(main)
