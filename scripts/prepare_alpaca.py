"""Tokenize the Alpaca instruction data (or your own instruction / chat records) into the train/val files that
fine-tuning reads: python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/llama-7b --help."""

from lit_adapter.cli import run_cli
from lit_adapter.data.cli import main

if __name__ == "__main__":
    run_cli(main)
