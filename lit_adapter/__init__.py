"""lit_adapter: fine-tune LLaMA models with LLaMA-Adapter, on Lightning."""

from lit_adapter.adapter import AdapterConfig, AdapterGPT, AdapterLLaMA
from lit_adapter.config import Config
from lit_adapter.model import GPT, LLaMA

__all__ = ["AdapterConfig", "AdapterLLaMA", "Config", "LLaMA", "AdapterGPT", "GPT"]
