"""Write a checkpoint directory with random weights of a preset (for GPU tests of the real scripts).

    python bench/random_checkpoint.py --preset llama-7b --tokenizer_path tokenizer.model \
        --output_dir checkpoints/random-7b
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_model  # noqa: E402
from lit_adapter.checkpoint import save_checkpoint_dir  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.config import Config  # noqa: E402


def main(preset: str, tokenizer_path: Path, output_dir: Path, seed: int = 0) -> None:
    """Save a preset with random bf16 weights (made on the GPU if there is one) as a checkpoint directory.

    Args:
        preset: Model preset (lit_adapter.config.PRESETS).
        tokenizer_path: tokenizer.model to put beside the weights (its vocabulary must match the preset's).
        output_dir: Where model.safetensors, model_config.yaml and tokenizer.model go.
        seed: Random seed of the weights.
    """
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(Config.from_name(preset), adapter=False, device=device)
    save_checkpoint_dir({k: v.cpu() for k, v in model.state_dict().items()}, model.config, tokenizer_path, output_dir)


if __name__ == "__main__":
    run_cli(main)
