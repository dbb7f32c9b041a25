from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit_adapter",
    version="0.1.0",
    description="Fine-tune LLaMA models with LLaMA-Adapter on Lightning",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lit_adapter", "lit_adapter.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "lightning>=2.4",
        "jsonargparse[signatures]>=4.27",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "huggingface_hub>=0.23",
        "gguf>=0.10",
        "jinja2>=3.1",
        "protobuf",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "pyyaml",
        "tqdm",
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        # the 4- and 8-bit frozen bases (--precision nf4-base, int8-base, int4-base)
        "quant": ["torchao>=0.18"],
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=4.40", "accelerate", "openai>=1.30", "httpx2",
                 "torchao>=0.18"],
    },
)
