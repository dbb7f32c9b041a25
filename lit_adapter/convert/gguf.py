"""GGUF: llama.cpp's single-file format (llama architecture), weights and tokenizer, read with the gguf package."""

import json
import re
import struct
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from lit_adapter.config import Config
from lit_adapter.convert.common import StateDict, check_vocab_size, make_config, meta_to_lit
from lit_adapter.errors import UserError
from lit_adapter.model import llama3_scaled_frequencies
from lit_adapter.convert.tokenizers import byte_level_bpe, sentencepiece_model
from lit_adapter.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE, TOKENIZER_JSON, TokenizerFiles

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
    check_text_is_utf8(reader, path)
    yield reader


def check_text_is_utf8(reader: Any, path: Path) -> None:
    """Refuse a GGUF file whose text metadata (strings and lists of them, e.g. the tokens) is not UTF-8, as GGUF
    requires: read once here, so that no later read fails."""
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if field.types and field.types[-1] == GGUFValueType.STRING:
            try:
                field.contents()
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: the GGUF metadata {name!r} holds text that is not UTF-8 ({err.reason}; "
                                "damaged file?)") from None


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
    """Our config for the metadata of a GGUF file; other architectures and scaled RoPE types are refused, and so is a
    block count that its tensors do not have."""
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
    block_count = need("block_count")
    blocks = {match[1] for match in (GGUF_LAYER_KEY.fullmatch(tensor.name) for tensor in reader.tensors) if match}
    if block_count != len(blocks):
        raise UserError(f"{source}: llama.block_count is {block_count!r} but the file holds the tensors of "
                        f"{len(blocks)} blocks (blk.N): the file is damaged or its metadata wrong")
    heads = need("attention.head_count")
    vocab = gguf_value(reader, "llama.vocab_size") or len(gguf_value(reader, "tokenizer.ggml.tokens", []))
    eps = need("attention.layer_norm_rms_epsilon")
    config = make_config(source, block_size=need("context_length"), vocab_size=vocab, n_layer=len(blocks),
                         n_head=heads, n_kv_head=gguf_value(reader, "llama.attention.head_count_kv", heads),
                         n_embd=need("embedding_length"), intermediate_size=need("feed_forward_length"),
                         # stored as float32: 1e-5 is 9.99999975e-06
                         norm_eps=float(f"{eps:.6g}") if isinstance(eps, float) else eps,
                         rope_base=gguf_value(reader, "llama.rope.freq_base", 10000.0), tie_embeddings=tied)
    if gguf_value(reader, "llama.rope.dimension_count", config.head_dim) != config.head_dim:
        raise UserError(f"{source}: llama.rope.dimension_count differs from the head size {config.head_dim}")
    return config


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
    ``tokenizer.model`` ('llama'), and a ``tokenizer_config.json`` with its special tokens, BOS rule and chat template.

    Per-token lists must have an entry for every token, and special token ids must be tokens (-1: none)."""
    model = gguf_value(reader, "tokenizer.ggml.model")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens", [])
    types = gguf_token_list(reader, "token_type", len(tokens), path, default=1)  # llama.cpp's "normal"
    names = {"unk_id": "unknown", "bos_id": "bos", "eos_id": "eos", "pad_id": "padding"}
    special_ids = {ours: gguf_token_id(reader, theirs, len(tokens), path) for ours, theirs in names.items()}
    if model == "gpt2":
        merges = [tuple(merge.split(" ", 1)) for merge in gguf_value(reader, "tokenizer.ggml.merges", [])]
        if any(len(merge) != 2 for merge in merges):
            raise UserError(f"{path}: tokenizer.ggml.merges holds an entry that is not two tokens separated by a space "
                            "(damaged file?)")
        pre = gguf_value(reader, "tokenizer.ggml.pre", "gpt-2")
        special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in GGUF_SPECIAL_TOKEN_TYPES}
        try:
            files = {TOKENIZER_JSON: byte_level_bpe({token: i for i, token in enumerate(tokens)}, merges, pre, special,
                                                    ignore_merges=pre == "llama-bpe")}
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        add_bos_default = pre == "llama-bpe"
    elif model == "llama":
        scores = gguf_token_list(reader, "scores", len(tokens), path, default=0.0)
        given_ids = {key: i for key, i in special_ids.items() if i is not None}
        add_space = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
        try:
            model_bytes = sentencepiece_model(tokens, scores, types, given_ids, add_space)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
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


def gguf_token_list(reader: Any, name: str, n_tokens: int, path: Path, default: Any) -> list:
    """The per-token list ``tokenizer.ggml.<name>`` (one entry per token), or ``default`` for each where absent."""
    values = gguf_value(reader, f"tokenizer.ggml.{name}")
    if values is None:
        return [default] * n_tokens
    if not isinstance(values, list) or len(values) != n_tokens:
        count = f"{len(values)} entries" if isinstance(values, list) else "no list"
        raise UserError(f"{path}: tokenizer.ggml.{name} has {count} for the {n_tokens} tokens (damaged file?)")
    return values


GGUF_NO_TOKEN = (-1, 0xFFFFFFFF)
"""llama.cpp's "no such token" id, as int32 and as uint32."""


def gguf_token_id(reader: Any, name: str, n_tokens: int, path: Path) -> Optional[int]:
    """The id of the special token ``tokenizer.ggml.<name>_token_id`` (None where absent or "no such token")."""
    key = f"tokenizer.ggml.{name}_token_id"
    value = gguf_value(reader, key)
    if value is None or value in GGUF_NO_TOKEN:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise UserError(f"{path}: {key} is {value!r}, not a token id of its {n_tokens}-token vocabulary "
                        "(damaged file?)")
    return value
