"""The command line of data preparation (``scripts/prepare_alpaca.py`` runs ``main``): records in, a prepared set
out, with the model's tokenizer and context."""

import sys
from pathlib import Path
from typing import Optional

from lit_adapter.checkpoint import CONFIG_FILE, QUICK_START_CHECKPOINT, read_config
from lit_adapter.cli import check_seed
from lit_adapter.data.prepare import VAL_SIZE, default_val_size, prepare_dataset
from lit_adapter.data.records import download_alpaca, load_records
from lit_adapter.errors import UserError
from lit_adapter.files import check_can_create
from lit_adapter.prompts import StyleName, style_for_records
from lit_adapter.tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LENGTH = 512


def main(destination_dir: Path = Path("data/alpaca"), checkpoint_dir: Optional[Path] = QUICK_START_CHECKPOINT,
         tokenizer_path: Optional[Path] = None, data_file: Optional[Path] = None, val_size: Optional[int] = None,
         seed: int = 42, max_seq_length: Optional[int] = None, mask_prompt: bool = True,
         skip_bad_records: bool = False, prompt_style: Optional[StyleName] = None) -> None:
    """Tokenize instruction data into train.pt, val.pt and prep_config.yaml.

    Args:
        destination_dir: Where the files are written (and the downloaded alpaca_data.json kept).
        checkpoint_dir: A converted checkpoint directory; its tokenizer and block_size are used (default: the quick
            start's).
        tokenizer_path: A tokenizer.json or SentencePiece tokenizer.model; overrides the one in checkpoint_dir.
        data_file: A JSON list or JSON Lines file (.jsonl) of records: Alpaca records {instruction, input, output}
            or chat records {messages: [{role: system|user|assistant, content}, ...]}; only the answers are
            learned. Default: download the Stanford Alpaca data to destination_dir/alpaca_data.json, or reuse it
            if already there.
        val_size: How many random samples go to the validation split (default: the paper's 2000, or a tenth of a
            smaller data set).
        seed: Seed of the train/val split.
        max_seq_length: Longest tokenized sample; longer ones are truncated, always keeping their EOS.
            Default: the block_size of checkpoint_dir's model, else 512.
        mask_prompt: Leave the prompt out of the loss, so only the response (and EOS) is learned.
        skip_bad_records: Skip malformed records (with a count) instead of stopping at the first one.
        prompt_style: How records become text (one of lit_adapter/prompts.py's styles): the Alpaca template of the
            paper (BOS where the tokenizer adds one, EOS after the answer), the model's own chat template (from its
            tokenizer config; for chat models and multi-turn records), or the text as it is. Default: the chat
            template for chat records on a model that has one, else the Alpaca template. Training and generation
            take the style from what is prepared here.
    """
    if tokenizer_path is None and (checkpoint_dir is None or not Path(checkpoint_dir).is_dir()):
        raise UserError(f"checkpoint directory {checkpoint_dir} not found: pass --checkpoint_dir (holding the "
                        "tokenizer) or --tokenizer_path")
    check_can_create(destination_dir, "--destination_dir")
    check_seed(seed)
    tokenizer = Tokenizer(tokenizer_path or checkpoint_dir)
    max_seq_length = checked_length(max_seq_length, checkpoint_dir)
    records, data_file = read_records(data_file, destination_dir, skip_bad_records)
    if val_size is None:
        val_size = default_val_size(len(records))
        if val_size < VAL_SIZE:
            print(f"val_size {val_size}: a tenth of the {len(records)} records ({VAL_SIZE} from {10 * VAL_SIZE:,} on)")
    if prompt_style is None:
        prompt_style = style_for_records(records, tokenizer)
        print(f"prompt style: {prompt_style} (--prompt_style chooses another)")
    prepare_dataset(records, tokenizer, destination_dir, val_size=val_size, seed=seed,
                    max_seq_length=max_seq_length, mask_prompt=mask_prompt, source=data_file, style=prompt_style)


def checked_length(max_seq_length: Optional[int], checkpoint_dir: Optional[Path]) -> int:
    """The longest sample: as given (at most the model's context), else the model's context, else 512."""
    has_config = checkpoint_dir is not None and (Path(checkpoint_dir) / CONFIG_FILE).is_file()
    block_size = read_config(checkpoint_dir).block_size if has_config else None
    if max_seq_length is None:
        return block_size or DEFAULT_MAX_SEQ_LENGTH
    if block_size is not None and max_seq_length > block_size:
        raise UserError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {block_size} "
                        f"({checkpoint_dir / CONFIG_FILE}): pass --max_seq_length {block_size} or less")
    return max_seq_length


def read_records(data_file: Optional[Path], destination_dir: Path, skip_bad_records: bool) -> tuple[list[dict], Path]:
    """The records of ``data_file`` (default: the Alpaca data, downloaded into ``destination_dir`` once)."""
    if data_file is None:
        data_file = destination_dir / "alpaca_data.json"
        if data_file.is_file():
            print(f"using the previously downloaded {data_file}")
        else:
            download_alpaca(data_file)
    records, problems = load_records(data_file, skip_bad_records)
    if problems:
        print(f"skipped {len(problems)} bad records of {data_file}; the first: {problems[0]}", file=sys.stderr)
    return records, data_file
