"""Compiled batch-1 decoding: our step with and without coordinate-descent tuning, and gpt-fast's beside it.

    python bench/decode_compile_options.py --variants plain,tuned          # 7B, random weights, bf16, one GPU
    python bench/decode_compile_options.py --variants tuned,gpt-fast --gpt_fast_dir ../gpt-fast --profile true
    python bench/decode_compile_options.py --variants tuned --precision int8-base --profile true   # a quantized base

``tuned`` is what ``generation.compile_decode`` ships; ``plain`` leaves Inductor's defaults; ``gpt-fast`` runs
gpt-fast's own ``generate()`` (its ``model.py`` and ``generate.py``, taken from ``gpt_fast_dir``), compiled as its
command line does, on a random model of the same shape without adapter, with its default sampling (temperature
0.8, top 200). Each variant starts in a new process from an empty inductor cache (a variant run after another in
one process reuses its kernels: faster to compile, slower to run) and reports the median of ``repeats``
generations of 200 tokens after a prompt of 32.
"""

import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")  # before torch reads it
os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth, median, print_profile, stored_bytes  # noqa: E402
from bench.generate_throughput import adapter_model, measure, timed_generation  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.errors import UserError  # noqa: E402
from lit_adapter.generate.decode import compile_decode, decode_one_token  # noqa: E402
from lit_adapter.precision import GenerationPrecision, check_device  # noqa: E402

VARIANTS = ("plain", "tuned", "gpt-fast")
GPT_FAST_NAMES = {"llama-7b": "7B", "llama-13b": "13B", "llama-30b": "30B", "llama-2-70b": "70B"}
PROMPT_LENGTH, NEW_TOKENS = 32, 200


def main(preset: str = "llama-7b", variants: str = "plain,tuned", repeats: int = 5,
         gpt_fast_dir: Optional[Path] = None, profile: bool = False,
         precision: GenerationPrecision = "bf16-true") -> None:
    """Print tokens/s, share of the bandwidth limit and time to the first token of each variant.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS); gpt-fast knows llama-7b, llama-13b, llama-30b, llama-2-70b.
        variants: Comma-separated, each in a new process: plain (Inductor's defaults), tuned (coordinate descent,
            what compile_decode ships), gpt-fast (gpt-fast's generate() without adapter; needs gpt_fast_dir).
        repeats: Timed generations per variant; the median is reported.
        gpt_fast_dir: A checkout of gpt-fast (its model.py and generate.py are imported from there).
        profile: After the timed runs, profile one more generation: the GPU's busy share and its top kernels.
        precision: The base's precision (plain and tuned) as generate/adapter.py --precision takes it.
    """
    names = variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise UserError(f"unknown variants {sorted(unknown)}: choose among {', '.join(VARIANTS)}")
    if "gpt-fast" in names:
        if gpt_fast_dir is None or not (Path(gpt_fast_dir) / "generate.py").is_file():
            raise UserError(f"the gpt-fast variant needs --gpt_fast_dir, a folder with gpt-fast's generate.py and "
                            f"model.py (got {gpt_fast_dir})")
        if precision != "bf16-true":
            raise UserError(f"the gpt-fast variant runs bf16 only (got --precision {precision})")
        if preset not in GPT_FAST_NAMES:
            raise UserError(f"gpt-fast has no model for preset {preset!r}: choose among {', '.join(GPT_FAST_NAMES)}")
    if len(names) > 1:
        for variant in names:
            command = [sys.executable, __file__, "--preset", preset, "--variants", variant, "--repeats",
                       str(repeats), "--profile", str(profile).lower(), "--precision", precision]
            subprocess.run(command + (["--gpt_fast_dir", str(gpt_fast_dir)] if gpt_fast_dir else []), check=True)
        return
    if profile:  # so that the profiler sees the kernels inside CUDA graphs; before any capture
        torch.profiler._utils._init_for_cuda_graphs()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, torch {torch.__version__}")
    if variants == "gpt-fast":
        weight_bytes, first, generation = gpt_fast_generation(Path(gpt_fast_dir), GPT_FAST_NAMES[preset])
        times = [generation() for _ in range(repeats)]
        tokens_per_s, low, high = NEW_TOKENS / median(times), min(times), max(times)
        first_label = f"first run (compilation included) {first:.1f} s"
    else:
        config = Config.from_name(preset)
        check_device(precision, torch.device("cuda"))
        model = adapter_model(config, 1, torch.device("cuda"), precision)
        weight_bytes = stored_bytes(model)
        step = compile_decode() if variants == "tuned" else \
            torch.compile(decode_one_token, fullgraph=True, options={"triton.cudagraphs": True})
        prompt = torch.randint(0, config.vocab_size, (PROMPT_LENGTH,))
        r = measure(model, [prompt], [0], NEW_TOKENS, step, repeats)
        tokens_per_s, low, high = r["tokens/s"], r["min s"], r["max s"]
        first_label = f"first token {r['first token s']:.1f} s"

        def generation() -> float:
            return timed_generation(model, [prompt], NEW_TOKENS, step)[1]
    print(f"{variants} {precision}: {tokens_per_s:.1f} tokens/s, {weight_bytes * tokens_per_s / bandwidth:.1%} of "
          f"the bandwidth limit, {first_label}, runs {low:.3f}..{high:.3f} s")
    if profile:
        print_profile(generation, torch.cuda.synchronize, steps=1, top=20)


def gpt_fast_generation(gpt_fast_dir: Path, name: str) -> tuple[int, float, Callable[[], float]]:
    """gpt-fast's model ``name`` with random bf16 weights and its decoding step compiled as its generate.py does:
    the weights' bytes, the first generation's seconds (compilation included), and a timed generation."""
    sys.path.insert(0, str(gpt_fast_dir))
    import generate as gpt_fast  # gpt-fast's generate.py (sets its Inductor options on import)

    torch.manual_seed(0)
    with torch.device("meta"):
        model = gpt_fast.Transformer.from_name(name)
    model = model.to(torch.bfloat16).to_empty(device="cuda").eval()
    with torch.no_grad():
        for param in model.parameters():  # norms at one, matrices as our random models
            nn.init.ones_(param) if param.dim() == 1 else nn.init.normal_(param, std=0.02)
    gpt_fast.decode_one_token = torch.compile(gpt_fast.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LENGTH,), device="cuda", dtype=torch.int)

    rows = {"batch_size": 1} if "batch_size" in inspect.signature(gpt_fast.generate).parameters else {}  # newer

    def generation() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpt_fast.generate(model, prompt, NEW_TOKENS, interactive=False, draft_model=None, temperature=0.8, top_k=200,
                          **rows)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes, generation(), generation


if __name__ == "__main__":
    run_cli(main)
