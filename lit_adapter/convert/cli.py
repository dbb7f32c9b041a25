"""The command lines of conversion (``scripts/convert_checkpoint.py``) and of the Hugging Face Hub download
(``scripts/download.py``)."""

from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.checkpoint import save_checkpoint_dir
from lit_adapter.convert import convert
from lit_adapter.convert.hf import download_hf
from lit_adapter.errors import UserError
from lit_adapter.files import check_can_create


def convert_checkpoint(format: Literal["meta", "hf", "llama2c", "gguf"], checkpoint_path: Path, output_dir: Path,
                       tokenizer_path: Optional[Path] = None,
                       dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None,
                       llama3_release: Optional[Literal["3.0", "3.1"]] = None) -> None:
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
        llama3_release: For Meta's Llama 3 tiktoken tokenizer.model: the release whose special-token names it gets,
            "3.0" or "3.1" (for 3.1 and later; they renamed three reserved tokens). By default the params.json
            beside the tokenizer tells.
    """
    if Path(output_dir).resolve() == Path(checkpoint_path).resolve():
        raise UserError(f"output_dir {output_dir} is the source checkpoint: choose another directory")
    check_can_create(output_dir, "--output_dir")  # before a conversion that can take minutes
    state_dict, config, tokenizer = convert(format, checkpoint_path, tokenizer_path,
                                            getattr(torch, dtype) if dtype else None, llama3_release)
    save_checkpoint_dir(state_dict, config, tokenizer, output_dir)
    n_params = sum(tensor.numel() for tensor in state_dict.values())
    print(f"wrote {config.name} ({n_params:,} parameters) to {output_dir}")


def download(repo_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct", output_dir: Optional[Path] = None,
             revision: Optional[str] = None, token: Optional[str] = None) -> None:
    """Fetch config.json, the safetensors weights and the tokenizer files of a Hub model into output_dir.

    Args:
        repo_id: The model's Hub name, e.g. meta-llama/Llama-3.2-1B-Instruct or TinyLlama/TinyLlama-1.1B-Chat-v1.0.
        output_dir: Where the files go. Default: downloads/<repo name>.
        revision: A branch, tag or commit of the repository (default: its main branch).
        token: A Hugging Face access token, for gated models such as Meta's (default: $HF_TOKEN or a saved login).
    """
    output_dir = Path(output_dir) if output_dir is not None else Path("downloads") / repo_id.split("/")[-1]
    download_hf(repo_id, output_dir, revision, token)
    print(f"downloaded {repo_id} to {output_dir}; convert it with: python scripts/convert_checkpoint.py --format hf "
          f"--checkpoint_path {output_dir} --output_dir checkpoints/{output_dir.name}")
