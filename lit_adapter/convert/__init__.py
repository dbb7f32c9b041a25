"""Meta, Hugging Face, GGUF and llama2.c checkpoints turned into our state dict and ``Config``: ``convert`` picks
the reader of a format and finds the tokenizer files that go with it.

One module per format (``meta``, ``hf`` with the Hub download, ``gguf``, ``llama2c``) reads it under Meta's
parameter names (llama2.c uses the same ones); ``common`` maps those onto ``lit_adapter.model.LLaMA``'s names in one
place, ``meta_to_lit``; ``tokenizers`` builds the tokenizer files of Meta's tiktoken file and of GGUF vocabularies.
Files are read as safetensors, with ``torch.load(weights_only=True)`` or as raw float32 arrays, so nothing that
carries code is ever run.
"""

from functools import partial
from pathlib import Path
from typing import Optional, get_args

import torch

from lit_adapter.config import Config
from lit_adapter.convert.common import Format, StateDict
from lit_adapter.convert.gguf import convert_gguf, gguf_tokenizer_files, open_gguf
from lit_adapter.convert.hf import convert_hf
from lit_adapter.convert.llama2c import convert_llama2c
from lit_adapter.convert.meta import convert_meta
from lit_adapter.convert.tokenizers import llama3_tokenizer_files
from lit_adapter.errors import UserError
from lit_adapter.tokenizer import TOKENIZER_FILE, TOKENIZER_JSON, Tokenizer, TokenizerFiles, tokenizer_files


def convert(format: Format, checkpoint_path: Path, tokenizer_path: Optional[Path] = None,
            dtype: Optional[torch.dtype] = None,
            llama3_release: Optional[str] = None) -> tuple[StateDict, Config, TokenizerFiles]:
    """Our state dict and config for ``checkpoint_path``, and the tokenizer files they go with (found if not given).

    ``dtype`` casts the weights; by default they keep the source's dtype (GGUF: float32). ``llama3_release`` names
    the special tokens of Meta's Llama 3 tiktoken file (by default its download's params.json tells).
    """
    if format not in get_args(Format):
        raise UserError(f"unknown checkpoint format {format!r}: choose one of {', '.join(get_args(Format))}")
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.exists():
        raise UserError(f"{checkpoint_path} not found")
    tiktoken_files = partial(llama3_tokenizer_files, release=llama3_release)
    given = tokenizer_files(Path(tokenizer_path), tiktoken_files) if tokenizer_path is not None else None
    if format == "gguf":  # the file holds its tokenizer: one reader for both
        with open_gguf(checkpoint_path) as reader:
            files = given or gguf_tokenizer_files(reader, checkpoint_path)
            vocab_size = Tokenizer(tokenizer_path or checkpoint_path, files).vocab_size
            return (*convert_gguf(reader, checkpoint_path, vocab_size, dtype), files)
    files = given or find_tokenizer(format, checkpoint_path, llama3_release)
    vocab_size = Tokenizer(tokenizer_path or checkpoint_path, files).vocab_size
    converter = {"meta": convert_meta, "hf": convert_hf, "llama2c": convert_llama2c}[format]
    state_dict, config = converter(checkpoint_path, vocab_size, dtype)
    return state_dict, config, files


def find_tokenizer(format: Format, checkpoint_path: Path, llama3_release: Optional[str] = None) -> TokenizerFiles:
    """The tokenizer files inside or beside ``checkpoint_path`` (for llama2.c also ``tok512.model``)."""
    names = (TOKENIZER_JSON, TOKENIZER_FILE) + (("tok512.model",) if format == "llama2c" else ())
    folders = [checkpoint_path, checkpoint_path.parent] if checkpoint_path.is_dir() else [checkpoint_path.parent]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return tokenizer_files(folder / name, partial(llama3_tokenizer_files, release=llama3_release))
    raise UserError(f"no {' or '.join(names)} in {' or '.join(map(str, folders))}: pass the tokenizer path")
