"""Adapter fine-tuning speed through the project's own training step (the code finetune/adapter.py runs).

    python bench/train_throughput.py --preset llama-7b --micro_batch_size 4 --seq_length 512               # fixed
    python bench/train_throughput.py --preset llama-7b --micro_batch_size 4 --seq_length 512 --precision fp8-base
    python bench/train_throughput.py --alpaca true --global_batch_size 64 --micro_batch_tokens 8192          # recipe
    python bench/train_throughput.py --quality true --preset stories15M                  # FP8 vs bf16 val loss
    python bench/train_throughput.py --preset llama-7b --profile true --trace_path steps.json   # where time goes
    CPU smoke: add --accelerator cpu --preset tiny --seq_length 128 --compile false (and small --steps/--runs/
    --dataset_size).

The Alpaca mode writes a prepared data set of ``dataset_size`` samples drawn from the real records (their length
distribution) and trains on it through ``InstructionDataModule.train_steps`` and ``fabric_loop.training_step``:
optimizer steps of ``global_batch_size`` samples in token-budget micro-batches, as the recipe runs.
"""

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, print_profile, random_model  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402
from lit_adapter.data.batching import PAD_TO_MULTIPLE_OF, padding_fraction  # noqa: E402
from lit_adapter.data.module import InstructionDataModule  # noqa: E402
from lit_adapter.data.prepare import tokenize_sample, write_prepared_set  # noqa: E402
from lit_adapter.data.records import load_records  # noqa: E402
from lit_adapter.errors import UserError  # noqa: E402
from lit_adapter.precision import PRECISIONS, TrainingPrecision, base_dtype  # noqa: E402
from lit_adapter.tokenizer import Tokenizer  # noqa: E402
from lit_adapter.train.args import TrainArgs  # noqa: E402
from lit_adapter.train.fabric_loop import setup_training, training_step, validate  # noqa: E402
from lit_adapter.train.recipe import compiled_graphs  # noqa: E402
from lit_adapter.train.strategies import fabric_precision  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA_SAMPLES = 52_002
Step = tuple[list[tuple[torch.Tensor, torch.Tensor]], int]


def random_steps(vocab_size: int, micro_batch_size: int, seq_length: int, pin: bool) -> Iterator[Step]:
    """Endless one-micro-batch steps of random tokens, every position learned; in pinned memory where ``pin``, as
    the training data loader hands them to a GPU (a copy from pageable memory may wait for the device)."""
    while True:
        batch = [torch.randint(0, vocab_size, (micro_batch_size, seq_length)) for _ in range(2)]
        yield [tuple(t.pin_memory() if pin else t for t in batch)], micro_batch_size * seq_length


def alpaca_data(directory: Path, data_file: Path, tokenizer_path: Path, max_seq_length: int, dataset_size: int,
                vocab_size: int) -> Path:
    """A prepared data set in ``directory``: ``dataset_size`` samples drawn (fixed seed) from the real records,
    token ids folded into the model's vocabulary; 2,000 (or 5%) of them for validation."""
    tokenizer = Tokenizer(tokenizer_path)
    records, _ = load_records(data_file, skip_bad_records=True)
    real = [tokenize_sample(r, tokenizer, max_seq_length)[0] for r in records]
    real = [{k: torch.where(v >= 0, v % vocab_size, v) for k, v in s.items()} for s in real]
    draws = torch.randint(0, len(real), (dataset_size,), generator=torch.Generator().manual_seed(0)).tolist()
    samples, val_size = [real[i] for i in draws], min(2000, dataset_size // 20)
    write_prepared_set(directory, {"train": samples[val_size:], "val": samples[:val_size]}, {"tokenizer": {}})
    return directory


def build(config: Config, precision: TrainingPrecision, device: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight adapter model (the same weights for the same seed), its base in ``precision``'s format."""
    torch.manual_seed(seed)
    dtype = base_dtype(precision, torch.device(device).type)
    return random_model(config, adapter=True, device=device, dtype=dtype, quantize=PRECISIONS[precision].quantize)


def timed(step: Callable[[], tuple[int, int]], warmup_steps: int, steps: int, runs: int,
          sync: Callable[[], None]) -> tuple[list[float], list[float], float]:
    """Padded and real tokens/s of each timed run, and the warm-up's seconds."""
    started = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    sync()
    warmup = time.perf_counter() - started
    rates, real_rates = [], []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        counts = [step() for _ in range(steps)]
        sync()
        elapsed = time.perf_counter() - start
        rates.append(sum(c[0] for c in counts) / elapsed)
        real_rates.append(sum(c[1] for c in counts) / elapsed)
    return rates, real_rates, warmup


def main(preset: str = "llama-7b", precision: TrainingPrecision = "bf16-true", micro_batch_size: Optional[int] = 4,
         seq_length: int = 512, alpaca: bool = False, global_batch_size: int = 64,
         micro_batch_tokens: Optional[int] = None, quality: bool = False, compile: bool = True,
         activation_checkpointing: bool = False, accelerator: str = "cuda",
         data_file: Path = SHARED / "alpaca" / "alpaca_data_first335.json",
         tokenizer_path: Path = SHARED / "llama_tokenizer" / "tokenizer.model", dataset_size: int = ALPACA_SAMPLES,
         warmup_steps: int = 10, steps: int = 10, runs: int = 5, quality_steps: int = 200,
         eval_interval: int = 25, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, profile: bool = False,
         trace_path: Optional[Path] = None, cudnn_attention: bool = True) -> None:
    """Measure adapter training tokens/s on one device (random weights, AdamW), or FP8-vs-bf16 quality.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        precision: "bf16-true", "fp8-base" (the blocks' linear weights in float8, FP8 matmuls) or "nf4-base" (in
            4-bit NormalFloat).
        micro_batch_size: Samples per micro-batch (fixed mode: the batch), or a cap with micro_batch_tokens.
        seq_length: Tokens per sample (fixed mode); the longest sample (Alpaca mode).
        alpaca: Alpaca-shaped data through the project's data pipeline and step instead of fixed shapes.
        global_batch_size: Samples per optimizer step (Alpaca and quality modes).
        micro_batch_tokens: Padded tokens per micro-batch (Alpaca and quality modes).
        quality: Train the same random model on the same Alpaca-shaped data in bf16 and in FP8 and compare the
            validation losses at every evaluation (and at step 0).
        compile: Compile blocks and loss, as finetune/adapter.py does by default on GPU.
        activation_checkpointing: Recompute activations in the backward pass.
        accelerator: "cuda", or "cpu" for a smoke run.
        data_file: Alpaca JSON whose records' lengths the synthesized data follow.
        tokenizer_path: LLaMA tokenizer.
        dataset_size: Samples of the synthesized data set (the full Alpaca's count by default).
        warmup_steps: Untimed steps first (compilation, allocator warm-up).
        steps: Optimizer steps per timed run.
        runs: Timed runs; the median is reported.
        quality_steps: Optimizer steps of each quality run.
        eval_interval: Steps between the quality runs' evaluations.
        pad_to_multiple_of: Round each micro-batch's length up to a multiple of this (Alpaca and quality modes).
        profile: After the timed runs, profile 3 more steps and print the GPU's busy share and its top kernels.
        trace_path: With profile, also write the 3 profiled steps as a Chrome trace to this file (.json).
        cudnn_attention: Let PyTorch's attention use cuDNN's kernels (its choice on Hopper GPUs; cuDNN prepares a plan
            for each new shape); false leaves flash attention.
    """
    from lightning.fabric import Fabric

    if trace_path is not None and not profile:
        raise UserError("--trace_path writes the profiled steps: add --profile true")
    config = Config.from_name(preset)
    if seq_length > config.block_size:
        raise UserError(f"--seq_length {seq_length} exceeds {preset}'s block_size {config.block_size}")
    cuda = accelerator == "cuda"
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    fabric = Fabric(accelerator=accelerator, devices=1, **fabric_precision(precision, "cuda" if cuda else "cpu"))
    device = str(fabric.device)
    train = TrainArgs(global_batch_size=global_batch_size if alpaca or quality else micro_batch_size,
                      micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens, learning_rate=2.25e-3,
                      warmup_steps=1, max_grad_norm=None)
    with tempfile.TemporaryDirectory() as tmp:
        data = None
        if alpaca or quality:
            alpaca_data(Path(tmp), data_file, tokenizer_path, seq_length, dataset_size, config.vocab_size)
            data = InstructionDataModule(Path(tmp), train.global_batch_size, micro_batch_size, micro_batch_tokens,
                                    pad_to_multiple_of=pad_to_multiple_of)
        if quality:
            return quality_run(fabric, config, data, train, compile, device, quality_steps, eval_interval)
        model = build(config, precision, device)
        model, optimizer, loss = setup_training(fabric, model, train, compile, activation_checkpointing)
        steps_source = iter(data.train_steps()) if data else random_steps(config.vocab_size, micro_batch_size,
                                                                           seq_length, pin=cuda)

        shapes: list[set[tuple[int, ...]]] = []  # each step's micro-batch shapes, in order

        def step() -> tuple[int, int]:
            batches, step_tokens = next(steps_source)
            shapes.append({tuple(x.shape) for x, _ in batches})
            real = round(sum(x.numel() for x, _ in batches) * (1 - padding_fraction(batches)))  # on the host
            batches = fabric.to_device(batches)
            training_step(fabric, model, optimizer, batches, step_tokens, loss, train.max_grad_norm)
            return sum(x.numel() for x, _ in batches), real

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rates, real_rates, warmup = timed(step, warmup_steps, steps, runs, sync)
        seen_in_warmup = set().union(*shapes[:warmup_steps])
        new_shapes = len(set().union(*shapes[warmup_steps:]) - seen_in_warmup)
        if profile:
            print_profile(step, sync, top=24, trace_path=trace_path, tokens_of=lambda counts: counts[0])
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # each retry freed the allocator's cached blocks (cudaFree: the host waits for the GPU)
    retries = f", {torch.cuda.memory_stats()['num_alloc_retries']} allocator retries" if cuda else ""
    shape = (f"Alpaca-shaped, {dataset_size:,} samples, steps of {global_batch_size}, micro-batches of "
             f"<= {micro_batch_tokens} tokens / {micro_batch_size} samples") if alpaca else \
        f"fixed {micro_batch_size} x {seq_length}"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}, {preset}, {precision}, compile={compile}, "
          f"median of {runs} runs x {steps} steps (warm-up {warmup:.0f} s), {compiled_graphs()} compiled graphs"
          f"{retries}; micro-batch shapes: {len(seen_in_warmup) + new_shapes} ({new_shapes} first seen in the timed "
          "steps)")
    print("| setting | tokens/s (padded) | non-padding tokens/s | padding | peak GiB |\n|---|---|---|---|---|")
    print(f"| {shape} | {median(rates):,.0f} | {median(real_rates):,.0f} | "
          f"{1 - median(real_rates) / median(rates):.1%} | {memory:.2f} |")


def quality_run(fabric, config: Config, data: InstructionDataModule, train: TrainArgs, compile: bool, device: str,
                total_steps: int, eval_interval: int) -> None:
    """Train bf16 and FP8 from the same random weights on the same steps; print the validation losses."""
    curves = {}
    for precision in ("bf16-true", "fp8-base"):
        model = build(config, precision, device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("adapter_gate"):
                    param.zero_()  # as fine-tuning starts: step 0 is the base model (in its precision)
        model, optimizer, loss = setup_training(fabric, model, train, compile, False)
        val = data.val_dataloader()
        curve = {0: validate(fabric, model, val, 100)}
        stream = iter(data.train_steps())
        for step in range(1, total_steps + 1):
            batches, step_tokens = next(stream)
            training_step(fabric, model, optimizer, fabric.to_device(batches), step_tokens, loss, None)
            if step % eval_interval == 0:
                curve[step] = validate(fabric, model, val, 100)
        curves[precision] = curve
    worst = max(abs(curves["fp8-base"][s] / curves["bf16-true"][s] - 1) for s in curves["bf16-true"])
    print("\n| step | bf16 val loss | fp8 val loss | fp8 / bf16 - 1 |\n|---|---|---|---|")
    for s, bf16 in curves["bf16-true"].items():
        print(f"| {s} | {bf16:.4f} | {curves['fp8-base'][s]:.4f} | {curves['fp8-base'][s] / bf16 - 1:+.3%} |")
    print(f"largest relative difference {worst:.3%} ({'within' if worst <= 0.01 else 'OUTSIDE'} the 1% gate)")


if __name__ == "__main__":
    run_cli(main)
