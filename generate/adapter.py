"""Answer an instruction with base weights plus a LLaMA-Adapter: python generate/adapter.py --prompt "..."."""

from pathlib import Path

from lit_adapter.cli import run_cli
from lit_adapter.generation import main


def adapter(adapter_path: Path = Path("out/adapter/alpaca/adapter.safetensors"), **kwargs) -> None:
    """Answer an instruction (wrapped in the Alpaca template) with an adapter; prints only the response.

    Args:
        adapter_path: Adapter file (.safetensors) from finetune/adapter.py or scripts/extract_adapter.py.
    """
    main(adapter_path=adapter_path, **kwargs)


if __name__ == "__main__":
    run_cli(adapter)
