"""Generate text with a converted base model: python generate/base.py --prompt "Once upon a time"."""

from lit_adapter.cli import run_cli
from lit_adapter.generate.cli import main

if __name__ == "__main__":
    run_cli(main, skip=("adapter_path", "adapter", "allow_other_base"),
            description="Generate text with a base model, streaming it to stdout; load time, speed and memory go to "
            "stderr.")
