"""Download a model's files from the Hugging Face Hub, for scripts/convert_checkpoint.py --format hf:

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
"""

from pathlib import Path
from typing import Optional

from lit_adapter.cli import run_cli
from lit_adapter.convert import download_hf


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


if __name__ == "__main__":
    run_cli(download)
