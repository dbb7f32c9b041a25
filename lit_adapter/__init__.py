"""lit_adapter: fine-tune LLaMA models with LLaMA-Adapter, on Lightning."""

from lit_adapter.adapter import AdapterGPT
from lit_adapter.config import Config
from lit_adapter.model import GPT

__all__ = ["AdapterGPT", "Config", "GPT"]
