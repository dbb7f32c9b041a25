"""Download a model's files from the Hugging Face Hub, for scripts/convert_checkpoint.py --format hf:

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
"""

from lit_adapter.cli import run_cli
from lit_adapter.convert.cli import download

if __name__ == "__main__":
    run_cli(download)
