"""Convert Meta, Hugging Face, llama2.c or GGUF weights into a lit_adapter checkpoint directory:
python scripts/convert_checkpoint.py --help."""

from lit_adapter.cli import run_cli
from lit_adapter.convert.cli import convert_checkpoint

if __name__ == "__main__":
    run_cli(convert_checkpoint)
