"""llama2.c models: the legacy version-0 ``.bin`` export or a ``.pt`` training checkpoint."""

import math
import mmap
import struct
import zipfile
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.files import require_file, torch_load
from lit_adapter.config import Config, swiglu_hidden_size
from lit_adapter.convert.common import (StateDict, check_vocab_size, errors_about, make_config, meta_to_lit, require,
                                        tensor_dict)
from lit_adapter.errors import UserError

LLAMA2C_NORM_EPS = 1e-5
LLAMA2C_HEADER = struct.Struct("<7i")
LLAMA2C_MAGIC = 0x616B3432
"""First int32 of llama2.c's versioned (1 and later) exports, which we do not read."""
LLAMA2C_LAYER_ARRAYS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                        "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
"""The per-layer arrays of a version-0 ``.bin``, in file order."""


def convert_llama2c(path: Path, vocab_size: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """A llama2.c model: the legacy version-0 ``.bin`` export or a ``.pt`` training checkpoint.

    A ``vocab_size`` (the tokenizer's) other than the model's is refused.
    """
    path = Path(path)
    require_file(path, hint=" (llama2.c checkpoints are a .bin or .pt file)")
    # both readers map the file without reading the weights yet
    weights, config = _read_llama2c_pt(path) if zipfile.is_zipfile(path) else _read_llama2c_bin(path)
    check_vocab_size(config, vocab_size, str(path))
    return meta_to_lit(weights, config, str(path), dtype), config


def _read_llama2c_pt(path: Path) -> tuple[StateDict, Config]:
    """Weights (Meta names) and config of a ``.pt`` written by llama2.c's train.py."""
    checkpoint = torch_load(path, mmap=True)
    args = checkpoint.get("model_args") if isinstance(checkpoint, dict) else None
    if not isinstance(args, dict) or "model" not in checkpoint:
        raise UserError(f"{path} is not a llama2.c training checkpoint: it needs the keys 'model' and 'model_args'")
    source = str(path)
    need = partial(require, args, source=f"{path} model_args")
    # a model trained under torch.compile is saved with the wrapper's prefix
    model = tensor_dict(checkpoint["model"], path)
    weights = {key.removeprefix("_orig_mod."): tensor for key, tensor in model.items()}
    head, embedding = weights.get("output.weight"), weights.get("tok_embeddings.weight")
    tied = head is None or (embedding is not None and torch.equal(head, embedding))
    if tied:
        weights.pop("output.weight", None)
    dim, hidden = need("dim"), args.get("hidden_dim")
    if hidden is None:  # train.py derives it
        multiple_of = need("multiple_of")
        with errors_about(source):
            hidden = swiglu_hidden_size(dim, multiple_of)
    config = make_config(source, block_size=args.get("max_seq_len"), vocab_size=need("vocab_size"),
                         n_layer=need("n_layers"), n_head=need("n_heads"), n_kv_head=args.get("n_kv_heads"), n_embd=dim,
                         intermediate_size=hidden, norm_eps=args.get("norm_eps", LLAMA2C_NORM_EPS), tie_embeddings=tied)
    return weights, config


def _read_llama2c_bin(path: Path) -> tuple[StateDict, Config]:
    """Weights (Meta names) and config of a version-0 export: a 7 x int32 header, then float32 arrays."""
    with open(path, "rb") as f:
        header = f.read(LLAMA2C_HEADER.size)
        if len(header) < LLAMA2C_HEADER.size:
            raise UserError(f"{path} is too short for the {LLAMA2C_HEADER.size}-byte llama2.c header")
        values = LLAMA2C_HEADER.unpack(header)
        if values[0] == LLAMA2C_MAGIC:
            raise UserError(f"{path} is a versioned llama2.c export: convert the .pt, or export with --version 0")
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = values
        if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len, abs(vocab)) <= 0:
            raise UserError(f"{path}: bad llama2.c header {values}: every size must be positive")
        config = make_config(str(path), block_size=seq_len, vocab_size=abs(vocab), n_layer=n_layers, n_head=n_heads,
                             n_kv_head=n_kv_heads, n_embd=dim, intermediate_size=hidden, norm_eps=LLAMA2C_NORM_EPS,
                             tie_embeddings=vocab > 0)
        layout = _llama2c_layout(config)
        expected = LLAMA2C_HEADER.size + 4 * sum(math.prod(shape) for _, shape in layout)
        actual = path.stat().st_size
        if actual != expected:
            raise UserError(f"{path}: the header {values} needs {expected} bytes but the file has {actual} "
                            "(truncated, or not a llama2.c version-0 export)")
        # a private copy-on-write mapping: pages are read on first use and the file is never written
        data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.float32,
                                offset=LLAMA2C_HEADER.size)
    weights = {}
    for (name, shape), flat in zip(layout, data.split([math.prod(shape) for _, shape in layout])):
        array = flat.view(shape)
        if name in LLAMA2C_LAYER_ARRAYS:
            weights.update({f"layers.{i}.{name}.weight": layer for i, layer in enumerate(array)})
        elif name != "rope_tables":
            weights[f"{name}.weight"] = array
    return weights, config


def _llama2c_layout(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a version-0 ``.bin`` in file order, per-layer ones stacked over the layers."""
    C, L, V, D, hidden = config.n_embd, config.n_layer, config.vocab_size, config.head_dim, config.intermediate_size
    kv = config.n_kv_head * D
    layer_shapes = [(C,), (C, C), (kv, C), (kv, C), (C, C), (C,), (hidden, C), (C, hidden), (hidden, C)]
    layout = [("tok_embeddings", (V, C))]
    layout += [(name, (L, *shape)) for name, shape in zip(LLAMA2C_LAYER_ARRAYS, layer_shapes)]
    layout += [("norm", (C,)), ("rope_tables", (2, config.block_size, D // 2))]
    if not config.tie_embeddings:
        layout.append(("output", (V, C)))
    return layout
