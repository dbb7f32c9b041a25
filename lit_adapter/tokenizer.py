"""Tokenizers: SentencePiece (``tokenizer.model``) or Hugging Face ``tokenizers`` (``tokenizer.json``), one interface.

A checkpoint directory holds some of ``TOKENIZER_FILES``; ``tokenizer.json`` is preferred when both kinds are there,
and ``tokenizer_config.json`` adds BOS/EOS, the BOS rule and the chat template (without it, the BOS is the one that
``tokenizer.json``'s post-processor adds, if any). At conversion time, Meta's Llama 3 tiktoken ``tokenizer.model``
and GGUF byte-level vocabularies become a ``tokenizer.json`` built by ``byte_level_bpe`` (the one place that makes a
byte-level BPE tokenizer from a vocabulary and merges); GGUF SentencePiece vocabularies become a ``tokenizer.model``
built by ``sentencepiece_model``.

Text is text: the spelling of a special token (``<|im_end|>``, ``</s>``) in a message, a prompt or training data
encodes as the characters it is made of, never as that token. Only the markers a prompt style writes itself are
special tokens. Prompt styles therefore render conversations with each message ``escape``-d (every special-token
spelling replaced by a placeholder of the same length) and encode the result with ``encode_rendered``.
"""

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from sentencepiece import SentencePieceProcessor
from sentencepiece.sentencepiece_pb2 import SentencePieceText

from lit_adapter.chat_template import ChatTemplate
from lit_adapter.errors import UserError, message_line
from lit_adapter.files import BAD_JSON, json_problem, read_text

TOKENIZER_FILE = "tokenizer.model"
"""SentencePiece model (or Meta's tiktoken file, which conversion turns into ``TOKENIZER_JSON``)."""
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, TOKENIZER_FILE)
"""The tokenizer files a checkpoint directory may hold."""
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")
"""Tokens that end a chat turn or a text; generation stops on any of them that the vocabulary holds."""

PLACEHOLDER = 0x100000
"""``escape`` writes the n-th special-token spelling as ``chr(PLACEHOLDER + n)`` (a private-use character)..."""
PLACEHOLDER_FILL = "\U000F0000"
"""... followed by this private-use character until the placeholder is as long as the spelling."""
PLACEHOLDER_RUN = re.compile("([\U00100000-\U0010FFFD])(\U000F0000*)")

TokenizerFiles = dict[str, "Path | str | bytes"]
"""A file name in a checkpoint directory -> the file to copy there, or the text or bytes to write (converted ones)."""


class Tokenizer:
    """Text to token ids and back, with the BOS/EOS, stop tokens and chat template of the model's tokenizer."""

    def __init__(self, path: Path, files: Optional[TokenizerFiles] = None) -> None:
        """``path``: a checkpoint directory or a tokenizer file; ``files``: its tokenizer files if already known.

        ``self.path`` is the main tokenizer file (tokenizer.json or tokenizer.model), or ``path`` when it was generated.
        """
        files = tokenizer_files(Path(path)) if files is None else files
        main = files.get(TOKENIZER_JSON, files.get(TOKENIZER_FILE))
        self.path = main if isinstance(main, Path) else Path(path)
        config = _tokenizer_config(files, Path(path))
        if TOKENIZER_JSON in files:
            self.backend: Any = _HFBackend(Path(path), files, config)
        else:
            self.backend = _SentencePieceBackend(_name_of(files, TOKENIZER_FILE, Path(path)), files[TOKENIZER_FILE],
                                                 config)
        b = self.backend
        self.vocab_size: int = b.vocab_size
        self.bos_id: Optional[int] = b.bos_id
        self.eos_id: int = b.eos_id
        self.bos_token: Optional[str] = b.bos_token
        self.eos_token: str = b.eos_token
        self.add_bos: bool = b.add_bos
        self.chat_template, self._template_source = _chat_template(files, config, Path(path))
        self._compiled_template: Optional[ChatTemplate] = None
        self.stop_ids = frozenset({self.eos_id} | {i for i in map(b.token_to_id, END_OF_TURN_TOKENS) if i is not None})
        self.special_tokens: dict[str, int] = b.special_tokens()
        """The special tokens by spelling: what a prompt style's markers may write, and what text never encodes as."""
        spellings = sorted(self.special_tokens, key=len, reverse=True)
        self._spellings = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._placeholders = {s: chr(PLACEHOLDER + n) + PLACEHOLDER_FILL * (len(s) - 1)
                              for n, s in enumerate(spellings)}
        self._spelling_of = {chr(PLACEHOLDER + n): s for n, s in enumerate(spellings)}

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> torch.Tensor:
        """Token ids of ``text`` (int64), special-token spellings in it included as text; BOS leads where ``bos``
        (default: ``add_bos``), EOS ends where ``eos``."""
        return self.encode_rendered(self.escape(text), bos, eos)

    def encode_rendered(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> torch.Tensor:
        """Token ids of a prompt style's rendering of ``escape``-d messages: the special-token spellings in it (the
        style's markers) are those tokens; the rest is text. BOS and EOS as in ``encode``."""
        ids = [token for token, _, _ in self.token_spans(text)]
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def token_spans(self, text: str) -> list[tuple[int, int, int]]:
        """The tokens of rendered ``text`` (see ``encode_rendered``), each with the span of characters it encodes."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. undecodable bytes of a command line, kept as surrogates
            raise UserError(f"the text is not valid UTF-8 (at character {err.start}): pass UTF-8 text") from None
        spans, start = [], 0
        for marker in self._spellings.finditer(text) if self._spellings else ():
            spans += self._text_spans(text, start, marker.start())
            spans.append((self.special_tokens[marker.group()], marker.start(), marker.end()))
            start = marker.end()
        return spans + self._text_spans(text, start, len(text))

    def _text_spans(self, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
        """The tokens of ``text[start:end]``, which holds no marker, with spans in ``text``."""
        if start == end:
            return []
        return [(token, start + a, start + b) for token, a, b in self.backend.spans(self.unescape(text[start:end]))]

    def first_special(self, text: str) -> Optional[re.Match]:
        """The first special-token spelling in ``text`` (None: none)."""
        return self._spellings.search(text) if self._spellings else None

    def escape(self, text: str) -> str:
        """``text`` with each special-token spelling replaced by a placeholder of the same length, which renderings
        keep as text: see ``encode_rendered``. Text that already holds a placeholder is refused."""
        if any(self._spelled(run) for run in PLACEHOLDER_RUN.finditer(text)):
            raise UserError("the text holds private-use characters (U+100000 and on, then U+F0000) that lit_adapter "
                            "uses for special-token spellings: remove them")
        return self._spellings.sub(lambda m: self._placeholders[m.group()], text) if self._spellings else text

    def unescape(self, text: str) -> str:
        """``text`` with the placeholders of ``escape`` turned back into the spellings they stand for."""
        def spelling(run: re.Match) -> str:
            spelled = self._spelled(run)
            return spelled + run.group()[len(spelled):] if spelled else run.group()

        return PLACEHOLDER_RUN.sub(spelling, text)

    def _spelled(self, run: re.Match) -> str:
        """The spelling that a run of ``PLACEHOLDER_RUN`` begins with ("": none)."""
        spelled = self._spelling_of.get(run.group(1), "")
        return spelled if len(spelled) <= len(run.group()) else ""

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model's template writes it (Jinja2, sandboxed and bounded, with transformers' variables)."""
        if self.chat_template is None:
            raise UserError(f"the tokenizer in {self.path} has no chat template: pass the prompt as plain text")
        if self._compiled_template is None:  # compiled at first use: a broken template only fails what uses it
            self._compiled_template = ChatTemplate(self.chat_template, self._template_source)
        return self._compiled_template.render(messages, add_generation_prompt, self.bos_token or "", self.eos_token)


# ---- the tokenizer files of a checkpoint


def tokenizer_files(path: Path, tiktoken_files: Optional[Callable[[Path], TokenizerFiles]] = None) -> TokenizerFiles:
    """The tokenizer files of a checkpoint directory or beside a tokenizer file; Meta's tiktoken file only where
    ``tiktoken_files`` (conversion) turns it into tokenizer files."""
    path = Path(path)
    if path.is_dir():
        present = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
        if TOKENIZER_JSON not in present and TOKENIZER_FILE not in present:
            raise UserError(f"tokenizer not found: no {TOKENIZER_JSON} or {TOKENIZER_FILE} in {path} (a checkpoint "
                            "directory from scripts/convert_checkpoint.py holds one)")
        model = TOKENIZER_JSON if TOKENIZER_JSON in present else TOKENIZER_FILE
        return tokenizer_files(present[model], tiktoken_files)
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    if is_tiktoken(path):
        if tiktoken_files is None:
            raise UserError(f"{path} is Meta's tiktoken tokenizer: convert the checkpoint with "
                            "scripts/convert_checkpoint.py, which writes it as tokenizer.json")
        return tiktoken_files(path)
    siblings = {name: path.parent / name for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE)
                if (path.parent / name).is_file() and path.name != name}
    return {TOKENIZER_JSON if path.suffix == ".json" else TOKENIZER_FILE: path, **siblings}


def _name_of(files: TokenizerFiles, name: str, path: Path) -> str:
    """How messages name tokenizer file ``name``: its path, or ``path`` (the source) for a generated one."""
    return str(files[name]) if isinstance(files[name], Path) else f"{path} ({name})"


def _read_text(source: "Path | str | bytes") -> str:
    """The text of a tokenizer file, or the generated text itself."""
    return read_text(source) if isinstance(source, Path) else source


def _tokenizer_config(files: TokenizerFiles, path: Path) -> dict:
    """The ``tokenizer_config.json`` of ``files`` ({} without one)."""
    if TOKENIZER_CONFIG not in files:
        return {}
    return _read_json(files[TOKENIZER_CONFIG], _name_of(files, TOKENIZER_CONFIG, path))


def _chat_template(files: TokenizerFiles, config: dict, path: Path) -> tuple[Any, str]:
    """The chat template (None: none; checked when compiled) and the file it is in: ``chat_template.jinja``, else
    the config's (the default one of named templates)."""
    if CHAT_TEMPLATE_FILE in files:
        return _read_text(files[CHAT_TEMPLATE_FILE]), _name_of(files, CHAT_TEMPLATE_FILE, path)
    template = config.get("chat_template")
    if isinstance(template, list) and all(isinstance(t, dict) for t in template):
        named = [t for t in template if t.get("name") == "default"]
        template = named[0].get("template") if named else None
    return template, _name_of(files, TOKENIZER_CONFIG, path) if template is not None else ""


def _read_json(source: "Path | str", what: str) -> dict:
    try:
        value = json.loads(_read_text(source))
    except BAD_JSON as err:
        raise UserError(f"{what} is not a Hugging Face tokenizer file (not valid JSON: {json_problem(err)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} is not a Hugging Face tokenizer file (no JSON object)")
    return value


# ---- backends


class _SentencePieceBackend:
    """A SentencePiece model (a file, or its bytes): BOS added unless its tokenizer_config.json says otherwise."""

    def __init__(self, what: str, source: "Path | bytes", config: dict) -> None:
        self.processor = SentencePieceProcessor()
        try:
            if isinstance(source, bytes):
                self.processor.LoadFromSerializedProto(source)
            else:
                self.processor.Load(str(source))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{what} is not a tokenizer: neither a SentencePiece model nor a Hugging Face "
                            f"tokenizer.json ({err})") from None
        self.vocab_size = self.processor.vocab_size()
        bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()  # -1: the model has none
        if self.eos_id < 0:
            raise UserError(f"{what} has no end-of-text piece (</s>), which generation stops at: use the model's own "
                            "tokenizer")
        self.bos_id = bos_id if bos_id >= 0 else None
        self.bos_token = self.processor.IdToPiece(bos_id) if bos_id >= 0 else None
        self.eos_token = self.processor.IdToPiece(self.eos_id)
        self.add_bos = bool(config.get("add_bos_token", True))

    def token_to_id(self, token: str) -> Optional[int]:
        piece = self.processor.PieceToId(token)
        return None if piece == self.processor.unk_id() and token != self.processor.IdToPiece(piece) else piece

    def special_tokens(self) -> dict[str, int]:
        return {self.processor.IdToPiece(i): i for i in range(self.vocab_size) if self.processor.IsControl(i)}

    def spans(self, text: str) -> list[tuple[int, int, int]]:
        """Tokens of ``text`` with their character spans (SentencePiece counts bytes)."""
        pieces = SentencePieceText.FromString(self.processor.encode(text, out_type="serialized_proto")).pieces
        if text.isascii():
            return [(piece.id, piece.begin, piece.end) for piece in pieces]
        char_at = [i for i, char in enumerate(text) for _ in char.encode("utf-8")] + [len(text)]
        return [(piece.id, char_at[piece.begin], char_at[piece.end]) for piece in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.processor.DecodeIds(ids)


class _HFBackend:
    """A Hugging Face ``tokenizer.json`` with the special tokens and BOS rule of its ``tokenizer_config.json``."""

    def __init__(self, path: Path, files: TokenizerFiles, config: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        what = _name_of(files, TOKENIZER_JSON, path)
        content = json.dumps(_read_json(files[TOKENIZER_JSON], what))
        try:
            self.tokenizer = HFTokenizer.from_str(content)
        except Exception as err:  # tokenizers raises plain Exceptions for content it cannot read
            raise UserError(f"{what} is not a Hugging Face tokenizer file ({message_line(err)})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        leading = self._post_processor_bos()
        self.bos_token = _token_content(config.get("bos_token")) or leading
        self.bos_id = self._id_of(self.bos_token, "bos_token", what) if self.bos_token else None
        self.eos_token = _token_content(config.get("eos_token")) or self._default_eos(what)
        self.eos_id = self._id_of(self.eos_token, "eos_token", what)
        add_bos = config.get("add_bos_token")
        self.add_bos = bool(add_bos) if add_bos is not None else leading is not None and leading == self.bos_token
        self.tokenizer.encode_special_tokens = True  # special-token spellings in text are text
        self.tokenizer.post_processor = None  # adds nothing without special tokens, and its offsets would skip spaces

    def _id_of(self, token: str, role: str, what: str) -> int:
        """The id of a special token that the config (or the post-processor) names."""
        token_id = self.token_to_id(token)
        if token_id is None:
            raise UserError(f"{what}: the {role} {token!r} is not in the vocabulary")
        return token_id

    def _default_eos(self, what: str) -> str:
        """The end-of-text token of a tokenizer.json without a config naming it."""
        for token in END_OF_TURN_TOKENS[::-1]:
            if self.token_to_id(token) is not None:
                return token
        raise UserError(f"{what}: no {TOKENIZER_CONFIG} names the eos_token; put the model's {TOKENIZER_CONFIG} "
                        "beside it")

    def _post_processor_bos(self) -> Optional[str]:
        """The token that the tokenizer.json's post-processor puts before a text, if it puts one (as Hugging Face's
        Llama tokenizers do with their BOS)."""
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        if len(with_special) > len(plain) and with_special[1:1 + len(plain)] == plain:
            return self.tokenizer.id_to_token(with_special[0])
        return None

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def special_tokens(self) -> dict[str, int]:
        return {token.content: i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

    def spans(self, text: str) -> list[tuple[int, int, int]]:
        """Tokens of ``text`` with their character spans."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [(token, start, end) for token, (start, end) in zip(encoding.ids, encoding.offsets)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _token_content(token: Any) -> Optional[str]:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n?")


def is_tiktoken(path: Path) -> bool:
    """Whether ``path`` starts like a tiktoken BPE file (a base64 token and its rank a line)."""
    with open(path, "rb") as f:
        return TIKTOKEN_LINE.fullmatch(f.readline()) is not None
