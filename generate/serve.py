"""Serve a base model and its adapters over the OpenAI API: python generate/serve.py --checkpoint_dir DIR
--adapter_path a.safetensors b.safetensors --port 8000, then point an OpenAI client at http://127.0.0.1:8000/v1."""

from lit_adapter.cli import run_cli
from lit_adapter.serve.cli import main

if __name__ == "__main__":
    run_cli(main, list_options=("--adapter_path",))
