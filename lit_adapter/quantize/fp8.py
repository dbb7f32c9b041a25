"""An FP8 frozen base (``--precision fp8-base``): ``Fp8Linear`` quantizes a frozen weight once to float8 (e4m3)
with a float32 scale per output row, keeps it in the two layouts the matmuls need (2 bytes a parameter in all, as in
bf16), and runs the forward and the input-gradient matmuls in FP8 through ``torch._scaled_mm`` with row-wise scales
(activations and gradients are scaled per token), accumulating in Hopper's fast mode. There is no weight gradient:
the base is frozen.
"""

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.quantize import frozen_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_WIDTH_MULTIPLE = 16
"""FP8 matmuls (``torch._scaled_mm`` on a GPU) need both widths of a weight to be multiples of 16."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, columns) as e4m3 values and a float32 scale per row (rows, 1): ``x ~= values * scale``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * a_scale) @ (b_t * b_scale).T`` for e4m3 ``a`` (M, K) and ``b_t`` (N, K), scales (M, 1) and (N, 1).

    Fast accumulation (partial sums promoted to float32 less often) is faster at the same validation loss as full
    accumulation (bench/RESULTS.md).
    """
    return torch._scaled_mm(a, b_t.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype,
                            use_fast_accum=True)


class _Fp8Matmul(torch.autograd.Function):
    """``x @ (weight * scale).T`` with FP8 matmuls; the backward computes the input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_t, scale)
        rows = x.reshape(-1, x.size(-1))
        x_fp8, x_scale = quantize_rows(rows)
        return scaled_matmul(x_fp8, x_scale, weight, scale, x.dtype).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        weight_t, scale = ctx.saved_tensors
        # grad @ (scale * W) == (grad * scale.T) @ W: the weight's row scales move onto the gradient's columns
        rows = grad.reshape(-1, grad.size(-1)).float() * scale.t()
        grad_fp8, grad_scale = quantize_rows(rows)
        ones = torch.ones(weight_t.size(0), 1, device=grad.device)
        grad_x = scaled_matmul(grad_fp8, grad_scale, weight_t, ones, grad.dtype)
        return grad_x.view(*grad.shape[:-1], weight_t.size(0)), None, None, None


class Fp8Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is stored in e4m3 (and its transpose) with a float32 scale per
    output row."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        values, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", values)
        self.register_buffer("weight_scale", scale)
        # W as (K, N), the layout _scaled_mm needs in the backward: kept, not made every step; not saved, but
        # made anew whenever a state dict loads weight_fp8
        self.register_buffer("weight_fp8_t", values.t().contiguous(), persistent=False)
        self.register_load_state_dict_post_hook(Fp8Linear.transpose_weight)
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight_fp8, self.weight_fp8_t, self.weight_scale)

    def transpose_weight(self, *_) -> None:
        """Make ``weight_fp8_t`` from ``weight_fp8`` (a hook after a state dict loaded it)."""
        self.weight_fp8_t = self.weight_fp8.t().contiguous()

    def dequantized(self) -> torch.Tensor:
        """The weight these FP8 values and scales stand for, in float32."""
        return self.weight_fp8.float() * self.weight_scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 with row scales"


def quantize_fp8(block: nn.Module) -> int:
    """Replace every frozen linear layer of ``block`` by an ``Fp8Linear``; return their count. A one-line
    ``UserError`` for a layer that FP8 matmuls cannot run (a width not a multiple of 16)."""
    linears = frozen_linears(block)
    for parent, name, linear in linears:
        if linear.in_features % FP8_WIDTH_MULTIPLE or linear.out_features % FP8_WIDTH_MULTIPLE:
            raise UserError(f"--precision fp8-base needs linear layers whose widths are multiples of "
                            f"{FP8_WIDTH_MULTIPLE} (FP8 matmuls); this model has one of {linear.in_features} -> "
                            f"{linear.out_features}: use bf16-true")
        setattr(parent, name, Fp8Linear(linear.weight))
    return len(linears)


def check_fp8_device(device: torch.device) -> None:
    """Refuse FP8 where row-scaled FP8 matmuls do not run: anything but a Hopper (or newer) GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise UserError(f"--precision fp8-base needs a Hopper (sm90) or newer GPU with row-scaled FP8 matmuls; "
                        f"this is {name}: use bf16-true")
