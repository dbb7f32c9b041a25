"""What a quantized frozen base costs in quality on a real model: a converted checkpoint (by default
SmolLM2-135M-Instruct from its GGUF) and the real Alpaca records prepared for it (35 validation records, answers cut
at ``max_seq_length`` tokens), on the CPU or on a GPU.

    python bench/quantized_quality.py                 # SmolLM2 from ../shared/data; about 4 minutes on 2 cores
    python bench/quantized_quality.py --format llama2c --max_seq_length 512 \
        --checkpoint_path ../shared/data/stories260K/stories260K.bin      # trained in float32; 20 seconds
    python bench/quantized_quality.py --format llama2c --max_seq_length 256 \
        --checkpoint_path ../shared/data/tinystories_llama2c_500iter/model.bin \
        --tokenizer_path ../shared/data/stories260K/tok512.model          # trained in float32, 500 iterations
    python bench/quantized_quality.py --accelerator cuda                  # in bf16, int4-base through its kernel

For the unquantised base (32-true on the CPU, bf16-true on a GPU) and nf4-base: the validation loss at step 0 and
after ``steps`` steps of finetune/adapter.py's recipe (eager; global batch 8, learning rate 0.03, warm-up 4, the
recipe's adapted layers unless ``start_layer`` is given); the nf4-trained adapter on the unquantised base; the
base's perplexity with int8-base, int4-base (through its kernel on a GPU, and its weights dequantized anywhere; also
in groups of 128, gpt-fast's size), nf4-base and, where bitsandbytes is installed, its NF4 (dequantized: the other
library nf4-base could use; bench/nf4_libraries.py compares their speed). The tables come last.
"""

import math
from functools import partial
from importlib.util import find_spec
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import attempt, cell, int4_reference  # noqa: E402
from bench.nf4_libraries import bitsandbytes_nf4_reference  # noqa: E402
from lit_adapter.checkpoint import adapter_config, load_adapter, load_config, load_model  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.data.module import InstructionDataModule  # noqa: E402
from lit_adapter.data.prepare import prepare_dataset  # noqa: E402
from lit_adapter.data.records import load_records  # noqa: E402
from lit_adapter.precision import PRECISIONS, base_dtype  # noqa: E402
from lit_adapter.tokenizer import Tokenizer  # noqa: E402
from lit_adapter.train import fabric_loop  # noqa: E402
from lit_adapter.train.recipe import validation_loss, validation_sums  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main(checkpoint_path: Path = SHARED / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf",
         format: Literal["meta", "hf", "llama2c", "gguf"] = "gguf",
         data_file: Path = SHARED / "alpaca" / "alpaca_data_first335.json", steps: int = 16,
         max_seq_length: int = 96, start_layer: Optional[int] = None,
         accelerator: Literal["cpu", "cuda"] = "cpu", tokenizer_path: Optional[Path] = None) -> None:
    """Measure the validation loss and perplexity of a real model with quantized bases.

    Args:
        checkpoint_path: The model to convert (scripts/convert_checkpoint.py's ``--checkpoint_path``).
        format: Its layout (scripts/convert_checkpoint.py's ``--format``).
        data_file: Alpaca records (JSON).
        steps: Fine-tuning steps of each run.
        max_seq_length: Tokens a record keeps (prompt and answer).
        start_layer: The first adapted layer; None: the recipe's default for the model.
        accelerator: "cpu" (every base computes in float32; the unquantised base is 32-true) or "cuda" (in bf16,
            against bf16-true; int4-base through its kernel, beside its weights dequantized).
        tokenizer_path: The model's tokenizer (scripts/convert_checkpoint.py's ``--tokenizer_path``); by default
            the one the converter finds inside or beside ``checkpoint_path``.
    """
    device = torch.device(accelerator)
    full = "32-true" if device.type == "cpu" else "bf16-true"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, data = Path(tmp) / "checkpoint", Path(tmp) / "data"
        convert = runpy.run_path(str(ROOT / "scripts" / "convert_checkpoint.py"))["convert_checkpoint"]
        run_cli(convert, ["--format", format, "--checkpoint_path", str(checkpoint_path), "--output_dir",
                          str(checkpoint), *(["--tokenizer_path", str(tokenizer_path)] if tokenizer_path else [])])
        records, _ = load_records(data_file, skip_bad_records=True)
        prepare_dataset(records, Tokenizer(checkpoint), data, val_size=35, max_seq_length=max_seq_length,
                        style="alpaca")
        val_loss = partial(loss, checkpoint, data, device=device)
        runs = {precision: fine_tune(checkpoint, data, Path(tmp) / precision, precision, steps, start_layer, device)
                for precision in (full, "nf4-base")}
        losses = {precision: (val_loss(precision), val_loss(precision, adapter)) for precision, adapter in runs.items()}
        nf4_on_full = val_loss(full, runs["nf4-base"])
        perplexity = {name: attempt(lambda: math.exp(val_loss(precision, quantize=quantize)))  # a row may fail alone
                      for name, precision, quantize in perplexity_rows(full, device)}
    print(f"\n{checkpoint_path.name} on {accelerator}, 35 Alpaca validation records of at most {max_seq_length} "
          f"tokens, {steps} steps, torch {torch.__version__}")
    print(f"| base | val loss, step 0 | after the steps | drop | of {full}'s drop |\n|---|---|---|---|---|")
    full_drop = losses[full][0] - losses[full][1]
    for precision, (start, end) in losses.items():
        print(f"| {precision} | {start:.4f} | {end:.4f} | {start - end:.4f} | {(start - end) / full_drop:.1%} |")
    print(f"| nf4-base's adapter on the {full} base | | {nf4_on_full:.4f} | | "
          f"{nf4_on_full / losses['nf4-base'][1] - 1:+.2%} against its own base, "
          f"{nf4_on_full / losses[full][1] - 1:+.2%} against {full}'s adapter |")
    print(f"\n| base | perplexity | against {full} |\n|---|---|---|")
    for name, value in perplexity.items():
        against = "" if isinstance(value, str) else f"{value / perplexity[full] - 1:+.2%}"
        print(f"| {name} | {cell(value, 3)} | {against} |")


def perplexity_rows(full: str, device: torch.device) -> list[tuple[str, str, Optional[Callable]]]:
    """(name, precision, quantizer that keeps plain weights) of each perplexity row: the unquantised base, int8-base,
    int4-base (its kernel where one runs, and its weights dequantized), int4 in groups of 128, nf4-base, and
    bitsandbytes' NF4 where it is installed."""
    return [(full, full, None), ("int8-base", "int8-base", None),
            *([("int4-base (its kernel)", "int4-base", None)] if device.type == "cuda" else []),
            ("int4-base in its own groups (dequantized)", full, int4_reference),
            ("int4 in groups of 128 (dequantized)", full, partial(int4_reference, group_size=128)),
            ("nf4-base", "nf4-base", None),
            *([("nf4 through bitsandbytes (dequantized)", full, bitsandbytes_nf4_reference)]
              if find_spec("bitsandbytes") else [])]


def fine_tune(checkpoint: Path, data: Path, out_dir: Path, precision: str, steps: int,
              start_layer: Optional[int], device: torch.device) -> Path:
    """finetune/adapter.py's command line in this process (eager); the adapter file it wrote."""
    options = {"checkpoint_dir": checkpoint, "data_dir": data, "out_dir": out_dir, "precision": precision,
               "accelerator": device.type, "compile": False, "adapter.start_layer": start_layer,
               "train.max_steps": steps, "train.global_batch_size": 8, "train.micro_batch_size": 8,
               "train.learning_rate": 0.03, "train.warmup_steps": 4, "eval.interval": steps, "eval.max_batches": 1,
               "eval.max_new_tokens": 0}
    run_cli(fabric_loop.main, [item for key, value in options.items() if value is not None
                               for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))])
    return out_dir / "adapter.safetensors"


def loss(checkpoint: Path, data: Path, precision: str, adapter: Optional[Path] = None,
         quantize: Optional[Callable] = None, device: torch.device = torch.device("cpu")) -> float:
    """The validation loss per answer token of the base in ``precision`` on ``device`` (blocks stored by
    ``quantize`` if given), with ``adapter`` if given, over every validation sample, through the training code's
    validation sums."""
    config = adapter_config(adapter, load_config(checkpoint)) if adapter else None
    model = load_model(checkpoint, adapter=adapter is not None, config=config, device=device,
                       dtype=base_dtype(precision, device.type),
                       quantize=quantize or PRECISIONS[precision].quantize).eval()
    if adapter:
        load_adapter(model, adapter)
    batches = InstructionDataModule(data, global_batch_size=8, micro_batch_size=8).val_dataloader()
    with torch.no_grad():
        return validation_loss(sum(validation_sums(model, x.to(device), y.to(device)) for x, y in batches))


if __name__ == "__main__":
    run_cli(main)
