"""Exploration: adapter training step variants on a random-weight model (temporary)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cuda_time, matmul_tflops, median, random_model  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.training import TrainArgs, build_optimizer, loss_fn  # noqa: E402


def main(variant: str, preset="llama-7b", B=4, T=512, repeats=8):
    config = Config.from_name(preset)
    torch.manual_seed(0)
    model = random_model(config, adapter=True)
    if "ac" in variant:
        model.activation_checkpointing = True
    fwd = model
    if "blocks" in variant:
        for block in model.blocks:
            block.compile()
    if "whole" in variant:
        fwd = torch.compile(model)
    lf = torch.compile(loss_fn) if "loss" in variant else loss_fn
    if "budget" in variant:
        torch._functorch.config.activation_memory_budget = 0.8
    opt = build_optimizer(model, TrainArgs())
    x = torch.randint(0, config.vocab_size, (B, T), device="cuda")
    y = torch.randint(0, config.vocab_size, (B, T), device="cuda")

    def step():
        loss = lf(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    import time
    t0 = time.perf_counter(); step(); torch.cuda.synchronize(); first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = cuda_time(step, repeats=repeats, warmup=2)
    tps = B * T / median(times)
    print(f"RESULT {variant:14} {tps:9.0f} tok/s  peak {torch.cuda.max_memory_allocated()/2**30:6.2f} GiB  first {first:5.1f}s  "
          f"flops {4*6.74e9*tps/1e12:6.1f} TFLOP/s")


if __name__ == "__main__":
    if sys.argv[1] == "mm":
        print(f"RESULT matmul {matmul_tflops():.0f} TFLOP/s")
    else:
        main(sys.argv[1])
