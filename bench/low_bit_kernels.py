"""Batch-1 linear layers of LLaMA-7B with a weight-only quantized base, kernel by kernel (issue 25).

    python bench/low_bit_kernels.py          # needs a GPU, torchao, and gemlite for its rows (pip install gemlite)

Decoding reads every weight once a token, so a layer's time at one row is its weight bytes over the bandwidth it
reaches. Each of LLaMA-7B's four linear shapes (the attention's input and output projections, the MLP's gate-and-up
and down projections) runs one row, 100 calls captured in one CUDA graph, as the decode paths replay them:

- bf16: ``F.linear`` (cuBLAS), the bf16 base;
- torchao int8 (a scale per output row), compiled by Inductor as the compiled decode step runs it;
- torchao int4, tinygemm kernel, groups of 128 and 32 (int4-base's two groups);
- torchao int4 in groups of 128 through MSLK's (FBGEMM GenAI's) CUTLASS kernels for Hopper, preshuffled and plain
  (``pip install mslk-cuda``);
- GemLite's Triton kernels (A16W8 with a scale per row; A16W4 in groups of 128, asymmetric), eagerly, called
  directly and through torchao's ``UIntxWeightOnlyConfig`` (its tensor subclass on the ``nn.Linear``).

It prints microseconds per call, the weight bytes read per second, and the output's error against bf16.
"""

import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import attempt, frozen_linear, relative_error, stored_bytes  # noqa: E402
from bench.fused_kernels import graph_ms  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.quantize.low_bit import import_torchao  # noqa: E402

Layer = Callable[[torch.Tensor], torch.Tensor]


def shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a block."""
    C, I = config.n_embd, config.intermediate_size
    kv = config.n_kv_head * config.head_dim
    return {"qkv": (C, C + 2 * kv), "proj": (C, C), "gate_up": (C, 2 * I), "down": (I, C)}


def torchao_layer(weight: torch.Tensor, config: object, compile: bool) -> tuple[Layer, int]:
    linear = frozen_linear(weight)
    import_torchao("int4-base").quantize_(linear, config)
    return (torch.compile(linear) if compile else linear), stored_bytes(linear)


def gemlite_int8(weight: torch.Tensor) -> tuple[Layer, int]:
    from gemlite.helper import A16W8_INT8

    layer = A16W8_INT8(device="cuda", dtype=torch.bfloat16).from_weights(weight.clone())
    return layer, weight.numel() + 4 * weight.size(0)


def gemlite_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[Layer, int]:
    """Asymmetric min-max int4 in groups, GemLite's (HQQ's) layout: weight ~ (q - zero) * scale."""
    from gemlite.helper import A16W4_HQQ_INT

    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    zero = -low / scale
    q = (groups / scale + zero).round().clamp(0, 15).to(torch.uint8).reshape(rows, columns)
    layer = A16W4_HQQ_INT(device="cuda", dtype=torch.bfloat16).from_weights(
        q, scale.reshape(rows, -1).to(torch.bfloat16), zero.reshape(rows, -1).to(torch.bfloat16))
    return layer, weight.numel() // 2 + 4 * weight.numel() // group_size


def variants(weight: torch.Tensor) -> dict[str, Callable[[], tuple[Layer, int]]]:
    ao = import_torchao("int4-base")

    def int4(group_size: int, packing: str = "tile_packed_to_4d") -> object:
        return ao.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=packing, set_inductor_config=False)

    def uintx(bits: int, group_size: Optional[int]) -> object:
        from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig

        return UIntxWeightOnlyConfig(group_size=group_size, bit_width=bits, set_inductor_config=False)

    return {
        "bf16 (cuBLAS)": lambda: ((lambda x: F.linear(x, weight)), weight.numel() * 2),
        "torchao int8, Inductor": lambda: torchao_layer(weight, ao.Int8WeightOnlyConfig(set_inductor_config=False),
                                                        compile=True),
        "torchao int4 g128, tinygemm": lambda: torchao_layer(weight, int4(128), compile=False),
        "torchao int4 g32, tinygemm": lambda: torchao_layer(weight, int4(32), compile=False),
        "torchao int4 g128, MSLK preshuffled": lambda: torchao_layer(weight, int4(128, "preshuffled"), compile=False),
        "torchao int4 g128, MSLK plain": lambda: torchao_layer(weight, int4(128, "plain"), compile=False),
        "GemLite int8": lambda: gemlite_int8(weight),
        "GemLite int4 g128": lambda: gemlite_int4(weight),
        "torchao UIntx int8 (GemLite)": lambda: torchao_layer(weight, uintx(8, None), compile=False),
        "torchao UIntx int4 g128 (GemLite)": lambda: torchao_layer(weight, uintx(4, 128), compile=False),
    }


def measure(build: Callable[[], tuple[Layer, int]], x: torch.Tensor, expected: torch.Tensor,
            repeats: int) -> tuple[float, int, float]:
    """The layer ``build`` makes: its microseconds per call at ``x``, its weight bytes, its error against bf16."""
    layer, nbytes = build()
    with torch.no_grad():
        return graph_ms(layer, (x,), repeats) * 1e3, nbytes, relative_error(layer, x, expected)


def main(preset: str = "llama-7b", repeats: int = 20) -> None:
    """Time each kernel on each of the preset's linear shapes at one row; print one table.

    Args:
        preset: Model preset whose linear shapes are timed (lit_adapter.config.PRESETS).
        repeats: Timed replays of each graph (the median is reported).
    """
    config = Config.from_name(preset)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {preset}, one row, median of {repeats}")
    print("| layer (in -> out) | kernel | us per call | weight GB/s | error against bf16 |\n|---|---|---|---|---|")
    totals: dict[str, float] = {}
    for name, (n_in, n_out) in shapes(config).items():
        weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
        x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x, weight).float()
        for kernel, build in variants(weight).items():
            measured = attempt(lambda: measure(build, x, expected, repeats))  # a missing library, a kernel missing
            if isinstance(measured, str):
                print(f"| {name} ({n_in} -> {n_out}) | {kernel} | {measured} | | |")
                continue
            us, nbytes, err = measured
            totals[kernel] = totals.get(kernel, 0.0) + us
            print(f"| {name} ({n_in} -> {n_out}) | {kernel} | {us:.1f} | {nbytes / us / 1e3:,.0f} | {err:.4f} |")
    print("\nall four layers of a block, one row (us), and against bf16")
    print("| kernel | us | against bf16 |\n|---|---|---|")
    for kernel, us in totals.items():
        print(f"| {kernel} | {us:.1f} | {totals['bf16 (cuBLAS)'] / us:.2f}x |")


if __name__ == "__main__":
    run_cli(main)
