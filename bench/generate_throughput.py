"""Batch-1 generation speed through the project's own generate(): base and adapter, eager and compiled.

    python bench/generate_throughput.py --preset llama-7b --prompt_length 32 --max_new_tokens 200
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth, median, random_model  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.generation import compile_decode, decode_one_token, generate  # noqa: E402


def run_generation(model, prompt: torch.Tensor, max_new_tokens: int, decode_fn) -> float:
    """Seconds to generate ``max_new_tokens`` tokens (no EOS stop), prefill included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = sum(1 for _ in generate(model, prompt, max_new_tokens, temperature=0, decode_fn=decode_fn))
    torch.cuda.synchronize()
    assert n == max_new_tokens
    return time.perf_counter() - start


def main(preset: str = "llama-7b", prompt_length: int = 32, max_new_tokens: int = 200, repeats: int = 5,
         modes: str = "base-eager,adapter-eager,base-compiled,adapter-compiled") -> None:
    """Measure tokens/s of batch-1 generation with random weights (bf16) on one GPU.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        prompt_length: Prompt tokens.
        max_new_tokens: Tokens generated per run.
        repeats: Timed runs per mode (the median is reported), after one warm-up run.
        modes: Comma-separated subset of base-eager, adapter-eager, base-compiled, adapter-compiled.
    """
    config = Config.from_name(preset)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for mode in modes.split(","):
        kind, how = mode.split("-")
        torch.manual_seed(0)
        model = random_model(config, adapter=kind == "adapter").eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        prompt = torch.randint(0, config.vocab_size, (prompt_length,), device="cuda")
        model.set_kv_cache(batch_size=1, max_seq_length=prompt_length + max_new_tokens)
        decode_fn = compile_decode() if how == "compiled" else decode_one_token
        torch.cuda.reset_peak_memory_stats()
        warmup = run_generation(model, prompt, max_new_tokens, decode_fn)
        times = [run_generation(model, prompt, max_new_tokens, decode_fn) for _ in range(repeats)]
        tokens_per_s = max_new_tokens / median(times)
        if how == "compiled":
            print(f"{mode} compile phases (s):", torch._dynamo.utils.compile_times(repr="str", aggregate=True))
        rows.append((mode, tokens_per_s, weight_bytes * tokens_per_s / bandwidth, warmup,
                     torch.cuda.max_memory_allocated() / 2**30, min(times), max(times)))
        del model, decode_fn
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(f"\n{preset}, prompt {prompt_length}, {max_new_tokens} new tokens, median of {repeats} runs")
    print(f"{'mode':18} {'tokens/s':>9} {'of BW limit':>11} {'first run s':>11} {'peak GiB':>9} {'min..max s':>14}")
    for mode, tps, frac, warm, peak, lo, hi in rows:
        print(f"{mode:18} {tps:9.1f} {frac:11.1%} {warm:11.1f} {peak:9.2f} {lo:6.3f}..{hi:6.3f}")


if __name__ == "__main__":
    run_cli(main)
