"""Precision plugins and distribution strategies, one place for both Fabric and the Lightning Trainer.

A precision of ``lit_adapter.precision`` runs under its Lightning precision; "bf16-true" is Lightning's except that
the trainable adapter keeps float32. ``fsdp`` shards every block and the rest with FSDP2 (``fully_shard``) through
Lightning's ``ModelParallelStrategy``, which runs on GPUs and on CPUs alike.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, Union

import torch
import torch.nn as nn
from lightning.fabric.plugins.precision import HalfPrecision as FabricHalfPrecision
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel
from lightning.pytorch.plugins.precision import HalfPrecision as TrainerHalfPrecision
from lightning.pytorch.strategies import ModelParallelStrategy as TrainerModelParallel
from torch.distributed.device_mesh import DeviceMesh

from lit_adapter.precision import PRECISIONS

StrategyName = Literal["auto", "ddp", "fsdp"]


def convert_frozen_params(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen parameters to ``dtype``; trainable ones stay as they are (float32), and so do quantized
    weights (tensor subclasses such as NF4, whose cast would dequantize them)."""
    for param in module.parameters():
        if not param.requires_grad and type(param.data) is torch.Tensor:
            param.data = param.data.to(dtype)
    return module


class FabricFrozenHalfPrecision(FabricHalfPrecision):
    """Fabric's "bf16-true", except that trainable parameters keep float32 and nothing else is converted.

    The bf16 weights set the compute dtype by themselves, so the forward pass runs under the usual default dtype
    (a checkpointed block then recomputes exactly as it ran) and the bf16 logits reach the loss as they are.
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        return convert_frozen_params(module, self._desired_input_dtype)

    def forward_context(self) -> AbstractContextManager:
        return nullcontext()

    def convert_output(self, data: Any) -> Any:
        return data


class TrainerFrozenHalfPrecision(TrainerHalfPrecision):
    """The Trainer's "bf16-true", except that trainable parameters keep float32 (as ``FabricFrozenHalfPrecision``)."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        return convert_frozen_params(module, self._desired_input_dtype)

    def forward_context(self) -> AbstractContextManager:
        return nullcontext()


def shard_model(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """FSDP2: shard each transformer block, then the embedding, final norm and head together."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in model.parameters()}
    # parameters of mixed dtypes (bf16 base, float32 adapter) are gathered and computed in the lowest precision
    compute_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else None
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    mesh = device_mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def fabric_strategy(name: StrategyName, devices: int = 1) -> Union[str, FabricModelParallel]:
    # Lightning's "auto" data-parallel size is the node count, so the device count is given explicitly
    if name == "fsdp":
        return FabricModelParallel(parallelize_fn=shard_model, data_parallel_size=devices, tensor_parallel_size=1,
                                   save_distributed_checkpoint=False)
    return name


def fabric_precision(name: str, device_type: str) -> dict:
    """Keyword arguments for ``Fabric`` that run the precision called ``name`` on a device of ``device_type``."""
    lightning = PRECISIONS[name].on(device_type).lightning
    if lightning == "bf16-true":
        return {"plugins": FabricFrozenHalfPrecision(lightning)}
    return {"precision": lightning}


def trainer_strategy(name: StrategyName, devices: int = 1) -> Union[str, TrainerModelParallel]:
    if name == "fsdp":
        return TrainerModelParallel(data_parallel_size=devices, tensor_parallel_size=1,
                                    save_distributed_checkpoint=False)
    return name


def trainer_precision(name: str, device_type: str) -> dict:
    """Keyword arguments for ``Trainer`` that run the precision called ``name`` on a device of ``device_type``."""
    lightning = PRECISIONS[name].on(device_type).lightning
    if lightning == "bf16-true":
        return {"plugins": [TrainerFrozenHalfPrecision(lightning)]}
    return {"precision": lightning}
