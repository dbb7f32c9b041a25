"""What the format readers share: the ``Config`` of a source's shape, the key, shape and dtype checks under Meta's
names, the one mapping from Meta's names onto ``lit_adapter.model.LLaMA``'s (``meta_to_lit``), and small readers."""

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from tqdm import tqdm

from lit_adapter.files import BAD_JSON, compare_shapes, json_problem, preview_keys, read_text, shapes_of
from lit_adapter.config import PRESETS, Config
from lit_adapter.errors import UserError

Format = Literal["meta", "hf", "llama2c", "gguf"]
StateDict = dict[str, torch.Tensor]

DEFAULT_BLOCK_SIZE = 2048
"""LLaMA's context length, used when the source does not record one and matches no preset."""


@contextmanager
def errors_about(source: str) -> Iterator[None]:
    """Name ``source`` (the file whose values are checked) in front of the one-line errors raised inside."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


def make_config(source: str, block_size: Optional[int] = None, **shape: Any) -> Config:
    """The preset of this shape (with ``block_size`` if known), else a config named "custom"; every value is
    checked by ``Config`` first."""
    with errors_about(source):
        config = Config(name="custom", block_size=DEFAULT_BLOCK_SIZE if block_size is None else block_size, **shape)
    for preset in PRESETS.values():
        if preset.base_shape() == config.base_shape():  # the same model, whatever its name, context or adapter
            return replace(preset, block_size=preset.block_size if block_size is None else config.block_size)
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


CONVERTIBLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weight_dtypes(weights: StateDict, source: str, dtype: Optional[torch.dtype]) -> None:
    """Refuse integer and float8 (quantized) weights, and float64 ones unless ``dtype`` says what to store them as."""
    for key, tensor in weights.items():
        if tensor.dtype not in CONVERTIBLE_DTYPES:
            raise UserError(f"{source}: {key} holds {tensor.dtype} values (quantized weights?); only float32, "
                            "float16 and bfloat16 weights can be converted: start from the unquantized checkpoint")
        if tensor.dtype == torch.float64 and dtype is None:
            raise UserError(f"{source}: {key} is float64, which the model does not run in: pass --dtype float32 "
                            "(or bfloat16, float16) to store it converted")


def meta_to_lit(weights: StateDict, config: Config, source: str, dtype: Optional[torch.dtype] = None) -> StateDict:
    """Our state dict from weights under Meta's names (checked first), cast to ``dtype`` if given."""
    check_weight_dtypes(weights, source, dtype)  # first: quantized checkpoints also have keys of their own
    check_meta_weights(weights, config, source)

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


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        value = json.loads(read_text(path))
    except BAD_JSON as err:
        raise UserError(f"{path} is not valid JSON: {json_problem(err)}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def require(mapping: dict, key: str, source: str) -> Any:
    if mapping.get(key) is None:
        raise UserError(f"{source} lacks {key!r}")
    return mapping[key]


def tensor_dict(value: Any, path: Path) -> StateDict:
    """``value`` if it is a state dict (a dict of tensors), else a one-line error about ``path``."""
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise UserError(f"{path} does not hold a state dict (a dict of tensors)")
    return value
