"""Write the adapter of a training state to an adapter-only file for generate/adapter.py:

    python scripts/extract_adapter.py --state_path out/adapter/alpaca/step-001000
"""

from lit_adapter.cli import run_cli
from lit_adapter.train.state import extract_adapter

if __name__ == "__main__":
    run_cli(extract_adapter)
