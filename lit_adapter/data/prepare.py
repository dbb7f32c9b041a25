"""Prepared sets: records tokenized in a prompt style with answers-only labels, split into ``train.pt`` and
``val.pt`` and described by ``prep_config.yaml``, which is written last and fingerprints both."""

import math
import statistics
from itertools import accumulate
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from lit_adapter.data.batching import IGNORE_INDEX, Sample
from lit_adapter.errors import UserError
from lit_adapter.files import atomic_path, file_fingerprint, read_yaml_mapping, torch_load, write_yaml
from lit_adapter.prompts import STYLES, get_style, record_messages
from lit_adapter.tokenizer import Tokenizer

MIN_SEQ_LENGTH = 3
"""BOS, one response token and EOS."""
PREP_CONFIG_FILE = "prep_config.yaml"
SPLITS = ("train", "val")
VAL_SIZE = 2000
"""The paper's validation split of the 52k Alpaca records."""


def tokenize_sample(record: dict, tokenizer: Tokenizer, max_seq_length: int, mask_prompt: bool = True,
                    style: Optional[str] = None) -> tuple[Sample, bool]:
    """``{"input_ids", "labels"}`` (int64) for one record in the prompt style named ``style`` (None: the legacy
    default), and whether it had to be truncated.

    ``input_ids`` is BOS where the style adds one, the sample's text as the style writes it, and its closing: EOS,
    or in the chat style the end-of-turn token that the template closes each answer with. Each prompt is tokenized
    on its own, as the model gets it at generation time (where a token would span a prompt's end, what follows is
    tokenized separately). ``labels`` equals ``input_ids`` except that everything
    but the answers (and the closing EOS) is ``IGNORE_INDEX`` when ``mask_prompt``. A sample longer than
    ``max_seq_length`` loses the end of its answers and, where the prompt alone does not fit, the start of its
    prompt (BOS and the prompt's end stay) so that at least one answer token is learned. It always keeps its
    closing EOS / end-of-turn.
    """
    check_max_seq_length(max_seq_length)
    prompt_style = get_style(style)
    ids, learned = encode_segments(tokenizer, prompt_style.segments(tokenizer, record))
    ids, learned, closing = prompt_style.split_closing(ids, learned, tokenizer)
    lead = [tokenizer.bos_id] if prompt_style.adds_bos(tokenizer) else []
    first = learned.index(True) if True in learned else len(ids)
    prompt, response, response_learned = ids[:first], ids[first:], learned[first:]
    budget = max_seq_length - len(lead) - len(closing)  # room left for prompt and answers
    if budget < 1:
        raise UserError(f"max_seq_length {max_seq_length} leaves no room for an answer beside the "
                        f"{len(lead) + len(closing)} tokens that open and close a sample")
    truncated = len(prompt) + len(response) > budget
    if truncated:
        keep = max(budget - len(prompt), min(len(response), 1))
        response, response_learned = response[:keep], response_learned[:keep]
        prompt = prompt[len(prompt) - (budget - len(response)):]  # its start goes, its end stays
    prompt = lead + prompt
    input_ids = prompt + response + closing
    if not mask_prompt:
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(input_ids)}, truncated
    answers = [token if keep else IGNORE_INDEX for token, keep in zip(response, response_learned)]
    labels = [IGNORE_INDEX] * len(prompt) + answers + closing
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}, truncated


def encode_segments(tokenizer: Tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the joined ``segments`` (rendered text) and, per token, whether its segment is learned.

    The text is tokenized whole; where a token would span two segments, the text is cut there and each side is
    tokenized on its own (so that a prompt keeps the tokens it has at generation time). Linear in the text.
    """
    text = "".join(piece for piece, _ in segments)
    ends = list(accumulate(len(piece) for piece, _ in segments))
    cuts = [0, len(text)]
    while True:
        spans = [(token, start + a, start + b) for start, end in zip(cuts, cuts[1:])
                 for token, a, b in tokenizer.token_spans(text[start:end])]
        spanned = spanned_ends(spans, ends)
        if not spanned:
            break
        cuts = sorted(set(cuts) | spanned)
    learned_at = [learned for piece, learned in segments for _ in piece]
    return [token for token, _, _ in spans], [learned_at[min(a, len(text) - 1)] for _, a, _ in spans]


def spanned_ends(spans: list[tuple[int, int, int]], ends: list[int]) -> set[int]:
    """The segment ``ends`` (sorted) that a token of ``spans`` (sorted by start) starts before and ends after."""
    spanned, next_end = set(), 0
    for _, start, stop in spans:
        while next_end < len(ends) and ends[next_end] <= start:
            next_end += 1
        inside = next_end
        while inside < len(ends) and ends[inside] < stop:
            spanned.add(ends[inside])
            inside += 1
    return spanned


def check_max_seq_length(max_seq_length: int) -> None:
    """Refuse a ``max_seq_length`` too short for BOS, one response token and EOS."""
    if max_seq_length < MIN_SEQ_LENGTH:
        raise UserError(f"max_seq_length must be at least {MIN_SEQ_LENGTH} (BOS, a response token, EOS), "
                        f"got {max_seq_length}")


def default_val_size(records: int) -> int:
    """The validation split of a set of ``records``: the 2000 of the paper's 52k Alpaca set, or a tenth of a smaller
    set (at least 1, so that evaluation has something to measure)."""
    return min(VAL_SIZE, max(1, records // 10), records - 1)


def prepare_dataset(records: Sequence[dict], tokenizer: Tokenizer, destination_dir: Path,
                    val_size: int = VAL_SIZE, seed: int = 42, max_seq_length: int = 512, mask_prompt: bool = True,
                    source: Optional[Path] = None, style: Optional[str] = None) -> dict[str, Any]:
    """Tokenize ``records`` in the prompt style named ``style`` (None: the legacy default), split them at random into
    ``train.pt`` and ``val.pt`` (``val_size`` samples) in ``destination_dir`` with a ``prep_config.yaml`` describing
    them (and the first validation record's question, for evaluations to show an answer to); print length
    statistics and return that config."""
    check_max_seq_length(max_seq_length)  # before tokenizing anything
    style = get_style(style).name
    if not 0 <= val_size <= len(records) - 1:
        raise UserError(f"val_size={val_size} does not fit {source or 'the data'}: it has {len(records)} records, "
                        f"so val_size must lie in [0, {len(records) - 1}] (training needs at least one)")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, truncated = [], 0
    for index in tqdm(order, desc="tokenizing", unit=" samples"):
        sample, was_truncated = tokenize_sample(records[index], tokenizer, max_seq_length, mask_prompt, style)
        samples.append(sample)
        truncated += was_truncated
    lengths = length_stats([len(s["input_ids"]) for s in samples])
    config = write_prepared_set(destination_dir, {"train": samples[val_size:], "val": samples[:val_size]}, {
        "source": str(source) if source else None,
        "train_samples": len(samples) - val_size,
        "val_samples": val_size,
        "seed": seed,
        "max_seq_length": max_seq_length,
        "mask_prompt": mask_prompt,
        "prompt_style": style,
        "ignore_index": IGNORE_INDEX,
        "tokenizer": _describe_tokenizer(tokenizer),
        "lengths": lengths,
        "truncated": truncated,
        "sample_instruction": last_question(records[order[0]]) if val_size else None,
    })
    print("tokens per sample: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    print(f"truncated {truncated} of {len(samples)} samples to max_seq_length={max_seq_length}")
    print(f"wrote {config['train_samples']} train and {val_size} val samples to {destination_dir}")
    return config


def last_question(record: dict) -> str:
    """The record's last user turn (an Alpaca record's instruction and input)."""
    return [m["content"] for m in record_messages(record) if m["role"] == "user"][-1]


def write_prepared_set(destination_dir: Path, splits: dict[str, list[Sample]], description: dict[str, Any]) -> dict:
    """Write the split files, then ``prep_config.yaml``: ``description`` and the splits' fingerprints. Written last,
    it makes the set: readers accept only split files that match it. Returns what it wrote."""
    destination_dir = Path(destination_dir)
    for name in SPLITS:
        with atomic_path(destination_dir / f"{name}.pt") as tmp:
            torch.save(splits[name], tmp)
    config = {**description, "files": {f"{name}.pt": file_fingerprint(destination_dir / f"{name}.pt")
                                       for name in SPLITS}}
    write_yaml(destination_dir / PREP_CONFIG_FILE, config)
    return config


def read_prepared_set(data_dir: Path) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """The splits of a prepared set and its ``prep_config.yaml``, checked to be the files it describes."""
    data_dir = Path(data_dir)
    for path in [data_dir / f"{name}.pt" for name in SPLITS] + [data_dir / PREP_CONFIG_FILE]:
        if not path.is_file():
            raise UserError(f"{path} not found: run scripts/prepare_alpaca.py first "
                            f"(with --destination_dir {data_dir})")
    prep_config = read_yaml_mapping(data_dir / PREP_CONFIG_FILE)
    check_prepared_set(data_dir, prep_config)
    try:
        get_style(prep_config.get("prompt_style"))
    except UserError:
        raise UserError(f"{data_dir / PREP_CONFIG_FILE} records the prompt style {prep_config['prompt_style']!r}, "
                        f"which this version does not know (it knows {', '.join(STYLES)}): prepare the data again "
                        "with scripts/prepare_alpaca.py") from None
    return {name: torch_load(data_dir / f"{name}.pt") for name in SPLITS}, prep_config


def check_prepared_set(data_dir: Path, prep_config: dict[str, Any]) -> None:
    """Refuse split files that are not those ``prep_config.yaml`` describes (a run of prepare_alpaca.py that was
    stopped half-way, or files mixed from several runs)."""
    recorded = prep_config.get("files")
    if not isinstance(recorded, dict) or set(recorded) != {f"{name}.pt" for name in SPLITS}:
        raise UserError(f"{data_dir / PREP_CONFIG_FILE} does not list the split files (written by an older version, "
                        "or edited): run scripts/prepare_alpaca.py again")
    for name, fingerprint in recorded.items():
        if file_fingerprint(data_dir / name) != fingerprint:
            raise UserError(f"{data_dir / name} is not the file that {data_dir / PREP_CONFIG_FILE} describes (a "
                            "preparation stopped half-way, or files of different runs): run scripts/prepare_alpaca.py "
                            "again")


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min, median, mean, 95th percentile (nearest rank) and max of ``lengths``."""
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered), "mean": round(statistics.fmean(ordered), 1),
            "p95": ordered[math.ceil(0.95 * len(ordered)) - 1], "max": ordered[-1]}


def _describe_tokenizer(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"path": str(tokenizer.path), "sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The SHA-256 of the tokenizer's file: ``prep_config.yaml`` records it, training checks it."""
    return file_fingerprint(tokenizer.path)["sha256"]
