"""Convert Meta, Hugging Face, llama2.c or GGUF weights into a lit_adapter checkpoint directory."""

from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.checkpoint import check_can_create, save_checkpoint_dir
from lit_adapter.cli import run_cli
from lit_adapter.convert import convert
from lit_adapter.errors import UserError


def convert_checkpoint(format: Literal["meta", "hf", "llama2c", "gguf"], checkpoint_path: Path, output_dir: Path,
                       tokenizer_path: Optional[Path] = None,
                       dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None) -> None:
    """Write model.safetensors, model_config.yaml and the tokenizer files for a LLaMA checkpoint into output_dir.

    Args:
        format: The source layout. "meta": a directory with params.json and consolidated.NN.pth shards;
            "hf": a Hugging Face directory with config.json and model*.safetensors or pytorch_model*.bin;
            "llama2c": a llama2.c version-0 .bin export or .pt training checkpoint;
            "gguf": a llama.cpp .gguf file of the llama architecture (dequantised; tokenizer and chat template
            from its metadata).
        checkpoint_path: The source directory (meta, hf) or file (llama2c, gguf).
        output_dir: Where to write the converted checkpoint; created if missing.
        tokenizer_path: The model's tokenizer: a tokenizer.json (with tokenizer_config.json beside it), a
            SentencePiece tokenizer.model or Meta's Llama 3 tiktoken tokenizer.model (written as tokenizer.json).
            By default the one inside or beside checkpoint_path (for llama2c also tok512.model; for gguf the
            file's own).
        dtype: Store the weights in this dtype. By default they keep the source's dtype (gguf: float32).
    """
    if Path(output_dir).resolve() == Path(checkpoint_path).resolve():
        raise UserError(f"output_dir {output_dir} is the source checkpoint: choose another directory")
    check_can_create(output_dir, "--output_dir")  # before a conversion that can take minutes
    state_dict, config, tokenizer = convert(format, checkpoint_path, tokenizer_path,
                                            getattr(torch, dtype) if dtype else None)
    save_checkpoint_dir(state_dict, config, tokenizer, output_dir)
    n_params = sum(tensor.numel() for tensor in state_dict.values())
    print(f"wrote {config.name} ({n_params:,} parameters) to {output_dir}")


if __name__ == "__main__":
    run_cli(convert_checkpoint)
