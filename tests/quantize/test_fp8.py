"""The FP8 frozen base on the CPU (torch._scaled_mm runs there with row-wise scales): quantization error bounds,
forward and input gradient against the dequantized reference, the swap of the blocks' linear layers, the refusal
off Hopper GPUs; and that no backward work happens below the first adapted layer."""

import pytest
import torch

from bench.common import random_model
from lit_adapter.adapter import AdapterConfig, AdapterAttention
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.quantize.fp8 import FP8_MAX, Fp8Linear, check_fp8_device, quantize_fp8, quantize_rows
from lit_adapter.train.recipe import loss_fn


def test_row_quantization_error_is_within_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    values, scale = quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(values.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row uses the full range
    error = (values.float() * scale - x).abs() / x.abs().amax(dim=1, keepdim=True)
    assert error.max() <= 2 ** -4 * 1.01  # e4m3: 3 mantissa bits, half an ulp of the row's largest value at most


def test_forward_and_input_gradient_match_the_dequantized_matmul():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.02
    layer = Fp8Linear(weight)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_q, x_scale = quantize_rows(x.detach().reshape(-1, 64))
    reference = (x_q.float() * x_scale) @ layer.dequantized().t()  # what the FP8 matmul stands for
    torch.testing.assert_close(y.float().reshape(-1, 96), reference, atol=0, rtol=1e-2)  # bf16 output rounding
    exact = x.detach().float() @ weight.t()
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.05
    exact_grad = grad.float() @ weight
    assert ((x.grad.float() - exact_grad).norm() / exact_grad.norm()).item() < 0.05
    assert not any(p.requires_grad for p in layer.parameters()) and not list(layer.parameters())


def test_input_gradient_follows_weights_loaded_from_a_state_dict():
    torch.manual_seed(0)
    layer, other = Fp8Linear(torch.randn(48, 32)), Fp8Linear(torch.randn(48, 32))
    assert "weight_fp8_t" not in layer.state_dict()  # derived, not saved
    layer.load_state_dict(other.state_dict())
    x = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True)
    layer(x).backward(torch.ones(5, 48, dtype=torch.bfloat16))
    expected = torch.ones(5, 48) @ other.dequantized()
    assert ((x.grad.float() - expected).norm() / expected.norm()).item() < 0.05


def test_fp8_base_model_follows_the_bf16_one_and_keeps_training_the_adapter():
    torch.manual_seed(0)
    config = Config.from_name("tiny", n_embd=64, intermediate_size=128)
    model = random_model(config, adapter=True, device="cpu", dtype=torch.bfloat16)
    idx, targets = torch.randint(0, 512, (2, 2, 32))
    reference = loss_fn(model(idx), targets)
    assert sum(quantize_fp8(block) for block in model.blocks) == 4 * config.n_layer
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 12 and model.blocks[0].attn.qkv.weight_fp8.numel()
    loss = loss_fn(model(idx), targets)
    assert loss.item() == pytest.approx(reference.item(), rel=0.01)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(n for n, p in model.named_parameters() if p.requires_grad) and grads
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_a_model_whose_widths_fp8_matmuls_cannot_take_is_refused_in_one_line():
    config = Config.from_name("tiny", n_embd=64, intermediate_size=172)  # stories260K's MLP
    model = random_model(config, adapter=False, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"^--precision fp8-base needs linear layers whose widths are multiples of 16 "
                                        r"\(FP8 matmuls\); this model has one of 64 -> 344: use bf16-true$"):
        quantize_fp8(model.blocks[0])


def test_fp8_is_refused_off_hopper_gpus():
    with pytest.raises(UserError, match="needs a Hopper .* this is cpu: use bf16-true"):
        check_fp8_device(torch.device("cpu"))


def test_no_backward_work_below_the_first_adapted_layer():
    """The paper's recipe adapts the top 30 of 32 layers: the frozen layers below produce no autograd graph."""
    torch.manual_seed(0)
    config = AdapterConfig.from_name("tiny", n_layer=4, adapter_start_layer=2)
    model = random_model(config, adapter=True, device="cpu", dtype=torch.float32)
    outputs, backward_calls = [], []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
        block.register_full_backward_hook(lambda module, gin, gout, i=i: backward_calls.append(i))
    loss_fn(model(torch.randint(0, 512, (2, 16))), torch.randint(0, 512, (2, 16))).backward()
    assert [out.grad_fn is not None for out in outputs] == [False, False, True, True]
    assert sorted(backward_calls) == [2, 3]
    assert [isinstance(b.attn, AdapterAttention) for b in model.blocks] == [False, False, True, True]
