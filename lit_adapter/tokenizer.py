"""SentencePiece tokenizer with LLaMA's BOS/EOS conventions."""

from pathlib import Path
from typing import Iterable

import torch
from sentencepiece import SentencePieceProcessor

from lit_adapter.errors import UserError

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    def __init__(self, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path} (a checkpoint directory from scripts/convert_checkpoint.py "
                            f"holds {TOKENIZER_FILE})")
        self.path = path
        self.processor = SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path} is not a SentencePiece model: {err}") from None
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> torch.Tensor:
        """Token ids of ``text`` (int64), optionally led by BOS and closed by EOS."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. undecodable bytes of a command line, kept as surrogates
            raise UserError(f"the text is not valid UTF-8 (at character {err.start}): pass UTF-8 text") from None
        ids = self.processor.EncodeAsIds(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.DecodeIds(list(ids))
