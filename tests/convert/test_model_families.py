"""Model families beyond LLaMA 1/2: the Llama 3 tokenizer, Llama 3.1 RoPE scaling, and the real SmolLM2-135M-Instruct
GGUF converted by us against transformers' own GGUF loader (and through a Hugging Face folder written from it)."""

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_GGUF, run_script_in_this_process, shared_file
from tests.convert.test_convert import lit_to_meta, randomize_

from lit_adapter.checkpoint import load_model, read_config, save_checkpoint_dir
from lit_adapter.config import Config
from lit_adapter.convert import convert, find_tokenizer
from lit_adapter.convert.gguf import GGUF_LAYER_NAMES, GGUF_NAMES
from lit_adapter.convert.hf import convert_hf, hf_config
from lit_adapter.convert.meta import meta_config
from lit_adapter.convert.tokenizers import bytes_to_unicode, llama3_release, sentencepiece_model
from lit_adapter.errors import UserError
from lit_adapter.model import GPT, llama3_scaled_frequencies
from lit_adapter.tokenizer import TOKENIZER_FILE, Tokenizer

CHAT = [{"role": "user", "content": "Give three tips for staying healthy."}]
NEW_TOKENS = 40
LLAMA3_TEXTS = [
    "This is a test sentence.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\n",
    "Emoji 😀👍🏽 and flags 🇫🇷, then 日本語のテキスト、中文字符。한국어 문장.",
    "   runs   of\t\twhitespace \r\n\r\n  and trailing spaces    ",
    "I'm sure they'LL say 12345678 is 3.14159 times bigger; isn't it?",
    "<|begin_of_text|>special <|eot_id|> tokens<|start_header_id|>",
]


# ---- Llama 3 tokenizer: the tiktoken file converted by us against the released tokenizer.json


LLAMA3_8B_PARAMS = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
"""Meta's params.json of Llama 3 8B (3.1 adds "use_scaled_rope": true)."""


@pytest.fixture(scope="session")
def llama3_dirs(llama3_converted) -> dict[str, Path]:
    """The released (Llama 3.0) tokenizer.json, and the tiktoken tokenizer.model of a Meta download as conversion
    writes it."""
    return {"released": shared_file("llama3_tokenizer/tokenizer.json"), "converted": llama3_converted}


def test_llama3_encodings_equal_hf_tokenizers(llama3_dirs):
    from tokenizers import Tokenizer as HFTokenizer

    reference = HFTokenizer.from_file(str(llama3_dirs["released"]))
    released, converted = Tokenizer(llama3_dirs["released"]), Tokenizer(llama3_dirs["converted"])
    assert sorted(os.listdir(llama3_dirs["converted"])) == ["tokenizer.json", "tokenizer_config.json"]
    for text in LLAMA3_TEXTS:
        expected = reference.encode(text, add_special_tokens=False).ids  # a rendering: special spellings are tokens
        assert released.encode_rendered(text, bos=False).tolist() == expected, text
        assert converted.encode_rendered(text, bos=False).tolist() == expected, text
        assert converted.decode(expected) == reference.decode(expected, skip_special_tokens=True)
    assert converted.encode("This is a test sentence.", eos=True).tolist() == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert (converted.vocab_size, converted.bos_id, converted.eos_id, converted.add_bos) == (128256, 128000, 128001, True)
    assert converted.stop_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|> (3.0 has no <|eom_id|>)


def test_llama3_special_tokens_are_named_as_in_their_release(llama3_dirs, tmp_path):
    """Meta's tiktoken file is the same in Llama 3.0 and 3.1, whose special tokens differ: 3.0's (its download's
    params.json has no use_scaled_rope) are the released 3.0 tokenizer.json's, id for id; 3.1 names three of the
    reserved ones, so the numbers of the reserved tokens after them shift."""
    def added_tokens(path: Path) -> list[tuple[int, str]]:
        return [(token["id"], token["content"]) for token in json.loads(path.read_text())["added_tokens"]]

    assert added_tokens(llama3_dirs["converted"] / "tokenizer.json") == added_tokens(llama3_dirs["released"])
    download = tmp_path / "Llama3.1-8B"
    download.mkdir()
    (download / "params.json").write_text(json.dumps({**LLAMA3_8B_PARAMS, "use_scaled_rope": True}))
    assert llama3_release(download / "tokenizer.model") == "3.1"
    (download / "tokenizer.model").symlink_to(shared_file("llama3_tokenizer/tokenizer.model"))
    (download / "params.json").unlink()  # the option alone tells
    files = find_tokenizer("meta", download, llama3_release="3.1")
    llama31 = Tokenizer(download, files)
    names = ("<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|eom_id|>", "<|python_tag|>",
             "<|reserved_special_token_247|>")
    assert [llama31.backend.token_to_id(name) for name in names] == [128004, 128005, 128008, 128010, 128255]
    assert llama31.stop_ids == {128001, 128008, 128009}


def test_a_tokenizer_json_alone_adds_the_bos_of_its_post_processor(llama3_dirs, tmp_path):
    """Without a tokenizer_config.json, the BOS is the token that tokenizer.json's post-processor puts first (as the
    template of Hugging Face's Llama 3.1 files does); the released 3.0 file's post-processor puts none."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    reference = HFTokenizer.from_file(str(llama3_dirs["released"]))
    reference.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    reference.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    assert (tokenizer.bos_token, tokenizer.bos_id, tokenizer.add_bos) == ("<|begin_of_text|>", 128000, True)
    for text in LLAMA3_TEXTS[:-1]:  # the last one starts with the BOS already, which we do not add twice
        assert tokenizer.encode(text).tolist() == reference.encode(text).ids, text
    released = Tokenizer(llama3_dirs["released"])
    assert (released.bos_id, released.add_bos, released.encode("Hi").tolist()) == (None, False, [13347])


def test_llama3_chat_format_is_exact(llama3_dirs):
    tokenizer = Tokenizer(llama3_dirs["converted"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    be_brief, hi_there = (tokenizer.encode(t, bos=False).tolist() for t in ("Be brief.", "Hi there"))
    # BOS is in the text already and is not added twice; 9125 system, 882 user, 78191 assistant, 271 "\n\n"
    assert tokenizer.encode_rendered(text).tolist() == [128000, 128006, 9125, 128007, 271, *be_brief, 128009,
                                               128006, 882, 128007, 271, *hi_there, 128009,
                                               128006, 78191, 128007, 271]
    plain = Tokenizer(llama3_dirs["released"])  # a tokenizer.json without tokenizer_config.json
    with pytest.raises(UserError, match="has no chat template: pass the prompt as plain text$"):
        plain.apply_chat_template(messages, add_generation_prompt=True)


def test_chat_template_raise_exception_is_a_user_error(llama3_dirs, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama3_dirs["converted"] / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="^chat template: first must be user$"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "system", "content": "x"}], add_generation_prompt=True)


# ---- Llama 3.1: RoPE scaling "llama3"


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}


@pytest.mark.parametrize("keys", ["as saved", "rope_scaling beside rope_parameters"])
def test_tiny_llama31_logits_match_transformers(tmp_path, keys):
    """A Llama 3.1 of transformers' own config.json; and of one whose rope_scaling contradicts its rope_parameters,
    which transformers reads as we do: rope_scaling replaces them whole, with the top-level rope_theta."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                            rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING),
                            tie_word_embeddings=True, attn_implementation="eager")
    hf = LlamaForCausalLM(hf_config).float().eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path / "hf")
    if keys != "as saved":
        config_path = tmp_path / "hf" / "config.json"
        contradicting = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                         "rope_scaling": dict(LLAMA31_SCALING), "rope_theta": 500000.0}
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **contradicting}))
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
        assert (hf.config.rope_parameters["rope_type"], hf.config.rope_parameters["rope_theta"]) == ("llama3", 5e5)
    state_dict, config = convert_hf(tmp_path / "hf")
    assert (config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
            config.rope_original_max_positions, config.rope_base) == (8.0, 1.0, 4.0, 16, 500000.0)
    save_checkpoint_dir(state_dict, config, None, tmp_path / "ours")
    model = load_model(tmp_path / "ours").eval()
    unscaled = GPT(replace(config, rope_scaling_factor=None))
    assert not torch.allclose(unscaled.build_rope()[:60], model.rope_cache[:60])  # the scaling is in play

    idx = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = hf(idx).logits, model(idx)
    assert expected.abs().max() > 1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_llama3_presets_are_found_from_their_shape():
    assert meta_config(LLAMA3_8B_PARAMS, None, "params.json").name == "llama-3-8b"
    llama31 = meta_config({**LLAMA3_8B_PARAMS, "use_scaled_rope": True}, None, "params.json")
    assert (llama31.name, llama31.rope_scaling_factor, llama31.block_size) == ("llama-3.1-8b", 8.0, 131072)
    hf = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
          "intermediate_size": 8192, "vocab_size": 128256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "max_position_embeddings": 131072, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    assert hf_config(hf, "config.json").name == "llama-3.2-1b"
    assert hf_config({**hf, "rope_scaling": None}, "config.json").name == "custom"


# ---- GGUF: tiny files written with the gguf package


TINY_GGUF = Config("tiny-gguf", block_size=64, vocab_size=258, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                   intermediate_size=96, norm_eps=1e-5, rope_base=500000.0)


def write_tiny_gguf(path: Path, config: Config, tensor_type: str, rope_factors: torch.Tensor | None = None,
                    sentencepiece: Path | None = None, given: dict | None = None, written: dict | None = None,
                    add_metadata: Callable[[Any], None] | None = None) -> dict:
    """A random model of ``config`` as a llama GGUF (matrices in ``tensor_type``, norms F32); its state dict.

    The vocabulary is a tiny byte-level BPE one, or the pieces of the SentencePiece model ``sentencepiece``.
    ``given`` replaces tensors (by GGUF name) with other arrays; ``written`` receives what each tensor holds
    (dequantised); ``add_metadata`` is called with the writer to add keys. The gguf package cannot quantise to
    K-quants: their matrices get random blocks.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    model = GPT(config)
    randomize_(model)
    untied = model.state_dict() if not config.tie_embeddings else {**model.state_dict(), "lm_head.weight": None}
    meta = {k: v for k, v in lit_to_meta(untied, config).items() if v is not None}
    gguf_names = {**{v: k for k, v in GGUF_NAMES.items()},
                  **{f"layers.{i}.{v}.weight": f"blk.{i}.{k}.weight" for k, v in GGUF_LAYER_NAMES.items()
                     for i in range(config.n_layer)}}
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    if sentencepiece is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list([*bytes_to_unicode().values(), "ab", "<|end|>"])
        writer.add_token_types([1] * 257 + [3])
        writer.add_token_merges(["a b"])
        writer.add_eos_token_id(257)
    else:
        write_sentencepiece_vocabulary(writer, sentencepiece)
    if add_metadata is not None:
        add_metadata(writer)
    kind = GGMLQuantizationType[tensor_type]
    for name, weight in meta.items():
        array = weight.detach().numpy() if given is None else given[gguf_names[name]]
        if array.ndim == 1 or kind == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_names[name], array)
        else:
            blocks = random_k_quant_blocks(array.shape, kind) if tensor_type.endswith("_K") else quantize(array, kind)
            writer.add_tensor(gguf_names[name], blocks, raw_dtype=kind)
            array = dequantize(blocks, kind)
        if written is not None:
            written[gguf_names[name]] = array
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model.state_dict()


def random_k_quant_blocks(shape: tuple[int, int], kind) -> "np.ndarray":
    """Random K-quant blocks for a (rows, columns) matrix; bytes below 0x60 keep every float16 scale finite."""
    from gguf.constants import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[kind]
    rows, columns = shape
    return np.random.default_rng(0).integers(0, 0x60, (rows, columns // block_size * type_size), dtype=np.uint8)


def write_sentencepiece_vocabulary(writer, path: Path) -> None:
    """The pieces, scores and types of a SentencePiece model as llama.cpp's 'llama' vocabulary metadata."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    ids = range(sp.vocab_size())
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.IdToPiece(i) for i in ids])
    writer.add_token_scores([sp.GetScore(i) for i in ids])
    kinds = [(sp.IsUnknown(i), sp.IsControl(i), sp.IsByte(i)) for i in ids]
    writer.add_token_types([2 if unknown else 3 if control else 6 if byte else 1 for unknown, control, byte in kinds])
    writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")


def test_gguf_sentencepiece_vocabulary_becomes_tokenizer_model(tmp_path, llama_tokenizer):
    from sentencepiece import SentencePieceProcessor

    write_tiny_gguf(tmp_path / "spm.gguf", replace(TINY_GGUF, vocab_size=32000), "F32", sentencepiece=llama_tokenizer)
    state_dict, config, files = convert("gguf", tmp_path / "spm.gguf")
    save_checkpoint_dir(state_dict, config, files, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["model.safetensors", "model_config.yaml", "tokenizer.model",
                                                     "tokenizer_config.json"]
    tokenizer, original = Tokenizer(tmp_path / "ours"), SentencePieceProcessor(model_file=str(llama_tokenizer))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (32000, 1, 2, True)
    assert tokenizer.encode("Hello world! Once upon a time, there was a little llama.").tolist() == [
        1, 15043, 3186, 29991, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 11148, 3304, 29889]
    for text in LLAMA3_TEXTS:
        assert tokenizer.encode(text, bos=False).tolist() == original.EncodeAsIds(text), text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == "[INST] Hi [/INST]"


def test_a_sentencepiece_vocabulary_without_bos_or_eos_pieces(tmp_path):
    """No <s>: no BOS is added; no </s>, which generation stops at: one line."""
    pieces, scores = ["<unk>", "</s>", "a", "b", "ab"], [0.0, 0.0, -1.0, -2.0, -0.5]
    without_bos = {TOKENIZER_FILE: sentencepiece_model(pieces, scores, [2, 3, 1, 1, 1], {"unk_id": 0}, False)}
    tokenizer = Tokenizer(tmp_path / "x.gguf", without_bos)
    assert (tokenizer.bos_id, tokenizer.bos_token, tokenizer.eos_id, tokenizer.add_bos) == (None, None, 1, True)
    assert tokenizer.encode("ab", eos=True).tolist() == [4, 1]
    without_eos = {TOKENIZER_FILE: sentencepiece_model(pieces[::2], scores[::2], [2, 1, 1], {"unk_id": 0}, False)}
    with pytest.raises(UserError, match=r"x\.gguf \(tokenizer\.model\) has no end-of-text piece \(</s>\), which "
                                        r"generation stops at: use the model's own tokenizer$"):
        Tokenizer(tmp_path / "x.gguf", without_eos)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_f32_weights_convert_exactly(tmp_path, tied):
    config = replace(TINY_GGUF, tie_embeddings=tied)
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", config, "F32")
    state_dict, converted, files = convert("gguf", tmp_path / "tiny.gguf")
    assert converted.base_shape() == config.base_shape()
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key
    tokenizer = Tokenizer(tmp_path / "tiny.gguf", files)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos) == (258, 257, None, False)
    # the alphabet lists the printable bytes from "!" (33) first, so "c" (99) is token 66
    assert tokenizer.encode_rendered("abc<|end|>").tolist() == [256, 66, 257]


def test_gguf_bos_token_id_minus_one_means_no_bos(tmp_path):
    """llama.cpp's -1 is "no such token", not the last token of the vocabulary."""
    def no_bos(writer) -> None:
        writer.add_int32("tokenizer.ggml.bos_token_id", -1)
        writer.add_add_bos_token(True)

    write_tiny_gguf(tmp_path / "tiny.gguf", TINY_GGUF, "F32", add_metadata=no_bos)
    _, _, files = convert("gguf", tmp_path / "tiny.gguf")
    assert json.loads(files["tokenizer_config.json"])["bos_token"] is None
    tokenizer = Tokenizer(tmp_path / "tiny.gguf", files)
    assert (tokenizer.bos_id, tokenizer.bos_token, tokenizer.encode("ab").tolist()) == (None, None, [256])


@pytest.mark.parametrize("tensor_type, tolerance", [("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.2)])
def test_gguf_quantised_weights_and_llama31_rope_factors(tmp_path, tensor_type, tolerance):
    scaled = replace(TINY_GGUF, rope_scaling_factor=8.0)
    inv_freq = 1.0 / TINY_GGUF.rope_base ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    factors = inv_freq / llama3_scaled_frequencies(inv_freq, scaled)
    assert factors.min() == 1 and factors.max() == 8 and ((factors > 1) & (factors < 8)).any()
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", TINY_GGUF, tensor_type, rope_factors=factors)
    state_dict, converted, _ = convert("gguf", tmp_path / "tiny.gguf")
    assert (converted.rope_scaling_factor, converted.rope_low_freq_factor, converted.rope_high_freq_factor,
            converted.rope_original_max_positions) == (8.0, 1.0, 4.0, 8192)
    for key, value in expected.items():
        if value.dim() == 1:  # norms stay F32
            assert torch.equal(state_dict[key], value), key
        else:
            assert 0 < (state_dict[key] - value).abs().max() <= tolerance * value.abs().max(), key

    write_tiny_gguf(tmp_path / "odd.gguf", TINY_GGUF, "F32", rope_factors=factors.flip(0))
    with pytest.raises(UserError, match=r"odd\.gguf: its per-frequency RoPE factors \(rope_freqs\.weight\) are not "
                                        r"Llama 3\.1's scaling, the only one supported; convert the model's"):
        convert("gguf", tmp_path / "odd.gguf")


@pytest.mark.parametrize("tensor_type", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quants_convert_to_their_dequantised_values(tmp_path, tensor_type):
    """K-quant matrices (rows of 256-value super-blocks) convert to the values their blocks hold: the same model
    as an F32 file of those values converts exactly (test above)."""
    config = replace(TINY_GGUF, n_embd=256, intermediate_size=512)
    held = {}
    write_tiny_gguf(tmp_path / "k.gguf", config, tensor_type, written=held)
    write_tiny_gguf(tmp_path / "f32.gguf", config, "F32", given=held)
    from gguf import GGUFReader

    kinds = {tensor.tensor_type.name for tensor in GGUFReader(tmp_path / "k.gguf").tensors}
    assert kinds == {tensor_type, "F32"}, kinds
    quantised, _, _ = convert("gguf", tmp_path / "k.gguf")
    reference, _, _ = convert("gguf", tmp_path / "f32.gguf")
    assert quantised.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(quantised[key], value), key
    assert any(v.dim() == 2 and v.abs().sum() > 0 for v in quantised.values())


# ---- SmolLM2-135M-Instruct GGUF: ours against transformers


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint) -> dict:
    """The GGUF converted by scripts/convert_checkpoint.py, transformers' model of the same file, its greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = shared_file(SMOLLM2_GGUF)
    ours = smollm2_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = Tokenizer(ours)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = tokenizer.encode_rendered(prompt)
    with torch.no_grad():
        greedy = hf.generate(ids[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.numel():].tolist()
    return {"ours": ours, "hf": hf, "hf_tokenizer": hf_tokenizer, "tokenizer": tokenizer, "prompt": prompt,
            "ids": ids, "greedy": greedy}


def run_script(script: str, *args: str, capfd) -> subprocess.CompletedProcess:
    """The script's command line, run in this process; it must succeed."""
    result = run_script_in_this_process(script, *args, capfd=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def greedy_text(checkpoint_dir: Path, capfd) -> str:
    """What generate/base.py prints for the ``CHAT`` message in the model's chat template, greedy, NEW_TOKENS at most."""
    result = run_script("generate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--prompt", CHAT[0]["content"],
                        "--prompt_style", "chat", "--temperature", "0", "--max_new_tokens", str(NEW_TOKENS),
                        capfd=capfd)
    return result.stdout.removesuffix("\n")


def expected_text(smollm2: dict) -> str:
    """transformers' greedy tokens, up to the first stop token, as text."""
    tokens = smollm2["greedy"]
    stops = [i for i, token in enumerate(tokens) if token in smollm2["tokenizer"].stop_ids]
    return smollm2["tokenizer"].decode(tokens[:stops[0]] if stops else tokens)


def test_smollm2_gguf_tokenizer_and_chat_template(smollm2):
    tokenizer, prompt = smollm2["tokenizer"], smollm2["prompt"]
    assert sorted(os.listdir(smollm2["ours"])) == ["model.safetensors", "model_config.yaml", "tokenizer.json",
                                                   "tokenizer_config.json"]
    assert read_config(smollm2["ours"]).name == "smollm2-135m"
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (49152, 1, 2, False)
    assert tokenizer.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nGive three tips for staying healthy.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert smollm2["hf_tokenizer"].apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == prompt
    for text in [prompt, *LLAMA3_TEXTS]:
        assert tokenizer.encode_rendered(text).tolist() == smollm2["hf_tokenizer"](text)["input_ids"], text


def test_smollm2_gguf_logits_match_transformers(smollm2):
    model = load_model(smollm2["ours"]).eval()
    ids = smollm2["ids"][None]
    with torch.no_grad():
        expected, actual = smollm2["hf"](ids).logits, model(ids)
    assert expected.abs().max() > 10
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)


def test_smollm2_gguf_greedy_generation_matches_transformers(smollm2, capfd):
    text = expected_text(smollm2)
    assert text.startswith("1. Stay hydrated: Drink plenty of water, and avoid sugary drinks.")
    assert greedy_text(smollm2["ours"], capfd) == text


def test_smollm2_hf_folder_converts_to_the_same_model(smollm2, tmp_path, capfd):
    from transformers import LlamaForCausalLM

    folder = tmp_path / "hf"
    # transformers will not save a model it loaded from GGUF; a plain copy of its (dequantised) weights it will
    plain = LlamaForCausalLM(smollm2["hf"].config)
    plain.load_state_dict(smollm2["hf"].state_dict())
    plain.save_pretrained(folder)
    smollm2["hf_tokenizer"].save_pretrained(folder)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    out = tmp_path / "ours"
    run_script("scripts/convert_checkpoint.py", "--format", "hf", "--checkpoint_path", str(folder),
               "--output_dir", str(out), capfd=capfd)
    tokenizer = Tokenizer(out)
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == smollm2["prompt"]
    assert tokenizer.encode_rendered(smollm2["prompt"]).tolist() == smollm2["ids"].tolist()
    assert greedy_text(out, capfd) == expected_text(smollm2)

