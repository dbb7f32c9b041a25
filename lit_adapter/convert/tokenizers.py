"""Tokenizers built at conversion: ``byte_level_bpe`` (the one place that makes a byte-level BPE ``tokenizer.json``
from a vocabulary and its merges: Meta's Llama 3 tiktoken file, GGUF byte-level vocabularies) and
``sentencepiece_model`` (GGUF SentencePiece vocabularies). What reads them at run time is ``lit_adapter.tokenizer``."""

import base64
import json
from pathlib import Path
from typing import Optional

from lit_adapter.convert.common import read_json
from lit_adapter.errors import UserError, message_line
from lit_adapter.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, TokenizerFiles

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The split regex of Meta's Llama 3 tokenizer."""
PRE_TOKENIZERS = ("llama-bpe", "smollm", "gpt-2")
"""How text is split before BPE: the Llama 3 regex; single digits then GPT-2's regex; GPT-2's regex."""


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre_tokenizer: str,
                   special_tokens: dict[str, int], ignore_merges: bool) -> str:
    """A ``tokenizer.json`` (its text) for a byte-level BPE vocabulary, its merges and its pre-tokenizer.

    ``ignore_merges``: a split piece found whole in the vocabulary is one token (tiktoken's rule).
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre_tokenizer not in PRE_TOKENIZERS:
        raise UserError(f"pre-tokenizer {pre_tokenizer!r} is not supported (only {', '.join(PRE_TOKENIZERS)})")
    try:
        model = models.BPE(vocab, merges, ignore_merges=ignore_merges)
    except Exception as err:  # tokenizers raises plain Exceptions, e.g. for a merge of tokens not in the vocabulary
        raise UserError(f"the BPE merges do not fit the vocabulary ({message_line(err)})") from None
    tokenizer = HFTokenizer(model)
    if pre_tokenizer == "llama-bpe":
        split = [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre_tokenizer == "smollm":
            split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, _ in sorted(special_tokens.items(), key=lambda item: item[1])])
    return tokenizer.to_str()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def sentencepiece_model(pieces: list[str], scores: list[float], types: list[int], special_ids: dict[str, int],
                        add_dummy_prefix: bool) -> bytes:
    """A SentencePiece BPE model (its serialised bytes) from pieces, their scores and their types (SentencePiece's
    numbering, which GGUF 'llama' vocabularies use too); ``special_ids``: unk_id, bos_id, eos_id, pad_id."""
    from sentencepiece import sentencepiece_model_pb2 as proto

    model = proto.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
        try:
            model.pieces.add(piece=piece, score=score, type=kind)
        except (TypeError, ValueError) as err:
            raise UserError(f"token {i} ({piece!r}, score {score!r}, type {kind!r}) is not a SentencePiece piece: "
                            f"{err}") from None
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size = proto.TrainerSpec.BPE, len(pieces)
    spec.byte_fallback = proto.ModelProto.SentencePiece.BYTE in types
    for key in ("unk_id", "bos_id", "eos_id", "pad_id"):
        setattr(spec, key, special_ids.get(key, -1))
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", add_dummy_prefix
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    return model.SerializeToString()


# ---- Meta's Llama 3 tiktoken tokenizer.model

LLAMA3_SPECIAL_TOKENS = 256
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama 3 Instruct's dialog format: a header per message, each turn closed by <|eot_id|>."""


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """The token bytes -> rank table of a tiktoken file."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}: line {number} is not a base64 token and its rank") from None
    return ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges behind a tiktoken rank table, in rank order.

    Each multi-byte token is the merge of the two parts that BPE, using only lower ranks, reduces it to. A token
    that BPE never reduces to two parts (tiktoken makes it only from adjacent tokens that concatenate to it) gets a
    merge for every split into two tokens.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                parts = [(token[:i], token[i:]) for i in range(1, len(token))
                         if token[:i] in ranks and token[i:] in ranks]
                merges.extend(sorted(parts, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])))
            else:
                merges.append((parts[0], parts[1]))
    return merges


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """``token`` split into bytes and merged, lowest rank first, with ranks below ``max_rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        candidates = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(candidates)
        if rank >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


LLAMA3_RELEASES = ("3.0", "3.1")
"""The releases whose special tokens Meta's tiktoken file can get: Llama 3.0's, or 3.1's (also 3.2's and 3.3's)."""
LLAMA31_TOKENS = {4: "<|finetune_right_pad_id|>", 8: "<|eom_id|>", 10: "<|python_tag|>"}
"""The special tokens that Llama 3.1 named among 3.0's reserved ones (3.0 never produces them)."""


def llama3_special_tokens(n_ranks: int, release: str) -> dict[str, int]:
    """The 256 special tokens after Meta's Llama 3 vocabulary, named as in the ``release`` ("3.0" or "3.1"): 3.1
    named three of 3.0's reserved tokens, so the numbers of the reserved ones after them differ."""
    names = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>", **(LLAMA31_TOKENS if release == "3.1" else {})}
    reserved = (i for i in range(LLAMA3_SPECIAL_TOKENS) if i not in names)
    names.update({i: f"<|reserved_special_token_{n}|>" for n, i in enumerate(reserved)})
    return {name: n_ranks + i for i, name in names.items()}


def llama3_release(path: Path) -> str:
    """The Llama 3 release of Meta's tiktoken file ``path``, told by the ``params.json`` of the download beside it:
    3.1 and later scale their RoPE (``use_scaled_rope``), 3.0 does not."""
    params = path.parent / "params.json"
    if not params.is_file():
        raise UserError(f"{path} is Meta's Llama 3 tokenizer, whose special tokens differ between Llama 3.0 and 3.1 "
                        f"(and later), and no params.json beside it tells which: put the model's params.json there "
                        f"or pass --llama3_release {' or '.join(LLAMA3_RELEASES)}")
    return "3.1" if read_json(params).get("use_scaled_rope") else "3.0"


def llama3_tokenizer_files(path: Path, release: Optional[str] = None) -> TokenizerFiles:
    """``tokenizer.json`` and ``tokenizer_config.json`` (Llama 3 chat format) for Meta's tiktoken file, with the
    special tokens of the ``release`` (by default the one its download's params.json tells)."""
    if release is not None and release not in LLAMA3_RELEASES:
        raise UserError(f"unknown Llama 3 release {release!r}: choose one of {', '.join(LLAMA3_RELEASES)}")
    release = release or llama3_release(Path(path))
    ranks = read_tiktoken(path)
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in tiktoken_merges(ranks)]
    special = llama3_special_tokens(len(ranks), release)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
              "chat_template": LLAMA3_CHAT_TEMPLATE}
    return {TOKENIZER_JSON: byte_level_bpe(vocab, merges, "llama-bpe", special, ignore_merges=True),
            TOKENIZER_CONFIG: json.dumps(config, indent=2)}
