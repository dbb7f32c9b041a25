"""Precision names, the dtype each stores the frozen base in, and the default choice of one.

Light on purpose (no Lightning import): generation and both training routes read it. The adapter's parameters
(and so the optimizer state) always stay float32, whatever the base's precision.
"""

from typing import Literal

import torch

TrainingPrecision = Literal["bf16-true", "bf16-mixed", "32-true", "fp8-base"]
GenerationPrecision = Literal["bf16-true", "16-true", "32-true"]
Precision = Literal[TrainingPrecision, GenerationPrecision]

BASE_DTYPES: dict[str, torch.dtype] = {"bf16-true": torch.bfloat16, "fp8-base": torch.bfloat16,
                                       "16-true": torch.float16, "bf16-mixed": torch.float32, "32-true": torch.float32}


def base_dtype(precision: Precision) -> torch.dtype:
    """The dtype the frozen base model is loaded in."""
    return BASE_DTYPES[precision]


def default_precision(on_gpu: bool, gpu_without_bf16: Precision = "32-true") -> Precision:
    """bf16-true on a GPU that supports it, ``gpu_without_bf16`` on another GPU, 32-true on the CPU."""
    if not on_gpu:
        return "32-true"
    return "bf16-true" if torch.cuda.is_bf16_supported() else gpu_without_bf16
