"""Adapter fine-tuning speed through the project's own training step (the code finetune/adapter.py runs).

    python bench/train_throughput.py --preset llama-7b --micro_batch_size 4 --seq_length 512
    python bench/train_throughput.py --alpaca true --micro_batch_size 16
"""

import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import matmul_tflops, median, random_model  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.data import LengthGroupedBatchSampler, collate, tokenize_sample  # noqa: E402
from lit_adapter.adapter import AdapterGPT  # noqa: E402
from lit_adapter.checkpoint import keep_adapter_float32  # noqa: E402
from lit_adapter.strategies import StrategyName, fabric_precision, fabric_strategy  # noqa: E402
from lit_adapter.tokenizer import Tokenizer  # noqa: E402
from lit_adapter.training import TrainArgs, accumulate_gradients, apply_gradients, setup_training  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DENSE_BF16_PEAK = 989e12  # H100 and H200 SXM
ALPACA_SAMPLES, EPOCHS = 52_002, 5


def random_batches(vocab_size: int, micro_batch_size: int, seq_length: int):
    """Endless (input_ids, targets) of random tokens, every position learned, in pinned memory like the loader's."""
    while True:
        yield tuple(torch.randint(0, vocab_size, (micro_batch_size, seq_length)).pin_memory() for _ in range(2))


def alpaca_batches(data_file: Path, tokenizer_path: Path, micro_batch_size: int, max_seq_length: int,
                   dataset_size: int):
    """Endless collated batches of real Alpaca records, grouped by length as training does; also the mean length.

    The records are drawn (with a fixed seed) up to ``dataset_size`` samples, so the batching sees a data set of
    the real one's size and length distribution.
    """
    tokenizer = Tokenizer(tokenizer_path)
    records = [r for r in json.loads(data_file.read_text()) if r["output"]]
    real = [tokenize_sample(r, tokenizer, max_seq_length)[0] for r in records]
    draws = torch.randint(0, len(real), (dataset_size,), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [real[i] for i in draws]
    sampler = LengthGroupedBatchSampler([len(s["input_ids"]) for s in samples], micro_batch_size)
    mean_length = sum(len(s["input_ids"]) - 1 for s in samples) / len(samples)

    def batches():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            for indices in sampler:
                yield tuple(t.pin_memory() for t in collate([samples[i] for i in indices], pad_to_multiple_of=8))

    return batches(), mean_length


def build_model(config: Config, strategy: str) -> torch.nn.Module:
    """Random weights: built directly on the GPU, or for FSDP on the meta device, each rank filling its shard."""
    if strategy != "fsdp":
        return random_model(config, adapter=True)
    with torch.device("meta"):
        model = AdapterGPT(config)
    model.to(torch.bfloat16)
    keep_adapter_float32(model)
    return model


def main(preset: str = "llama-7b", micro_batch_size: int = 4, seq_length: int = 512, compile: bool = True,
         activation_checkpointing: bool = False, alpaca: bool = False,
         data_file: Path = SHARED / "alpaca" / "alpaca_data_first335.json",
         tokenizer_path: Path = SHARED / "llama_tokenizer" / "tokenizer.model", dataset_size: int = ALPACA_SAMPLES,
         warmup_steps: int = 10, steps: int = 10, runs: int = 5, devices: int = 1,
         strategy: StrategyName = "auto") -> None:
    """Measure adapter training tokens/s (bf16-true, AdamW, random weights) on one GPU.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        micro_batch_size: Samples per step.
        seq_length: Tokens per sample (fixed-length mode).
        compile: Compile blocks and loss, as finetune/adapter.py does by default on GPU.
        activation_checkpointing: Recompute activations in the backward pass (the lean setting).
        alpaca: Use real Alpaca records with the project's length-grouped batching instead of fixed lengths.
        data_file: Alpaca JSON (alpaca mode).
        tokenizer_path: LLaMA tokenizer (alpaca mode).
        dataset_size: Samples drawn from the real records (alpaca mode): the full data set's size by default.
        warmup_steps: Untimed steps first (compilation, allocator warm-up).
        steps: Steps per timed run.
        runs: Timed runs; the median is reported.
        devices: GPUs (one process each); tokens/s is reported per GPU and in total.
        strategy: "auto", "ddp" or "fsdp" (FSDP2, the model built on the meta device and sharded before it is filled).
    """
    from lightning.fabric import Fabric

    config = Config.from_name(preset)
    peak_rate = matmul_tflops() * 1e12
    fabric = Fabric(accelerator="cuda", devices=devices, strategy=fabric_strategy(strategy, devices),
                    **fabric_precision("bf16-true"))
    fabric.launch()
    torch.manual_seed(0)
    model = build_model(config, strategy)
    train = TrainArgs(micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size * devices)
    model, optimizer, train_loss_fn = setup_training(fabric, model, train, compile, activation_checkpointing)
    if alpaca:
        batches, mean_length = alpaca_batches(data_file, tokenizer_path, micro_batch_size, seq_length, dataset_size)
    else:
        batches, mean_length = random_batches(config.vocab_size, micro_batch_size, seq_length), None

    def step() -> tuple[int, int]:
        input_ids, targets = fabric.to_device(next(batches))
        accumulate_gradients(fabric, model, [(input_ids, targets)], train_loss_fn)
        apply_gradients(fabric, model, optimizer, train.max_grad_norm)
        real = int((targets != -100).cumsum(1).argmax(1).add(1).sum()) if alpaca else input_ids.numel()
        return input_ids.numel(), real

    started = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    torch.cuda.synchronize()
    warmup = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    rates, real_rates = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        counts = [step() for _ in range(steps)]
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rates.append(sum(c[0] for c in counts) / elapsed)
        real_rates.append(sum(c[1] for c in counts) / elapsed)
    tokens_per_s, real_per_s = median(rates), median(real_rates)
    flops_per_token = 4 * sum(p.numel() for n, p in model.named_parameters() if "adapter" not in n)
    if not fabric.is_global_zero:
        return

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, measured bf16 matmul {peak_rate / 1e12:.0f} TFLOP/s")
    shape = f"alpaca, micro-batch {micro_batch_size}" if alpaca else f"{micro_batch_size} x {seq_length}"
    print(f"{preset}, {shape}, compile={compile}, activation_checkpointing={activation_checkpointing}, "
          f"median of {runs} runs x {steps} steps (warm-up {warmup:.0f} s)")
    print(f"tokens/s per GPU  {tokens_per_s:10,.0f}   (runs {min(rates):,.0f} .. {max(rates):,.0f}), "
          f"{devices} GPU(s) {strategy}: {tokens_per_s * devices:,.0f} in all")
    print(f"MFU               {flops_per_token * tokens_per_s / DENSE_BF16_PEAK:10.1%} of 989 TFLOP/s, "
          f"{flops_per_token * tokens_per_s / peak_rate:.1%} of measured")
    print(f"peak memory       {torch.cuda.max_memory_allocated() / 2**30:10.2f} GiB (rank 0)")
    if alpaca:
        minutes = EPOCHS * ALPACA_SAMPLES * mean_length / real_per_s / 60
        print(f"non-padding tok/s {real_per_s:10,.0f}   (padding {1 - real_per_s / tokens_per_s:.1%})")
        print(f"5 epochs of Alpaca {minutes:9.1f} min   ({ALPACA_SAMPLES:,} samples x {mean_length:.0f} tokens mean)")


if __name__ == "__main__":
    run_cli(main)
