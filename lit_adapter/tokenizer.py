"""Tokenizers: SentencePiece (``tokenizer.model``) or Hugging Face ``tokenizers`` (``tokenizer.json``), one interface.

A checkpoint directory holds some of ``TOKENIZER_FILES``; ``tokenizer.json`` is preferred when both kinds are there,
and ``tokenizer_config.json`` adds BOS/EOS, the BOS rule and the chat template (without it, the BOS is the one that
``tokenizer.json``'s post-processor adds, if any). At conversion time, Meta's Llama 3 tiktoken ``tokenizer.model``
and GGUF byte-level vocabularies become a ``tokenizer.json`` built by ``byte_level_bpe`` (the one place that makes a
byte-level BPE tokenizer from a vocabulary and merges); GGUF SentencePiece vocabularies become a ``tokenizer.model``
built by ``sentencepiece_model``.
"""

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import SentencePieceProcessor

from lit_adapter.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
"""SentencePiece model (or Meta's tiktoken file, which conversion turns into ``TOKENIZER_JSON``)."""
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, TOKENIZER_FILE)
"""The tokenizer files a checkpoint directory may hold."""
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>")
"""Tokens that end a chat turn or a text; generation stops on any of them that the vocabulary holds."""

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
        self.chat_template = _chat_template(files, config)
        self.stop_ids = frozenset({self.eos_id} | {i for i in map(b.token_to_id, END_OF_TURN_TOKENS) if i is not None})

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> torch.Tensor:
        """Token ids of ``text`` (int64); BOS leads where ``bos`` (default: ``add_bos``) unless the text starts with it."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. undecodable bytes of a command line, kept as surrogates
            raise UserError(f"the text is not valid UTF-8 (at character {err.start}): pass UTF-8 text") from None
        ids = self.backend.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model's template writes it (Jinja2, sandboxed, with transformers' variables)."""
        if not self.chat_template:
            raise UserError(f"the tokenizer in {self.path} has no chat template: pass the prompt as plain text")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.bos_token or "",
                                    self.eos_token)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str,
                         eos_token: str) -> str:
    """Render a Hugging Face chat template; ``raise_exception`` in it and template errors become a ``UserError``."""
    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
    except TemplateError as err:
        raise UserError(f"the chat template cannot be rendered: {err}") from None


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
    return Path(source).read_text() if isinstance(source, Path) else source


def _tokenizer_config(files: TokenizerFiles, path: Path) -> dict:
    """The ``tokenizer_config.json`` of ``files`` ({} without one)."""
    if TOKENIZER_CONFIG not in files:
        return {}
    return _read_json(files[TOKENIZER_CONFIG], _name_of(files, TOKENIZER_CONFIG, path))


def _chat_template(files: TokenizerFiles, config: dict) -> Optional[str]:
    """The chat template: ``chat_template.jinja``, else the config's (the default one of named templates)."""
    template = _read_text(files[CHAT_TEMPLATE_FILE]) if CHAT_TEMPLATE_FILE in files else config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_json(source: "Path | str", what: str) -> dict:
    try:
        value = json.loads(_read_text(source))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} is not a Hugging Face tokenizer file (not valid JSON: {err})") from None
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

    def encode(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)

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
            raise UserError(f"{what} is not a Hugging Face tokenizer file ({str(err).splitlines()[0]})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        leading = self._post_processor_bos()
        self.bos_token = _token_content(config.get("bos_token")) or leading
        self.bos_id = self._id_of(self.bos_token, "bos_token", what) if self.bos_token else None
        self.eos_token = _token_content(config.get("eos_token")) or self._default_eos(what)
        self.eos_id = self._id_of(self.eos_token, "eos_token", what)
        add_bos = config.get("add_bos_token")
        self.add_bos = bool(add_bos) if add_bos is not None else leading is not None and leading == self.bos_token

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

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

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
