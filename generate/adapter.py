"""Answer instructions with base weights plus LLaMA-Adapters: python generate/adapter.py --prompt "...".

Several adapters share the one base: --adapter_path a.safetensors b.safetensors (or name=path), then --adapter b
picks one for --prompt or --interactive, and each line of a --requests_path file names its own.
"""

from lit_adapter.cli import run_cli
from lit_adapter.generate.cli import main

if __name__ == "__main__":
    run_cli(main, list_options=("--adapter_path",),
            defaults={"adapter_path": ["out/adapter/alpaca/adapter.safetensors"]},
            description="Answer instructions with adapters, each prompt in its adapter's prompt style; prints only "
            "the answers (load time, speed and memory go to stderr).")
