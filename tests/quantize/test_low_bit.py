"""The 4- and 8-bit frozen bases through torchao on the CPU: each computes exactly with the weights it stores
(forward and input gradient), loading stores each block before the next is allocated, and what cannot run is
refused in one line. Their quality on a real model is in tests/test_smollm2.py."""

import sys

import pytest
import torch

from bench.common import random_model
from lit_adapter.checkpoint import load_model, save_checkpoint_dir
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model import Block, CausalSelfAttention
from lit_adapter.precision import PRECISIONS, base_dtype, check_device, check_precision
from lit_adapter.quantize import frozen_linears, low_bit
from lit_adapter.quantize.low_bit import (dequantized_weight, import_torchao, int4_group_size, int4_round_trip,
                                          nf4_block_sizes)
from lit_adapter.train.strategies import FabricFrozenHalfPrecision, fabric_precision

CONFIG = Config.from_name("tiny", n_embd=64, intermediate_size=160)


@pytest.mark.parametrize("precision", ["nf4-base", "int8-base"])
def test_a_quantized_block_computes_with_its_dequantized_weights(precision):
    torch.manual_seed(0)
    model = random_model(CONFIG, adapter=True, device="cpu", dtype=torch.float32,
                         quantize=PRECISIONS[precision].quantize)
    block = model.blocks[-1]
    stored = {name: type(linear.weight).__name__ for _, name, linear in frozen_linears(block)}
    assert stored == dict.fromkeys(["qkv", "proj", "gate_up", "down"], {"nf4-base": "NF4Tensor",
                                                                        "int8-base": "Int8Tensor"}[precision])
    reference = random_model(CONFIG, adapter=True, device="cpu", dtype=torch.float32).blocks[-1]
    reference.load_state_dict(block.state_dict(), strict=False, assign=True)
    for (_, _, ref), (_, _, linear) in zip(frozen_linears(reference), frozen_linears(block)):
        ref.weight = torch.nn.Parameter(dequantized_weight(linear.weight), requires_grad=False)
    rope = model.rope_cache[:16]
    outputs = []
    for b in (block, reference):
        x = torch.randn(2, 16, CONFIG.n_embd, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = b(x, rope)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad))
    for got, expected in zip(*outputs):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_loading_stores_each_block_before_the_next_is_allocated(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = random_model(CONFIG, adapter=False, device="cpu", dtype=torch.float32)
    save_checkpoint_dir(source.state_dict(), CONFIG, None, tmp_path)
    events = []
    allocate = Block.to_empty
    monkeypatch.setattr(Block, "to_empty", lambda block, **kw: events.append(("allocate", id(block))) or
                        allocate(block, **kw))
    quantize = PRECISIONS["nf4-base"].quantize
    model = load_model(tmp_path, quantize=lambda block: events.append(("store", id(block))) or quantize(block))
    assert events == [(event, id(block)) for block in model.blocks for event in ("allocate", "store")]
    assert all(type(b.mlp.down.weight).__name__ == "NF4Tensor" for b in model.blocks)


def test_the_bf16_precision_plugin_leaves_quantized_weights_quantized(monkeypatch):
    """Fabric's and the Trainer's bf16 conversion casts the frozen plain weights only: casting an NF4 weight would
    dequantize it (LLaMA-65B's NF4 base then ran out of an H100's memory)."""
    model = random_model(CONFIG, adapter=True, device="cpu", dtype=torch.float32,
                         quantize=PRECISIONS["nf4-base"].quantize)
    nf4 = type(model.blocks[0].mlp.down.weight)
    monkeypatch.setattr(nf4, "get_original_weight", lambda self: pytest.fail("an NF4 weight was dequantized"))
    FabricFrozenHalfPrecision("bf16-true").convert_module(model)
    assert model.blocks[0].attn_norm.weight.dtype == torch.bfloat16
    assert all(type(linear.weight) is nf4 for _, _, linear in frozen_linears(model.blocks[0]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_a_quantized_base_computes_in_float32_on_the_cpu_and_in_bf16_on_a_gpu():
    for name in ("nf4-base", "int8-base", "fp8-base"):
        assert base_dtype(name, "cpu") == torch.float32 and base_dtype(name, "cuda") == torch.bfloat16
    assert fabric_precision("nf4-base", "cpu") == {"precision": "32-true"}
    assert isinstance(fabric_precision("nf4-base", "cuda")["plugins"], FabricFrozenHalfPrecision)
    assert base_dtype("bf16-true", "cpu") == torch.bfloat16  # an unquantized precision is as asked


def test_nf4_blocks_divide_the_weight():
    assert nf4_block_sizes(4096 * 4096) == (64, 256)  # QLoRA's
    assert nf4_block_sizes(960 * 576) == (64, 240)  # SmolLM2's attention: 8,640 blocks of 64
    assert nf4_block_sizes(100 * 3) == (60, 5)


def test_what_cannot_run_is_refused_in_one_line(monkeypatch):
    with pytest.raises(UserError, match="int4-base needs an Ampere"):
        check_device("int4-base", torch.device("cpu"))
    with pytest.raises(UserError, match="does not shard"):
        check_precision("nf4-base", "fsdp")
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.10.0"))
    with pytest.raises(UserError, match=r"nf4-base needs PyTorch 2\.11 or newer \(for torchao\); this is 2\.10\.0"):
        check_device("nf4-base", torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match=r"--precision nf4-base needs torchao: pip install 'torchao>=0\.18'"):
        check_device("nf4-base", torch.device("cpu"))
    with pytest.raises(UserError, match="int8-base needs torchao"):
        import_torchao("int8-base")


def test_int4_groups_are_32_for_a_weight_already_on_a_4_bit_grid_else_the_largest_that_divides_its_width():
    pytest.importorskip("torchao", reason="int4-base needs torchao")
    trained = torch.randn(96, 1024, generator=torch.Generator().manual_seed(0))
    assert int4_group_size(trained) == 128
    assert int4_group_size(trained[:, :576]) == 64 and int4_group_size(trained[:, :288]) == 32  # SmolLM2, stories15M
    with pytest.raises(UserError, match="^--precision int4-base needs linear layers whose input width is a multiple "
                                        "of 32 .*; this model has one of 172: use int8-base or nf4-base$"):
        int4_group_size(trained[:, :172])  # stories260K's MLP
    # a Q4_1 block of GGUF: 16 levels from the block's minimum (level 0) to its maximum (level 15), 32 values along
    # the input
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 16, (96, 8, 32), generator=generator).float()
    levels[..., 0], levels[..., 1] = 0, 15
    steps, minima = torch.rand(96, 8, 1, generator=generator) / 8, torch.randn(96, 8, 1, generator=generator)
    four_bit = (minima + levels * steps).reshape(96, 256)
    assert int4_group_size(four_bit) == 32 and int4_group_size(four_bit.bfloat16()) == 32
    # its groups of 32 find the grid again (up to their bf16 scales), groups of 128 round to another grid
    error = {size: (int4_round_trip(four_bit, size).float() - four_bit).abs().mean() for size in (32, 128)}
    assert (int4_round_trip(four_bit).float() == int4_round_trip(four_bit, 32).float()).all()
    assert error[32] < error[128] / 10, error


def test_int4_base_quantizes_each_linear_once_in_its_own_group(monkeypatch):
    """torchao's int4 packing needs a GPU: here its ``quantize_`` records which layers each call chose."""
    calls = []

    class FakeTorchao:
        Int4WeightOnlyConfig = staticmethod(lambda group_size, **options: group_size)

        @staticmethod
        def quantize_(block, group_size, filter_fn):
            calls.append((group_size, {name for name, module in block.named_modules() if filter_fn(module, name)}))

    monkeypatch.setattr(low_bit, "import_torchao", lambda precision: FakeTorchao)
    block = Block(CONFIG, CausalSelfAttention(CONFIG))
    with torch.no_grad():  # the MLP's input projection already on a 4-bit grid in blocks of 32
        levels = torch.arange(32).remainder(16).float().repeat(block.mlp.gate_up.weight.numel() // 32)
        block.mlp.gate_up.weight.copy_(levels.view_as(block.mlp.gate_up.weight) / 100)
    assert low_bit.quantize_int4(block) == 4
    # the attention's width of 64 takes groups of 64; the MLP's output projection, 160 wide, groups of 32
    assert sorted(calls) == [(32, {"mlp.down", "mlp.gate_up"}), (64, {"attn.qkv", "attn.proj"})]
