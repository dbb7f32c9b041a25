"""Precisions: the one registry of their names, the dtype each loads the frozen base in, the Lightning precision
that runs it, the quantizer that stores the base's blocks in another format, and what each needs.

The adapter's parameters (and so the optimizer state) stay float32 whatever the precision, and one adapter file
works on every precision of its base. A new frozen-base format is a module in ``lit_adapter/quantize/`` and one
entry in ``PRECISIONS``.
"""

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.quantize import fp8, low_bit


@dataclass(frozen=True)
class Precision:
    name: str
    base_dtype: torch.dtype
    """The dtype the frozen base is loaded and computed in."""
    lightning: str
    """The Lightning precision that runs it ("bf16-true" keeps the adapter float32: ``train.strategies``)."""
    quantize: Optional[Callable[[nn.Module], int]] = None
    """Stores the frozen linear layers of one block in another format (None: they stay in ``base_dtype``)."""
    check_device: Optional[Callable[[torch.device], None]] = None
    """Refuses, in one line, a device (or an installation) that cannot run it."""
    training: bool = True
    generation: bool = True
    shardable: bool = True
    """Whether ``--strategy fsdp`` can shard a base in this precision."""

    def on(self, device_type: str) -> "Precision":
        """This precision as it runs on a device of ``device_type``: a quantized base computes in float32 on the
        CPU, where bf16 matrix products are several times slower than float32 ones."""
        if self.quantize is not None and device_type == "cpu":
            return replace(self, base_dtype=torch.float32, lightning="32-true")
        return self


PRECISIONS = {p.name: p for p in (
    Precision("bf16-true", torch.bfloat16, "bf16-true"),
    Precision("bf16-mixed", torch.float32, "bf16-mixed", generation=False),
    Precision("32-true", torch.float32, "32-true"),
    Precision("16-true", torch.float16, "16-true", training=False),
    Precision("fp8-base", torch.bfloat16, "bf16-true", quantize=fp8.quantize_fp8, check_device=fp8.check_fp8_device,
              shardable=False),
    Precision("nf4-base", torch.bfloat16, "bf16-true", quantize=low_bit.quantize_nf4,
              check_device=low_bit.check_torchao("nf4-base"), shardable=False),
    Precision("int8-base", torch.bfloat16, "bf16-true", quantize=low_bit.quantize_int8,
              check_device=low_bit.check_torchao("int8-base"), training=False),
    Precision("int4-base", torch.bfloat16, "bf16-true", quantize=low_bit.quantize_int4,
              check_device=low_bit.check_int4_device, training=False),
)}
TrainingPrecision = Literal[tuple(name for name, p in PRECISIONS.items() if p.training)]  # type: ignore[valid-type]
QuantizedBase = Literal[  # type: ignore[valid-type]
    tuple(name for name, p in PRECISIONS.items() if p.training and p.quantize)]
GenerationPrecision = Literal[tuple(name for name, p in PRECISIONS.items() if p.generation)]  # type: ignore[valid-type]


def get_precision(name: str, purpose: Literal["training", "generation"] = "training") -> Precision:
    """The precision called ``name``, if it serves ``purpose``; else a one-line ``UserError``."""
    usable = [n for n, p in PRECISIONS.items() if getattr(p, purpose)]
    if name not in usable:
        raise UserError(f"precision {name!r} is not available for {purpose}: choose one of {', '.join(usable)}")
    return PRECISIONS[name]


def base_dtype(name: str, device_type: str) -> torch.dtype:
    """The dtype the frozen base model is loaded in under precision ``name`` on a device of ``device_type``."""
    return PRECISIONS[name].on(device_type).base_dtype


def default_precision(on_gpu: bool, purpose: Literal["training", "generation"] = "training") -> str:
    """bf16-true on a GPU that supports it; on another GPU 16-true for generation, 32-true for training; 32-true on
    the CPU."""
    if not on_gpu:
        return "32-true"
    if torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "16-true" if purpose == "generation" else "32-true"


def check_precision(name: str, strategy: str = "auto") -> Precision:
    """The training precision ``name``, refused in one line where ``strategy`` cannot run it."""
    precision = get_precision(name)
    if strategy == "fsdp" and not precision.shardable:
        raise UserError(f"--precision {name} does not shard: use --strategy auto or ddp")
    return precision


def check_device(name: str, device: torch.device) -> None:
    """Refuse in one line a ``device`` that cannot run precision ``name``."""
    if PRECISIONS[name].check_device is not None:
        PRECISIONS[name].check_device(device)
