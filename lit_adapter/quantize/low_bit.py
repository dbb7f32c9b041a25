"""Frozen bases in 4 and 8 bits: each frozen linear layer of a block gets a quantized weight, which computes in the
activations' dtype (bf16).

- ``nf4-base`` (training and generation): torchao's 4-bit NormalFloat with double-quantised scales (QLoRA: blocks
  of 64 values, their scales in 8 bits per 256 blocks) on the ``nn.Linear``; the forward and the input gradient
  dequantize the weight.
- ``int8-base`` (generation): int8 with a scale per output row. On a GPU the layer becomes GemLite's (its Triton
  matrix-vector kernels read the weights at near the bandwidth limit; torchao's int8 weight, compiled by Inductor,
  read them at a third of it: bench/RESULTS.md); on the CPU torchao's int8 weight, the same grid.
- ``int4-base`` (generation, GPU): int4 in groups with a scale and zero point per group (asymmetric, from each
  group's minimum to its maximum), GemLite's layer: groups of 128, or of 32 for a weight that already lies on a
  4-bit grid in blocks of 32 (a model that was a 4-bit GGUF): rounding it to another grid costs much more (SmolLM2
  from its Q4_1 file: bench/RESULTS.md). ``int4_round_trip`` gives its values on any device.

The embedding, the norms and the output head stay as they are.
"""

import importlib
import logging
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.quantize import frozen_linears

TORCHAO = "torchao>=0.18"
TORCHAO_NEEDS_TORCH = "2.11"
GEMLITE = "gemlite>=0.6"
INT4_GROUP_SIZES, INT4_SOURCE_BLOCK = (128, 64, 32), 32
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def import_torchao(precision: str) -> ModuleType:
    """``torchao.quantization``, imported without its start-up chatter (optional C++ kernels that this project does
    not use); a one-line refusal where torchao is not installed or PyTorch is older than it needs."""
    if torch.__version__ < TORCHAO_NEEDS_TORCH:
        raise UserError(f"--precision {precision} needs PyTorch {TORCHAO_NEEDS_TORCH} or newer (for torchao); this "
                        f"is {torch.__version__}")
    return quiet_import("torchao.quantization", precision, TORCHAO, ("torchao", "torch.utils._pytree"))


def import_gemlite(precision: str) -> ModuleType:
    """``gemlite.helper`` (GemLite's low-bit Triton kernels, for a GPU), imported without its start-up note; a
    one-line refusal where it is not installed."""
    return quiet_import("gemlite.helper", precision, GEMLITE, ("gemlite",))


def quiet_import(module: str, precision: str, requirement: str, loggers: tuple[str, ...]) -> ModuleType:
    """``module`` imported with ``loggers`` quiet below errors; a ``UserError`` naming ``requirement`` where it is
    not installed."""
    chatty = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--precision {precision} needs {requirement.split('>')[0]}: pip install '{requirement}'") \
            from None
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


def quantize_nf4(block: nn.Module) -> int:
    """The frozen linear weights of ``block`` in NF4; return their count."""
    to_nf4 = import_torchao("nf4-base").to_nf4
    linears = frozen_linears(block)
    for _, _, linear in linears:
        linear.weight = nn.Parameter(to_nf4(linear.weight.detach(), *nf4_block_sizes(linear.weight.numel())),
                                     requires_grad=False)
    return len(linears)


def nf4_block_sizes(numel: int) -> tuple[int, int]:
    """QLoRA's blocks (64 values a scale, 256 scales a second-level scale) where they divide the weight; else the
    largest that do (SmolLM2's 960 x 576 attention weight has 8,640 blocks of 64, in 36 groups of 240)."""
    block = largest_divisor(numel, NF4_BLOCK)
    return block, largest_divisor(numel // block, NF4_SCALER_BLOCK)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)


def quantize_int8(block: nn.Module) -> int:
    """The frozen linear weights of ``block`` in int8, a scale per output row (GemLite's layers on a GPU, torchao's
    weights elsewhere); return their count."""
    if block_device(block).type == "cuda":
        helper = import_gemlite("int8-base")
        return replace_linears(block, lambda weight: helper.A16W8_INT8(device=weight.device, dtype=weight.dtype)
                               .from_weights(weight))
    ao = import_torchao("int8-base")
    return apply_config(block, ao, ao.Int8WeightOnlyConfig(set_inductor_config=False))


def quantize_int4(block: nn.Module) -> int:
    """The frozen linear weights of ``block`` as GemLite's int4 layers (a GPU), each in its ``int4_group_size``;
    return their count."""
    helper = import_gemlite("int4-base")

    def int4_layer(weight: torch.Tensor) -> nn.Module:
        values, scale, zero = int4_values(weight, int4_group_size(weight))
        return helper.A16W4_HQQ_INT(device=weight.device, dtype=weight.dtype).from_weights(values, scale, zero)

    return replace_linears(block, int4_layer)


def int4_group_size(weight: torch.Tensor) -> int:
    """int4-base's group for ``weight``: ``INT4_SOURCE_BLOCK`` (32) where its first rows hold at most 16 distinct
    values in every block of 32 along the input (the weight was 4-bit already, as GGUF's Q4 types store it), else
    the largest of ``INT4_GROUP_SIZES`` that divides its input width (128 for LLaMA's). A trained 16- or 32-bit
    weight has nearly 32 distinct values in a block."""
    columns = weight.size(-1)
    if columns % INT4_SOURCE_BLOCK:
        raise UserError(f"--precision int4-base needs linear layers whose input width is a multiple of "
                        f"{INT4_SOURCE_BLOCK}; this model has one of {columns}: use int8-base")
    blocks = weight.detach()[:64].reshape(-1, INT4_SOURCE_BLOCK).sort(dim=-1).values
    distinct = (blocks[:, 1:] != blocks[:, :-1]).sum(dim=-1) + 1
    if bool((distinct <= 16).all()):
        return INT4_SOURCE_BLOCK
    return next(size for size in INT4_GROUP_SIZES if columns % size == 0)


def int4_values(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` in int4, asymmetric in groups of ``group_size`` along the input: (values 0-15 as uint8, scale,
    zero point), the scale and zero point in bf16 and one per group, such that weight ~ (values - zero) * scale."""
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny).bfloat16()
    zero = (-low / scale.float()).bfloat16()
    values = (groups / scale.float() + zero.float()).round().clamp(0, 15).to(torch.uint8)
    return values.reshape(rows, columns), scale.reshape(rows, -1), zero.reshape(rows, -1)


def int4_round_trip(weight: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """``weight`` as ``int4-base`` stores it (in groups of ``group_size``, default its ``int4_group_size``),
    dequantized to bf16, on any device. The CPU measures int4-base's quality with it; the GPU bench checks the int4
    kernel against it."""
    group_size = group_size or int4_group_size(weight)
    values, scale, zero = int4_values(weight, group_size)
    rows, columns = weight.shape
    grouped = values.reshape(rows, -1, group_size).float()
    return ((grouped - zero[..., None].float()) * scale[..., None].float()).bfloat16().reshape(rows, columns)


def replace_linears(block: nn.Module, make: Callable[[torch.Tensor], nn.Module]) -> int:
    """Replace each frozen linear layer of ``block`` by ``make(its weight)``; return their count."""
    linears = frozen_linears(block)
    for parent, name, linear in linears:
        setattr(parent, name, make(linear.weight.detach()))
    return len(linears)


def block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def apply_config(block: nn.Module, ao: ModuleType, config: object) -> int:
    """torchao's ``quantize_`` with ``config`` on the frozen linear layers of ``block``."""
    linears = {id(linear) for _, _, linear in frozen_linears(block)}
    ao.quantize_(block, config, filter_fn=lambda module, _: id(module) in linears)
    return len(linears)


def dequantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight stored in NF4 or int8, as the float32 values it stands for."""
    return getattr(weight, "get_original_weight", weight.dequantize)().float()


def check_torchao(precision: str) -> Callable[[torch.device], None]:
    """A device check for ``precision`` that refuses in one line where torchao is missing (any device runs it)."""
    def check(device: torch.device) -> None:
        import_torchao(precision)
    return check


def check_int8_device(device: torch.device) -> None:
    """Refuse in one line where int8-base's library is missing: GemLite on a GPU, torchao elsewhere."""
    import_gemlite("int8-base") if device.type == "cuda" else import_torchao("int8-base")


def check_int4_device(device: torch.device) -> None:
    """Refuse in one line what GemLite's int4 kernel cannot run on: anything but an Ampere (sm80) or newer GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise UserError(f"--precision int4-base needs an Ampere (sm80) or newer GPU for its int4 kernel; this is "
                        f"{name}: use int8-base or nf4-base")
    import_gemlite("int4-base")
