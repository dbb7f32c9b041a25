"""Fine-tune a LLaMA-Adapter with Lightning Fabric:

    python finetune/adapter.py --config finetune/configs/alpaca_7b.yaml
"""

from lit_adapter.cli import run_cli
from lit_adapter.train.fabric_loop import main

if __name__ == "__main__":
    run_cli(main)
