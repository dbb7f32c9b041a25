"""Frozen bases in 4 and 8 bits through torchao's tensor subclasses: each frozen linear layer of a block keeps its
``nn.Linear`` and gets a quantized weight, which computes in the activations' dtype (bf16).

- ``nf4-base`` (training and generation): 4-bit NormalFloat with double-quantised scales (QLoRA: blocks of 64
  values, their scales in 8 bits per 256 blocks); the forward and the input gradient dequantize the weight.
- ``int8-base`` (generation): int8 with a scale per output row; ``torch.compile`` fuses the dequantization into the
  matrix-vector products.
- ``int4-base`` (generation, CUDA): int4 in groups with a scale and zero point per group, run by the tinygemm
  kernel: groups of 128 (gpt-fast's and torchao's choice; 64 or 32 where 128 does not divide a layer's input), or of
  32 for a weight that already lies on a 4-bit grid in blocks of 32 (a model that was a 4-bit GGUF): rounding it to
  another grid costs much more (SmolLM2 from its Q4_1 file: perplexity -0.11% in groups of 32, +48% in groups of
  128; bench/RESULTS.md).

The embedding, the norms and the output head stay as they are.
"""

import logging
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.quantize import frozen_linears

TORCHAO = "torchao>=0.18"
TORCHAO_NEEDS_TORCH = "2.11"
INT4_GROUP_SIZE, INT4_SOURCE_BLOCK = 128, 32
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def import_torchao(precision: str) -> ModuleType:
    """``torchao.quantization``, imported without its start-up chatter (optional C++ kernels that this project does
    not use); a one-line refusal where torchao is not installed or PyTorch is older than it needs."""
    if torch.__version__ < TORCHAO_NEEDS_TORCH:
        raise UserError(f"--precision {precision} needs PyTorch {TORCHAO_NEEDS_TORCH} or newer (for torchao); this "
                        f"is {torch.__version__}")
    chatty = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    except ImportError:
        raise UserError(f"--precision {precision} needs torchao: pip install '{TORCHAO}'") from None
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    return torchao.quantization


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
    """The frozen linear weights of ``block`` in int8, a scale per output row; return their count."""
    ao = import_torchao("int8-base")
    return apply_config(block, ao, ao.Int8WeightOnlyConfig(set_inductor_config=False))


def quantize_int4(block: nn.Module) -> int:
    """The frozen linear weights of ``block`` in int4 for the tinygemm kernel (bf16, CUDA), each in its
    ``int4_group_size``; return their count."""
    ao = import_torchao("int4-base")
    sizes = {id(linear): int4_group_size(linear.weight) for _, _, linear in frozen_linears(block)}
    for size in set(sizes.values()):
        ao.quantize_(block, ao.Int4WeightOnlyConfig(group_size=size, set_inductor_config=False,
                                                    int4_packing_format="tile_packed_to_4d"),
                     filter_fn=lambda module, _: sizes.get(id(module)) == size)
    return len(sizes)


def int4_group_size(weight: torch.Tensor) -> int:
    """int4-base's group for ``weight``: ``INT4_SOURCE_BLOCK`` (32) where its first rows hold at most 16 distinct
    values in every block of 32 along the input (the weight was 4-bit already, as GGUF's Q4 types store it), else
    ``INT4_GROUP_SIZE`` (128) or, where that does not divide the input width, the largest of the kernel's smaller
    groups that does (SmolLM2-135M's width of 576: 64); torchao leaves a weight whose width its group does not
    divide unquantized. A trained 16- or 32-bit weight has nearly 32 distinct values in a block. A ``UserError``
    where no group divides the width."""
    rows = weight.detach()[:64]
    columns = rows.size(-1)
    if columns % INT4_SOURCE_BLOCK:
        raise UserError(f"--precision int4-base needs linear layers whose input width is a multiple of "
                        f"{INT4_SOURCE_BLOCK} (its kernel's smallest group); this model has one of {columns}: use "
                        "int8-base or nf4-base")
    blocks = rows.reshape(-1, INT4_SOURCE_BLOCK).sort(dim=-1).values
    distinct = (blocks[:, 1:] != blocks[:, :-1]).sum(dim=-1) + 1
    if bool((distinct <= 16).all()):
        return INT4_SOURCE_BLOCK
    return next(size for size in (INT4_GROUP_SIZE, 64, INT4_SOURCE_BLOCK) if columns % size == 0)


def apply_config(block: nn.Module, ao: ModuleType, config: object) -> int:
    """torchao's ``quantize_`` with ``config`` on the frozen linear layers of ``block`` only."""
    linears = {id(linear) for _, _, linear in frozen_linears(block)}
    ao.quantize_(block, config, filter_fn=lambda module, _: id(module) in linears)
    return len(linears)


def dequantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight stored in NF4 or int8, as the float32 values it stands for."""
    return getattr(weight, "get_original_weight", weight.dequantize)().float()


def int4_round_trip(weight: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """``weight`` as ``int4-base`` stores it (in groups of ``group_size``, default its ``int4_group_size``),
    dequantized to bf16, on any device: torchao's tinygemm quantization (the input width padded to a multiple of
    1024, as its int4 tensor pads it). The CPU measures int4-base's quality with it; the GPU bench checks the int4
    kernel against it."""
    ao = import_torchao("int4-base")
    group_size = group_size or int4_group_size(weight)
    qp = ao.quant_primitives
    rows, columns = weight.shape
    padded = F.pad(weight.to(torch.bfloat16), (0, -columns % 1024))
    block, bits = [1, group_size], (torch.int32, 0, 15)
    scale, zero = qp._choose_qparams_affine_tinygemm(padded, qp.MappingType.ASYMMETRIC, block, *bits,
                                                     scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    values = qp._quantize_affine_tinygemm(padded, block, scale, zero, *bits)
    dequantized = qp._dequantize_affine_tinygemm(values, block, scale, zero, *bits, output_dtype=torch.bfloat16)
    return dequantized[:, :columns]


def check_torchao(precision: str) -> Callable[[torch.device], None]:
    """A device check for ``precision`` that refuses in one line where torchao is missing (any device runs it)."""
    def check(device: torch.device) -> None:
        import_torchao(precision)
    return check


def check_int4_device(device: torch.device) -> None:
    """Refuse in one line what the tinygemm int4 kernel cannot run on: anything but an Ampere (sm80) or newer GPU."""
    import_torchao("int4-base")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise UserError(f"--precision int4-base needs an Ampere (sm80) or newer GPU for its int4 kernel; this is "
                        f"{name}: use int8-base or nf4-base")
