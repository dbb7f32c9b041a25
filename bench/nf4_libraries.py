"""nf4-base's library: torchao's NF4 tensor against bitsandbytes' 4-bit layer, layer by layer (issue 25).

    python bench/nf4_libraries.py          # needs a GPU, torchao and bitsandbytes (pip install bitsandbytes)

Both store QLoRA's format (NF4 in blocks of 64, the blocks' scales in 8 bits per 256), and their quality is the same
(bench/RESULTS.md: SmolLM2's and TinyStories 260K's perplexities through either differ by at most 0.2%); what
decides is speed, memory and what runs under ``torch.compile``. For each of the preset's four linear shapes (random
bf16 weights) and each layer (bf16; torchao's NF4 as nf4-base stores it, eager and compiled; bitsandbytes'
``Linear4bit``, eager and compiled):

- training: the forward and the input's gradient for ``tokens`` rows (the base is frozen: no weight gradient);
- decoding: the forward of one row, 100 calls captured in one CUDA graph, as the decode paths replay them.

It prints milliseconds per call, the bytes each layer stores, and the output's error against bf16 (the error of the
4-bit format, the same for both libraries but for rounding).
"""

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (attempt, cell, cuda_time, frozen_linear, median, relative_error,  # noqa: E402
                          replace_weights, stored_bytes)
from bench.fused_kernels import graph_ms  # noqa: E402
from bench.low_bit_kernels import shapes  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.quantize.low_bit import NF4_BLOCK, NF4_SCALER_BLOCK, quantize_nf4  # noqa: E402


def torchao_nf4(weight: torch.Tensor) -> nn.Module:
    """The layer as nf4-base stores it (``quantize_nf4``: torchao's NF4 tensor as the ``nn.Linear``'s weight)."""
    linear = frozen_linear(weight)
    quantize_nf4(nn.Sequential(linear))
    return linear


def bitsandbytes_nf4(weight: torch.Tensor) -> nn.Module:
    """bitsandbytes' QLoRA layer: NF4 in blocks of 64 with compressed (double-quantised) statistics."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.size(1), weight.size(0), bias=False, compute_dtype=weight.dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.clone(), blocksize=NF4_BLOCK, compress_statistics=True,
                                     quant_type="nf4", module=layer).to(weight.device)  # quantizes it
    return layer


def bitsandbytes_nf4_reference(block: nn.Module) -> int:
    """A quantizer that keeps plain weights: the block's frozen weights through bitsandbytes' NF4 (as
    ``bitsandbytes_nf4`` stores them) and back, to compare its quality with nf4-base's (bench/quantized_quality.py)."""
    import bitsandbytes.functional as bnb

    def round_trip(weight: torch.Tensor) -> torch.Tensor:
        return bnb.dequantize_4bit(*bnb.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=True,
                                                      quant_type="nf4"))
    return replace_weights(block, round_trip)


LAYERS: dict[str, Callable[[torch.Tensor], nn.Module]] = {
    "bf16": frozen_linear,
    "torchao NF4": torchao_nf4,
    "torchao NF4, compiled": lambda weight: torch.compile(torchao_nf4(weight)),
    "bitsandbytes NF4": bitsandbytes_nf4,
    "bitsandbytes NF4, compiled": lambda weight: torch.compile(bitsandbytes_nf4(weight)),
}


SUMMED = ("training", "decoding", "MB")
"""The columns that add up over a block's four layers."""


def training_ms(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Milliseconds of the forward and the input's gradient (the weight is frozen)."""
    return median(cuda_time(lambda: layer(x).sum().backward(), repeats, warmup=3)) * 1e3


def decoding_us(layer: nn.Module, row: torch.Tensor, repeats: int) -> float:
    """Microseconds of one row's forward, replayed from a CUDA graph."""
    with torch.no_grad():
        return graph_ms(layer, (row,), repeats) * 1e3


def main(preset: str = "llama-7b", tokens: int = 2048, repeats: int = 20) -> None:
    """Time each library's NF4 layer on each of the preset's linear shapes; print one table and the block's totals.

    Args:
        preset: Model preset whose linear shapes are timed (lit_adapter.config.PRESETS).
        tokens: Rows of a training micro-batch (4 x 512 by default).
        repeats: Timings of each figure (the median is reported).
    """
    config = Config.from_name(preset)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {preset}, NF4 blocks of {NF4_BLOCK} "
          f"(scales per {NF4_SCALER_BLOCK}), median of {repeats}")
    print(f"| layer (in -> out) | library | training, {tokens} rows (ms) | decoding, 1 row (us) | MB stored | "
          "error against bf16 |\n|---|---|---|---|---|---|")
    totals: dict[str, dict[str, float]] = {}
    for name, (n_in, n_out) in shapes(config).items():
        weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(row, weight).float()
        for library, build in LAYERS.items():
            layer = attempt(lambda: build(weight))
            if isinstance(layer, str):
                print(f"| {name} ({n_in} -> {n_out}) | {library} | {layer} | | | |")
                continue
            cells = {"training": attempt(lambda: training_ms(layer, x, repeats)),
                     "decoding": attempt(lambda: decoding_us(layer, row, repeats)),
                     "MB": stored_bytes(layer) / 1e6,
                     "error": attempt(lambda: relative_error(layer, row, expected))}
            for column in SUMMED:
                if not isinstance(cells[column], str):
                    totals.setdefault(library, {}).setdefault(column, 0.0)
                    totals[library][column] += cells[column]
            print(f"| {name} ({n_in} -> {n_out}) | {library} | {cell(cells['training'], 3)} | "
                  f"{cell(cells['decoding'], 1)} | {cells['MB']:.1f} | {cell(cells['error'], 4)} |")
    print("\nall four layers of a block (a sum over the layers that ran)")
    print(f"| library | training, {tokens} rows (ms) | decoding, 1 row (us) | MB stored |\n|---|---|---|---|")
    for library, sums in totals.items():
        print(f"| {library} | " + " | ".join(cell(sums.get(column, "failed"), 2) for column in SUMMED) + " |")


if __name__ == "__main__":
    run_cli(main)
