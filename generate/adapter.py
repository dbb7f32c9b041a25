"""Answer instructions with base weights plus LLaMA-Adapters: python generate/adapter.py --prompt "...".

Several adapters share the one base: --adapter_path a.safetensors b.safetensors, then --adapter b picks one for
--prompt or --interactive, and each line of a --requests_path file names its own.
"""

from pathlib import Path

from lit_adapter.cli import run_cli
from lit_adapter.generate.cli import main


def adapter(adapter_path: list[Path] | Path = Path("out/adapter/alpaca/adapter.safetensors"), **kwargs) -> None:
    """Answer instructions with adapters, each prompt written in its adapter's prompt style; prints only the responses.

    Args:
        adapter_path: Adapter files (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py; several
            may follow the option. A file's name without ".safetensors" is the adapter's name.
    """
    main(adapter_path=adapter_path, **kwargs)


if __name__ == "__main__":
    run_cli(adapter, list_options=("--adapter_path",))
