"""Compiled batch-1 decoding with and without coordinate-descent tuning, each in a process of its own.

    python bench/decode_compile_options.py --variants plain,tuned      # 7B, random weights, bf16, one GPU

``tuned`` is what ``generation.compile_decode`` ships; ``plain`` leaves Inductor's defaults. Each variant starts
in a new process from an empty inductor cache (a variant run after another in one process reuses its kernels:
faster to compile, slower to run) and reports the median of 5 generations of 200 tokens after a prompt of 32.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")  # before torch reads it

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth  # noqa: E402
from bench.generate_throughput import adapter_model, measure  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.errors import UserError  # noqa: E402
from lit_adapter.generation import compile_decode, decode_one_token  # noqa: E402


def main(preset: str = "llama-7b", variants: str = "plain,tuned", repeats: int = 5) -> None:
    """Print tokens/s, share of the bandwidth limit and time to the first token of each compile variant.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        variants: plain (Inductor's defaults) or tuned (coordinate descent); comma-separated, each in a new process.
        repeats: Timed generations per variant; the median is reported.
    """
    names = variants.split(",")
    unknown = set(names) - {"plain", "tuned"}
    if unknown:
        raise UserError(f"unknown variants {sorted(unknown)}: choose among plain, tuned")
    if len(names) > 1:
        for variant in names:
            subprocess.run([sys.executable, __file__, "--preset", preset, "--variants", variant,
                            "--repeats", str(repeats)], check=True)
        return
    config = Config.from_name(preset)
    model = adapter_model(config, 1, torch.device("cuda"), torch.bfloat16)
    prompt = torch.randint(0, config.vocab_size, (32,))
    bandwidth = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, torch {torch.__version__}")
    step = compile_decode() if variants == "tuned" else \
        torch.compile(decode_one_token, fullgraph=True, options={"triton.cudagraphs": True})
    r = measure(model, [prompt], [0], 200, step, repeats)
    print(f"{variants}: {r['tokens/s']:.1f} tokens/s, {weight_bytes * r['tokens/s'] / bandwidth:.1%} of the "
          f"bandwidth limit, first token {r['first token s']:.1f} s, runs {r['min s']:.3f}..{r['max s']:.3f} s")


if __name__ == "__main__":
    run_cli(main)
