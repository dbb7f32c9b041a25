"""Meta's releases: ``params.json`` and model-parallel ``consolidated.NN.pth`` shards."""

from functools import partial
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from lit_adapter.files import torch_load
from lit_adapter.config import Config, swiglu_hidden_size
from lit_adapter.convert.common import (StateDict, check_vocab_size, errors_about, make_config, meta_to_lit,
                                        read_json, require, tensor_dict)
from lit_adapter.errors import UserError

META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
"""The dimension along which Meta's model-parallel shards split each weight; the others are replicated."""


def convert_meta(checkpoint_dir: Path, vocab_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """A Meta release directory (``params.json`` + model-parallel ``consolidated.NN.pth`` shards).

    ``vocab_size`` (the tokenizer's) stands in for the -1 that Llama 2's ``params.json`` records.
    """
    checkpoint_dir = Path(checkpoint_dir)
    params_path = checkpoint_dir / "params.json"
    config = meta_config(read_json(params_path), vocab_size, source=str(params_path))
    check_vocab_size(config, vocab_size, str(params_path))
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise UserError(f"{checkpoint_dir} holds no consolidated.*.pth shard")
    shards = [tensor_dict(torch_load(path, mmap=True), path) for path in tqdm(shard_paths, desc="shards")]
    weights = merge_meta_shards(shards, shard_paths)
    return meta_to_lit(weights, config, str(checkpoint_dir), dtype), config


def meta_config(params: dict, vocab_size: Optional[int], source: str) -> Config:
    """Our config for a Meta ``params.json``, with the SwiGLU width its reference code derives.

    ``use_scaled_rope`` (Llama 3.1, 3.2) is Meta's "llama3" RoPE scaling: factor ``rope_scaling_factor`` (8 where
    the file does not say), low/high frequency factors 1 and 4, over an original context of 8192.
    """
    need = partial(require, params, source=source)
    vocab = params.get("vocab_size", -1)
    if vocab == -1:
        if vocab_size is None:
            raise UserError(f"{source} leaves vocab_size at -1: the tokenizer's vocab size is needed")
        vocab = vocab_size
    dim, multiple_of, scaled = need("dim"), need("multiple_of"), params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise UserError(f"{source}: use_scaled_rope must be true or false, got {scaled!r}")
    with errors_about(source):
        hidden = swiglu_hidden_size(dim, multiple_of, params.get("ffn_dim_multiplier"))
    return make_config(source, block_size=params.get("max_seq_len"), vocab_size=vocab, n_layer=need("n_layers"),
                       n_head=need("n_heads"), n_kv_head=params.get("n_kv_heads"), n_embd=dim,
                       intermediate_size=hidden, norm_eps=need("norm_eps"),
                       rope_base=params.get("rope_theta", 10000.0),
                       rope_scaling_factor=params.get("rope_scaling_factor", 8.0) if scaled else None)


def merge_meta_shards(shards: list[StateDict], paths: list[Path]) -> StateDict:
    """One state dict from Meta's model-parallel shards: split weights concatenated, replicated ones taken once."""
    for shard, path in zip(shards[1:], paths[1:]):
        if shard.keys() != shards[0].keys():
            raise UserError(f"{path} holds other keys than {paths[0]}: the shards are not of one model")
    merged = {}
    for key in shards[0]:
        if key == "rope.freqs":
            continue
        parts = [shard[key] for shard in shards]
        if any(part.shape != parts[0].shape for part in parts):
            raise UserError(f"{key} has different shapes in the shards {paths[0]} ... {paths[-1]}")
        dim = META_SPLIT_DIM.get(key.split(".")[-2])
        merged[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)
    return merged
