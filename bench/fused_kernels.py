"""Liger-Kernel's fused Triton kernels against what the project runs today (issue 29), op by op, LLaMA-7B shapes, bf16.

    python bench/fused_kernels.py            # needs a GPU and `pip install liger-kernel`

Training (4 x 512 tokens, forward and backward): RMSNorm, SwiGLU, and the output head with its cross entropy, each
run eagerly, compiled by Inductor (as ``compile_for_training`` compiles the blocks and the loss) and as Liger's
kernel. Decoding (one token, forward): RMSNorm and SwiGLU, eagerly and as Liger's kernel, replayed from a CUDA graph
as the default decode path runs them. RoPE is not compared: Liger's rotates the two halves of a head (Hugging Face's
layout), the model the interleaved pairs of Meta's checkpoints. Each figure is the median of ``repeats`` timings.
"""

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cuda_time, median  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.train.recipe import loss_fn  # noqa: E402

Op = Callable[..., torch.Tensor]


def reference_ops(eps: float) -> dict[str, Op]:
    """The model's own computations (model.py's RMSNorm and MLP, recipe.py's loss over the output head)."""
    return {"rms_norm": lambda x, w: F.rms_norm(x, (x.size(-1),), w, eps),
            "swiglu": lambda gate, up: F.silu(gate) * up,
            "head + cross entropy": lambda h, w, t: loss_fn(F.linear(h, w)[None], t[None], "sum")}


def liger_ops(eps: float) -> dict[str, Op]:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_rms_norm, liger_swiglu

    return {"rms_norm": lambda x, w: liger_rms_norm(x, w, eps, in_place=False),
            "swiglu": liger_swiglu,
            "head + cross entropy": lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")}


def inputs(config: Config, tokens: int, grad: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each op's inputs for ``tokens`` positions (the activations need a gradient in training, the weights never)."""
    def act(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5

    C, I, V = config.n_embd, config.intermediate_size, config.vocab_size
    return {"rms_norm": (act(tokens, C), 1 + weight(C)), "swiglu": (act(tokens, I), act(tokens, I)),
            "head + cross entropy": (act(tokens, C), weight(V, C),
                                     torch.randint(0, V, (tokens,), device="cuda"))}


def training_ms(op: Op, args: tuple[torch.Tensor, ...], repeats: int) -> float:
    def step() -> None:
        out = op(*args)
        (out if out.dim() == 0 else out.float().square().mean()).backward()
    return median(cuda_time(step, repeats, warmup=3)) * 1e3


def graph_ms(op: Op, args: tuple[torch.Tensor, ...], repeats: int, calls: int = 100) -> float:
    """Milliseconds per call of ``op``, ``calls`` of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            op(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            op(*args)
    return median(cuda_time(graph.replay, repeats, warmup=3)) * 1e3 / calls


def error(op: Op, reference: Op, args: tuple[torch.Tensor, ...]) -> float:
    """Largest difference of the outputs, relative to the reference's largest magnitude."""
    with torch.no_grad():
        expected, actual = reference(*args).float(), op(*args).float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def main(preset: str = "llama-7b", tokens: int = 2048, repeats: int = 20) -> None:
    """Time each op eagerly, compiled and as Liger's kernel; print one table for training and one for decoding.

    Args:
        preset: Model preset whose sizes the inputs take (lit_adapter.config.PRESETS).
        tokens: Positions of the training micro-batch (4 x 512).
        repeats: Timed calls per figure (the median is reported).
    """
    config = Config.from_name(preset)
    reference, liger = reference_ops(config.norm_eps), liger_ops(config.norm_eps)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {preset}, bf16, median of {repeats}")
    print(f"\ntraining, {tokens} positions, forward + backward (ms)")
    print("| op | eager | Inductor | Liger | Liger / Inductor | Liger's error |\n|---|---|---|---|---|---|")
    for name, args in inputs(config, tokens, grad=True).items():
        eager = training_ms(reference[name], args, repeats)
        compiled = training_ms(torch.compile(reference[name]), args, repeats)
        fused = training_ms(liger[name], args, repeats)
        print(f"| {name} | {eager:.3f} | {compiled:.3f} | {fused:.3f} | {fused / compiled:.2f} | "
              f"{error(liger[name], reference[name], args):.1e} |")
    print("\ndecoding, 1 position, forward, from a CUDA graph (microseconds per call)")
    print("| op | eager | Liger | Liger / eager |\n|---|---|---|---|")
    for name, args in inputs(config, 1, grad=False).items():
        if name == "head + cross entropy":
            continue  # decoding samples from the logits: no loss
        eager, fused = graph_ms(reference[name], args, repeats) * 1e3, graph_ms(liger[name], args, repeats) * 1e3
        print(f"| {name} | {eager:.1f} | {fused:.1f} | {fused / eager:.2f} |")


if __name__ == "__main__":
    run_cli(main)
