"""Hugging Face Llama folders (``config.json`` and safetensors or ``pytorch_model*.bin`` files), and downloading
one from the Hub."""

import re
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Optional

import torch
from tqdm import tqdm

from lit_adapter.files import read_safetensors, torch_load
from lit_adapter.config import Config
from lit_adapter.convert.common import (StateDict, check_meta_weights, check_vocab_size, check_weight_dtypes,
                                        make_config, meta_to_lit, read_json, require, tensor_dict)
from lit_adapter.errors import UserError, message_line

HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
HF_LAYER_NAMES = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
                  "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                  "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3"}
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def convert_hf(checkpoint_dir: Path, vocab_size: Optional[int] = None,
               dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """A Hugging Face Llama directory: ``config.json`` and safetensors or ``pytorch_model*.bin`` files.

    A ``vocab_size`` (the tokenizer's) other than the model's is refused before any weight is read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    config = hf_config(read_json(config_path), source=str(config_path))
    check_vocab_size(config, vocab_size, str(config_path))
    weights = {}
    for path in tqdm(hf_weight_files(checkpoint_dir), desc="files"):
        file_weights = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path, mmap=True)
        weights.update(tensor_dict(file_weights, path))
    weights = {HF_NAMES.get(name, _hf_layer_name(name)): tensor for name, tensor in weights.items()
               if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        weights.pop("output.weight", None)
    source = str(checkpoint_dir)
    check_weight_dtypes(weights, source, dtype)
    check_meta_weights(weights, config, source)
    for i in range(config.n_layer):
        for name, heads in (("wq", config.n_head), ("wk", config.n_kv_head)):
            key = f"layers.{i}.attention.{name}.weight"
            weights[key] = hf_to_interleaved_rope(weights[key], heads)
    return meta_to_lit(weights, config, source, dtype), config


def hf_config(hf: dict, source: str) -> Config:
    """Our config for a Hugging Face Llama ``config.json``; what our model cannot run is refused."""
    need = partial(require, hf, source=source)
    for key, supported in (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
        if hf.get(key, supported) != supported:
            raise UserError(f"{source}: {key} {hf[key]!r} is not supported (only {supported!r})")
    config = make_config(source, block_size=hf.get("max_position_embeddings"), vocab_size=need("vocab_size"),
                         n_layer=need("num_hidden_layers"), n_head=need("num_attention_heads"),
                         n_kv_head=hf.get("num_key_value_heads"), n_embd=need("hidden_size"),
                         intermediate_size=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
                         tie_embeddings=hf.get("tie_word_embeddings", False), **_hf_rope(hf, source))
    if hf.get("head_dim", config.head_dim) != config.head_dim:
        raise UserError(f"{source}: head_dim {hf['head_dim']!r} differs from hidden_size / num_attention_heads "
                        f"({config.head_dim})")
    return config


def _hf_rope(hf: dict, source: str) -> dict[str, Any]:
    """Our RoPE fields for ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x), read as
    transformers reads them: a ``rope_scaling`` replaces ``rope_parameters`` whole, and the theta is its own or
    the top-level ``rope_theta``.

    Only Llama 3.1's "llama3" scaling is supported; any other is refused.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise UserError(f"{source}: {key} must be a JSON object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_base": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}
    if kind == "default":
        return fields
    if kind != "llama3":
        raise UserError(f"{source}: RoPE scaling {kind!r} is not supported (only 'llama3' or none)")
    need = partial(require, rope, source=f"{source} rope scaling")
    return {**fields, "rope_scaling_factor": need("factor"), "rope_low_freq_factor": need("low_freq_factor"),
            "rope_high_freq_factor": need("high_freq_factor"),
            "rope_original_max_positions": need("original_max_position_embeddings")}


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors first; sharded ones as listed by their index,
    which may name files inside the directory only."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = checkpoint_dir / f"{single}.index.json"
        if index.is_file():
            weight_map = require(read_json(index), "weight_map", source=str(index))
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise UserError(f"{index}: weight_map must map each tensor name to a file name (regenerate it)")
            names = sorted(set(weight_map.values()))
            outside = [name for name in names if not stays_inside(name)]
            if outside:
                raise UserError(f"{index} lists {outside[0]!r}, not a file name inside {checkpoint_dir}: only the "
                                "directory's own shards are read (fix or regenerate the index)")
            paths = [checkpoint_dir / name for name in names]
            missing = [path.name for path in paths if not path.is_file()]
            if missing:
                raise UserError(f"{index} lists {', '.join(missing)}, not found in {checkpoint_dir}")
            return paths
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise UserError(f"{checkpoint_dir} holds no model.safetensors, pytorch_model.bin or their .index.json")


def stays_inside(name: str) -> bool:
    """Whether the path ``name`` names something inside the directory it is relative to: not absolute, no '..'."""
    path = PurePath(name)
    return not path.is_absolute() and ".." not in path.parts


def _hf_layer_name(name: str) -> str:
    """Meta's name for a Hugging Face layer weight; unknown names stay as they are for the key check to report."""
    match = HF_LAYER_KEY.fullmatch(name)
    if match and match[2] in HF_LAYER_NAMES:
        return f"layers.{match[1]}.{HF_LAYER_NAMES[match[2]]}.weight"
    return name


def hf_to_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotary row order: in each head, rows (x0, x2, ..., x1, x3, ...) back to Meta's (x0, x1, x2, ...)."""
    return weight.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


# ---- the Hugging Face Hub

HF_DOWNLOAD_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
"""What conversion reads of a Hub repository (PyTorch .bin weights are left out where safetensors exist)."""


def download_hf(repo_id: str, output_dir: Path, revision: Optional[str] = None, token: Optional[str] = None) -> None:
    """Download what ``convert_hf`` needs of a Hub repository into ``output_dir`` (resumable; files appear whole)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, token=token, local_dir=output_dir,
                          allow_patterns=list(HF_DOWNLOAD_PATTERNS))
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its license on its Hub page, then pass --token or set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise UserError(f"no Hub repository {repo_id} (or it is private: pass --token)") from None
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"could not download {repo_id} ({message_line(err)}); without network, copy the "
                        "model's folder here and pass it to scripts/convert_checkpoint.py") from None
