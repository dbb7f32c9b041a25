"""Write the adapter of a training state to an adapter-only file for generate/adapter.py:

    python scripts/extract_adapter.py --state_path out/adapter/alpaca/step-001000
"""

from pathlib import Path
from typing import Optional

from lit_adapter.adapter import AdapterGPT
from lit_adapter.checkpoint import (ADAPTER_FILE, STATE_FILE, check_state_dict, read_state_adapter, save_adapter,
                                    shapes_of)
from lit_adapter.cli import run_cli
from lit_adapter.config import Config
from lit_adapter.errors import UserError


def extract_adapter(state_path: Path, output_path: Optional[Path] = None) -> None:
    """Write the adapter weights of a training state to a .safetensors file for generate/adapter.py.

    Args:
        state_path: A training state from finetune/adapter.py (a step-NNNNNN directory or the training_state.pt in
            it), or a Lightning checkpoint (.ckpt) from finetune/adapter_trainer.py.
        output_path: The adapter file to write (replaced atomically if it exists). Default: adapter.safetensors
            beside the training state.
    """
    state_path = Path(state_path)
    state_path = state_path / STATE_FILE if state_path.is_dir() else state_path
    adapter, model_config, prompt_style = read_state_adapter(state_path)
    try:
        config = Config(**model_config)
    except TypeError as err:
        raise UserError(f"{state_path} holds an unreadable model config: {err}") from None
    check_state_dict(AdapterGPT, config, shapes_of(adapter), source=str(state_path), only_adapter=True)
    output_path = Path(output_path) if output_path is not None else state_path.parent / ADAPTER_FILE
    save_adapter(output_path, None, config, prompt_style, state_dict=adapter)
    print(f"wrote the adapter of {state_path} ({sum(t.numel() for t in adapter.values()):,} parameters) "
          f"to {output_path}")


if __name__ == "__main__":
    run_cli(extract_adapter)
