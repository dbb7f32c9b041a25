"""Meta, Hugging Face and llama2.c checkpoints turned into our state dict and ``Config``.

Every format is first read under Meta's parameter names (llama2.c uses the same ones) and then mapped onto
``lit_adapter.model.GPT``'s names in one place, ``meta_to_lit``. Files are read as safetensors, with
``torch.load(weights_only=True)`` or as raw float32 arrays, so nothing that carries code is ever run.
"""

import json
import math
import mmap
import re
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, get_args

import torch
from tqdm import tqdm

from lit_adapter.checkpoint import (compare_shapes, preview_keys, read_safetensors, require_file, shapes_of,
                                    torch_load)
from lit_adapter.config import PRESETS, Config, swiglu_hidden_size
from lit_adapter.errors import UserError
from lit_adapter.model import llama3_scaled_frequencies
from lit_adapter.tokenizer import (TOKENIZER_CONFIG, TOKENIZER_FILE, TOKENIZER_JSON, Tokenizer, TokenizerFiles,
                                   byte_level_bpe, sentencepiece_model, tokenizer_files)

Format = Literal["meta", "hf", "llama2c", "gguf"]
StateDict = dict[str, torch.Tensor]

DEFAULT_BLOCK_SIZE = 2048
"""LLaMA's context length, used when the source does not record one and matches no preset."""
LLAMA2C_NORM_EPS = 1e-5
LLAMA2C_HEADER = struct.Struct("<7i")
LLAMA2C_MAGIC = 0x616B3432
"""First int32 of llama2.c's versioned (1 and later) exports, which we do not read."""
LLAMA2C_LAYER_ARRAYS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                        "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
"""The per-layer arrays of a version-0 ``.bin``, in file order."""
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
"""The dimension along which Meta's model-parallel shards split each weight; the others are replicated."""
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
HF_LAYER_NAMES = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
                  "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                  "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3"}
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def convert(format: Format, checkpoint_path: Path, tokenizer_path: Optional[Path] = None,
            dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config, TokenizerFiles]:
    """Our state dict and config for ``checkpoint_path``, and the tokenizer files they go with (found if not given).

    ``dtype`` casts the weights; by default they keep the source's dtype (GGUF: float32).
    """
    if format not in get_args(Format):
        raise UserError(f"unknown checkpoint format {format!r}: choose one of {', '.join(get_args(Format))}")
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.exists():
        raise UserError(f"{checkpoint_path} not found")
    given = tokenizer_files(Path(tokenizer_path), convert_tiktoken=True) if tokenizer_path is not None else None
    if format == "gguf":  # the file holds its tokenizer: one reader for both
        with open_gguf(checkpoint_path) as reader:
            files = given or gguf_tokenizer_files(reader, checkpoint_path)
            vocab_size = Tokenizer(tokenizer_path or checkpoint_path, files).vocab_size
            return (*convert_gguf(reader, checkpoint_path, vocab_size, dtype), files)
    files = given or find_tokenizer(format, checkpoint_path)
    vocab_size = Tokenizer(tokenizer_path or checkpoint_path, files).vocab_size
    converter = {"meta": convert_meta, "hf": convert_hf, "llama2c": convert_llama2c}[format]
    state_dict, config = converter(checkpoint_path, vocab_size, dtype)
    return state_dict, config, files


def find_tokenizer(format: Format, checkpoint_path: Path) -> TokenizerFiles:
    """The tokenizer files inside or beside ``checkpoint_path`` (for llama2.c also ``tok512.model``)."""
    names = (TOKENIZER_JSON, TOKENIZER_FILE) + (("tok512.model",) if format == "llama2c" else ())
    folders = [checkpoint_path, checkpoint_path.parent] if checkpoint_path.is_dir() else [checkpoint_path.parent]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return tokenizer_files(folder / name, convert_tiktoken=True)
    raise UserError(f"no {' or '.join(names)} in {' or '.join(map(str, folders))}: pass the tokenizer path")


# ---- Meta: params.json + consolidated.NN.pth


def convert_meta(checkpoint_dir: Path, vocab_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """A Meta release directory (``params.json`` + model-parallel ``consolidated.NN.pth`` shards).

    ``vocab_size`` (the tokenizer's) stands in for the -1 that Llama 2's ``params.json`` records.
    """
    checkpoint_dir = Path(checkpoint_dir)
    params_path = checkpoint_dir / "params.json"
    config = meta_config(_read_json(params_path), vocab_size, source=str(params_path))
    check_vocab_size(config, vocab_size, str(params_path))
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise UserError(f"{checkpoint_dir} holds no consolidated.*.pth shard")
    shards = [_tensor_dict(torch_load(path, mmap=True), path) for path in tqdm(shard_paths, desc="shards")]
    weights = merge_meta_shards(shards, shard_paths)
    return meta_to_lit(weights, config, str(checkpoint_dir), dtype), config


def meta_config(params: dict, vocab_size: Optional[int], source: str) -> Config:
    """Our config for a Meta ``params.json``, with the SwiGLU width its reference code derives.

    ``use_scaled_rope`` (Llama 3.1, 3.2) is Meta's "llama3" RoPE scaling: factor ``rope_scaling_factor`` (8 where
    the file does not say), low/high frequency factors 1 and 4, over an original context of 8192.
    """
    need = partial(_require, params, source=source)
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:
        if vocab_size is None:
            raise UserError(f"{source} leaves vocab_size at {vocab}: the tokenizer's vocab size is needed")
        vocab = vocab_size
    dim = need("dim")
    hidden = swiglu_hidden_size(dim, need("multiple_of"), params.get("ffn_dim_multiplier"))
    return make_config(source, block_size=params.get("max_seq_len"), vocab_size=vocab, n_layer=need("n_layers"),
                       n_head=need("n_heads"), n_kv_head=params.get("n_kv_heads"), n_embd=dim,
                       intermediate_size=hidden, norm_eps=need("norm_eps"),
                       rope_base=float(params.get("rope_theta", 10000.0)),
                       rope_scaling_factor=float(params.get("rope_scaling_factor", 8.0))
                       if params.get("use_scaled_rope") else None)


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


# ---- Hugging Face: config.json + safetensors or pytorch_model*.bin


def convert_hf(checkpoint_dir: Path, vocab_size: Optional[int] = None,
               dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """A Hugging Face Llama directory: ``config.json`` and safetensors or ``pytorch_model*.bin`` files.

    A ``vocab_size`` (the tokenizer's) other than the model's is refused before any weight is read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    config = hf_config(_read_json(config_path), source=str(config_path))
    check_vocab_size(config, vocab_size, str(config_path))
    weights = {}
    for path in tqdm(hf_weight_files(checkpoint_dir), desc="files"):
        file_weights = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path, mmap=True)
        weights.update(_tensor_dict(file_weights, path))
    weights = {HF_NAMES.get(name, _hf_layer_name(name)): tensor for name, tensor in weights.items()
               if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        weights.pop("output.weight", None)
    source = str(checkpoint_dir)
    check_meta_weights(weights, config, source)
    for i in range(config.n_layer):
        for name, heads in (("wq", config.n_head), ("wk", config.n_kv_head)):
            key = f"layers.{i}.attention.{name}.weight"
            weights[key] = hf_to_interleaved_rope(weights[key], heads)
    return meta_to_lit(weights, config, source, dtype), config


def hf_config(hf: dict, source: str) -> Config:
    """Our config for a Hugging Face Llama ``config.json``; what our model cannot run is refused."""
    need = partial(_require, hf, source=source)
    for key, supported in (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
        if hf.get(key, supported) != supported:
            raise UserError(f"{source}: {key} {hf[key]!r} is not supported (only {supported!r})")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    if (hf.get("head_dim") or dim // heads) != dim // heads:
        raise UserError(f"{source}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
    return make_config(source, block_size=hf.get("max_position_embeddings"), vocab_size=need("vocab_size"),
                       n_layer=need("num_hidden_layers"), n_head=heads, n_kv_head=hf.get("num_key_value_heads"),
                       n_embd=dim, intermediate_size=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", False), **_hf_rope(hf, source))


def _hf_rope(hf: dict, source: str) -> dict[str, Any]:
    """Our RoPE fields for ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x).

    Only Llama 3.1's "llama3" scaling is supported; any other is refused.
    """
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return fields
    if kind != "llama3":
        raise UserError(f"{source}: RoPE scaling {kind!r} is not supported (only 'llama3' or none)")
    need = partial(_require, rope, source=f"{source} rope scaling")
    return {**fields, "rope_scaling_factor": float(need("factor")),
            "rope_low_freq_factor": float(need("low_freq_factor")),
            "rope_high_freq_factor": float(need("high_freq_factor")),
            "rope_original_max_positions": int(need("original_max_position_embeddings"))}


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors first; sharded ones as listed by their index."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = checkpoint_dir / f"{single}.index.json"
        if index.is_file():
            weight_map = _require(_read_json(index), "weight_map", source=str(index))
            paths = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
            missing = [path.name for path in paths if not path.is_file()]
            if missing:
                raise UserError(f"{index} lists {', '.join(missing)}, not found in {checkpoint_dir}")
            return paths
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise UserError(f"{checkpoint_dir} holds no model.safetensors, pytorch_model.bin or their .index.json")


def _hf_layer_name(name: str) -> str:
    """Meta's name for a Hugging Face layer weight; unknown names stay as they are for the key check to report."""
    match = HF_LAYER_KEY.fullmatch(name)
    if match and match[2] in HF_LAYER_NAMES:
        return f"layers.{match[1]}.{HF_LAYER_NAMES[match[2]]}.weight"
    return name


def hf_to_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotary row order: in each head, rows (x0, x2, ..., x1, x3, ...) back to Meta's (x0, x1, x2, ...)."""
    return weight.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


# ---- llama2.c: version-0 .bin export or .pt training checkpoint


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
    need = partial(_require, args, source=f"{path} model_args")
    # a model trained under torch.compile is saved with the wrapper's prefix
    model = _tensor_dict(checkpoint["model"], path)
    weights = {key.removeprefix("_orig_mod."): tensor for key, tensor in model.items()}
    head, embedding = weights.get("output.weight"), weights.get("tok_embeddings.weight")
    tied = head is None or (embedding is not None and torch.equal(head, embedding))
    if tied:
        weights.pop("output.weight", None)
    dim = need("dim")
    hidden = args.get("hidden_dim") or swiglu_hidden_size(dim, need("multiple_of"))
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


# ---- GGUF: llama.cpp's single-file format (llama architecture), read with the gguf package

GGUF_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
GGUF_LAYER_KEY = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""The tensor types we dequantise."""
GGUF_SPECIAL_TOKEN_TYPES = (3, 4)
"""llama.cpp's token types of control and user-defined tokens (added tokens, never split)."""


@contextmanager
def open_gguf(path: Path) -> Iterator[Any]:
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped); a file that is not GGUF gives a one-line error."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file (the gguf format takes a .gguf file)")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError) as err:
        raise UserError(f"{path} is not a readable GGUF file (truncated, or another format?): {err}") from None
    yield reader


def gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value of a GGUF file (lists of strings as lists), or ``default`` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def convert_gguf(reader: Any, path: Path, vocab_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[StateDict, Config]:
    """The llama-architecture GGUF file ``path`` open in ``reader``, every tensor dequantised to float32 (then cast
    to ``dtype`` if given).

    llama.cpp stores the query and key rows in Meta's interleaved rotary order, which is ours: they are kept.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    source = str(path)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(reader, source, tied="output.weight" not in tensors)
    check_vocab_size(config, vocab_size, source)
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(dequantize(tensors.pop("rope_freqs.weight").data, GGMLQuantizationType.F32).copy())
        config = gguf_rope_scaling(reader, config, factors.flatten(), source)
    weights = {}
    for name, tensor in tqdm(tensors.items(), desc="tensors"):
        kind = tensor.tensor_type.name
        if kind not in GGUF_TYPES:
            raise UserError(f"{source}: tensor {name} has type {kind}, which is not supported "
                            f"(only {', '.join(GGUF_TYPES)}); use a GGUF file of another quantisation")
        array = dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape)])
        weights[_gguf_name(name)] = torch.from_numpy(array.astype("float32"))
    return meta_to_lit(weights, config, source, dtype), config


def gguf_config(reader: Any, source: str, tied: bool) -> Config:
    """Our config for the metadata of a GGUF file; other architectures and scaled RoPE types are refused."""
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{source}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def need(key: str) -> Any:
        value = gguf_value(reader, f"llama.{key}")
        if value is None:
            raise UserError(f"{source} lacks the GGUF metadata 'llama.{key}'")
        return value

    scaling = gguf_value(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UserError(f"{source}: RoPE scaling {scaling!r} is not supported")
    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    if int(gguf_value(reader, "llama.rope.dimension_count", dim // heads)) != dim // heads:
        raise UserError(f"{source}: llama.rope.dimension_count differs from the head size {dim // heads}")
    vocab = gguf_value(reader, "llama.vocab_size") or len(gguf_value(reader, "tokenizer.ggml.tokens", []))
    eps = float(f"{need('attention.layer_norm_rms_epsilon'):.6g}")  # stored as float32: 1e-5 is 9.99999975e-06
    return make_config(source, block_size=int(need("context_length")), vocab_size=int(vocab),
                       n_layer=int(need("block_count")), n_head=heads,
                       n_kv_head=int(gguf_value(reader, "llama.attention.head_count_kv", heads)), n_embd=dim,
                       intermediate_size=int(need("feed_forward_length")), norm_eps=eps,
                       rope_base=float(gguf_value(reader, "llama.rope.freq_base", 10000.0)), tie_embeddings=tied)


def gguf_rope_scaling(reader: Any, config: Config, factors: torch.Tensor, source: str) -> Config:
    """``config`` with the Llama 3.1 RoPE scaling that llama.cpp wrote as per-frequency ``factors``.

    The factor is the largest one; the low/high frequency factors are Meta's 1 and 4, over the original context
    recorded in the file (8192 if absent). Factors that this scaling does not reproduce are refused.
    """
    original = int(gguf_value(reader, "llama.rope.scaling.original_context_length", 8192))
    fields = dict(rope_scaling_factor=float(factors.max()), rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_max_positions=original)
    scaled = replace(config, **fields)
    inv_freq = 1.0 / config.rope_base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    expected = inv_freq / llama3_scaled_frequencies(inv_freq, scaled)
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4):
        raise UserError(f"{source}: its per-frequency RoPE factors (rope_freqs.weight) are not Llama 3.1's scaling, "
                        "the only one supported; convert the model's Hugging Face folder with --format hf")
    return make_config(source, block_size=config.block_size, **scaled.base_shape())


def _gguf_name(name: str) -> str:
    """Meta's name for a GGUF tensor; unknown names stay as they are for the key check to report."""
    match = GGUF_LAYER_KEY.fullmatch(name)
    if match and match[2] in GGUF_LAYER_NAMES:
        return f"layers.{match[1]}.{GGUF_LAYER_NAMES[match[2]]}.weight"
    return GGUF_NAMES.get(name, name)


def gguf_tokenizer_files(reader: Any, path: Path) -> TokenizerFiles:
    """The tokenizer of a GGUF file: ``tokenizer.json`` (byte-level BPE, 'gpt2') or a SentencePiece
    ``tokenizer.model`` ('llama'), and a ``tokenizer_config.json`` with its special tokens, BOS rule and chat template."""
    model = gguf_value(reader, "tokenizer.ggml.model")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens", [])
    types = gguf_value(reader, "tokenizer.ggml.token_type", [])
    special_ids = {ours: gguf_value(reader, f"tokenizer.ggml.{theirs}_token_id")
                   for ours, theirs in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding"))}
    if model == "gpt2":
        merges = [tuple(merge.split(" ", 1)) for merge in gguf_value(reader, "tokenizer.ggml.merges", [])]
        pre = gguf_value(reader, "tokenizer.ggml.pre", "gpt-2")
        special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in GGUF_SPECIAL_TOKEN_TYPES}
        try:
            files = {TOKENIZER_JSON: byte_level_bpe({token: i for i, token in enumerate(tokens)}, merges, pre, special,
                                                    ignore_merges=pre == "llama-bpe")}
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        add_bos_default = pre == "llama-bpe"
    elif model == "llama":
        model_bytes = sentencepiece_model(tokens, gguf_value(reader, "tokenizer.ggml.scores"), types,
                                          {k: v for k, v in special_ids.items() if v is not None},
                                          bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)))
        files, add_bos_default = {TOKENIZER_FILE: model_bytes}, True
    else:
        raise UserError(f"{path}: GGUF tokenizer {model!r} is not supported (only 'gpt2', byte-level BPE, or "
                        "'llama', SentencePiece); convert the model's Hugging Face folder with --format hf")

    def token(key: str) -> Optional[str]:
        return None if special_ids[key] is None else tokens[special_ids[key]]

    config = {"bos_token": token("bos_id"), "eos_token": token("eos_id"),
              "add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
              "chat_template": gguf_value(reader, "tokenizer.chat_template")}
    return {**files, TOKENIZER_CONFIG: json.dumps(config, indent=2)}


# ---- shared: config, key and shape checks, the mapping onto our names


def make_config(source: str, block_size: Optional[int] = None, **shape: Any) -> Config:
    """The preset of this shape (with ``block_size`` if known), else a config named "custom"."""
    try:
        config = Config(name="custom", block_size=block_size or DEFAULT_BLOCK_SIZE, **shape)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    for preset in PRESETS.values():
        if preset.base_shape() == config.base_shape():  # the same model, whatever its name, context or adapter
            return replace(preset, block_size=block_size or preset.block_size)
    return config


def check_vocab_size(config: Config, vocab_size: Optional[int], source: str) -> None:
    """Refuse a tokenizer whose vocabulary size (if given) is not the model's."""
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise UserError(f"{source} describes a model of {config.vocab_size} tokens but the tokenizer has {vocab_size}: "
                        "pass the tokenizer the model was trained with")


def meta_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """The shape of every weight under Meta's names (no ``output.weight`` when tied)."""
    C, V, hidden = config.n_embd, config.vocab_size, config.intermediate_size
    kv = config.n_kv_head * config.head_dim
    shapes = {"tok_embeddings.weight": (V, C), "norm.weight": (C,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, C)
    for i in range(config.n_layer):
        layer = {"attention_norm": (C,), "attention.wq": (C, C), "attention.wk": (kv, C), "attention.wv": (kv, C),
                 "attention.wo": (C, C), "ffn_norm": (C,), "feed_forward.w1": (hidden, C),
                 "feed_forward.w2": (C, hidden), "feed_forward.w3": (hidden, C)}
        shapes.update({f"layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    return shapes


def check_meta_weights(weights: StateDict, config: Config, source: str) -> None:
    """A one-line ``UserError`` unless ``weights`` has exactly the Meta-named keys and shapes of ``config``."""
    missing, unknown, wrong = compare_shapes(meta_shapes(config), shapes_of(weights))
    if missing or unknown:
        problems = [f"{what} keys {preview_keys(keys)}"
                    for what, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise UserError(f"{source} does not fit {config.name}: {'; '.join(problems)}")
    if wrong:
        key, shape, expected = wrong[0]
        raise UserError(f"{source}: {key} has shape {shape}, {config.name} needs {expected}")


def check_weight_dtypes(weights: StateDict, source: str, dtype: Optional[torch.dtype]) -> None:
    """Refuse integer (quantized) weights, and float64 ones unless ``dtype`` says what to store them as."""
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            raise UserError(f"{source}: {key} holds {tensor.dtype} values (quantized weights?); only float "
                            "weights can be converted: start from the unquantized checkpoint")
        if tensor.dtype == torch.float64 and dtype is None:
            raise UserError(f"{source}: {key} is float64, which the model does not run in: pass --dtype float32 "
                            "(or bfloat16, float16) to store it converted")


def meta_to_lit(weights: StateDict, config: Config, source: str, dtype: Optional[torch.dtype] = None) -> StateDict:
    """Our state dict from weights under Meta's names (checked first), cast to ``dtype`` if given."""
    check_meta_weights(weights, config, source)
    check_weight_dtypes(weights, source, dtype)

    def get(key: str) -> torch.Tensor:
        return weights[key].to(dtype=dtype)

    ours = {"embed.weight": get("tok_embeddings.weight"), "norm.weight": get("norm.weight")}
    if not config.tie_embeddings:
        ours["lm_head.weight"] = get("output.weight")
    for i in tqdm(range(config.n_layer), desc="layers"):
        meta, lit = f"layers.{i}.", f"blocks.{i}."
        ours[lit + "attn_norm.weight"] = get(meta + "attention_norm.weight")
        ours[lit + "attn.qkv.weight"] = torch.cat([get(meta + f"attention.w{x}.weight") for x in "qkv"])
        ours[lit + "attn.proj.weight"] = get(meta + "attention.wo.weight")
        ours[lit + "mlp_norm.weight"] = get(meta + "ffn_norm.weight")
        ours[lit + "mlp.gate_up.weight"] = torch.cat([get(meta + "feed_forward.w1.weight"),
                                                      get(meta + "feed_forward.w3.weight")])
        ours[lit + "mlp.down.weight"] = get(meta + "feed_forward.w2.weight")
    return ours


# ---- small readers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def _require(mapping: dict, key: str, source: str) -> Any:
    if mapping.get(key) is None:
        raise UserError(f"{source} lacks {key!r}")
    return mapping[key]


def _tensor_dict(value: Any, path: Path) -> StateDict:
    """``value`` if it is a state dict (a dict of tensors), else a one-line error about ``path``."""
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise UserError(f"{path} does not hold a state dict (a dict of tensors)")
    return value




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
        raise UserError(f"could not download {repo_id} ({str(err).splitlines()[0]}); without network, copy the "
                        "model's folder here and pass it to scripts/convert_checkpoint.py") from None
