"""The Alpaca data: reading and checking the records (JSON, JSON Lines, chat), tokenizing with loss masks, and the
prepared set (train/val files described by ``prep_config.yaml``).

Serving it is ``batching.py`` (step plans, collation) and ``datamodule.py`` (the LightningDataModule)."""

import hashlib
import json
import math
import re
import shutil
import statistics
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from tqdm import tqdm

from lit_adapter.checkpoint import atomic_path
from lit_adapter.errors import UserError
from lit_adapter.prompts import ROLES, PromptStyle, adds_bos, check_prompt_style, sample_segments
from lit_adapter.tokenizer import Tokenizer

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
IGNORE_INDEX = -100
"""Label of positions that do not count in the loss (``torch.nn.functional.cross_entropy``'s default)."""
MIN_SEQ_LENGTH = 3
"""BOS, one response token and EOS."""
FIELDS = ("instruction", "input", "output")
PREP_CONFIG_FILE = "prep_config.yaml"
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
SPLITS = ("train", "val")

_WHITESPACE = re.compile(r"\s*")

Sample = dict[str, torch.Tensor]


# --- reading the JSON -------------------------------------------------------------------------------------------

def load_records(path: Path, skip_bad_records: bool = False) -> tuple[list[dict], list[str]]:
    """The training records of a JSON list or JSON Lines file, and the problems skipped.

    A record is an Alpaca record (``instruction``, optional ``input``, ``output``: strings, a missing ``input``
    meaning none) or a chat record (``messages``: a list of ``{"role", "content"}`` with roles system, user,
    assistant, and at least one assistant answer). A file that holds neither, or a bad record, raises a
    ``UserError`` naming the file and the record (or line); with ``skip_bad_records`` bad records are left out
    and described in the second return value instead.
    """
    path = Path(path)
    entries = _read_records_file(path)
    records, problems = [], []
    for where, record in entries:
        try:
            records.append(_check_record(record, where))
        except UserError as err:
            if not skip_bad_records:
                hint = "fix it, or pass --skip_bad_records to leave bad records out"
                raise UserError(f"{path}: {err} ({hint})") from None
            problems.append(str(err))
    if not records:
        raise UserError(f"{path} has no usable records ({len(problems)} bad ones skipped)")
    return records, problems


def _read_records_file(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for every record of a JSON list or JSON Lines file (told apart by suffix or content)."""
    text = _read_text(path)
    if path.suffix in JSON_LINES_SUFFIXES:
        return _parse_json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(path, text)
        index = _broken_record_index(text)
        where = f", in record {index}" if index is not None else ""
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}{where}); "
                        "is the file truncated?") from None
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected a list of records with keys {FIELDS}")
    return [(f"record {index}", record) for index, record in enumerate(data)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as UTF-8 text: {err}") from None


def _parse_json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, record) for each non-blank line of a JSON Lines text."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                                "JSON Lines hold one record per line") from None
    return entries


def _broken_record_index(text: str) -> Optional[int]:
    """Index of the first element of a top-level JSON list that does not parse; None where there is no such list."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        return None
    try:
        decoder.raw_decode(text, pos)
        return None  # the list itself is fine: the error follows it
    except json.JSONDecodeError:
        pass
    index, pos = 0, pos + 1
    while True:
        try:
            _, pos = decoder.raw_decode(text, _WHITESPACE.match(text, pos).end())
        except json.JSONDecodeError:
            return index
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if not text.startswith(",", pos):
            return index
        pos += 1


def _check_record(record: Any, where: str) -> dict:
    """The record with its fields checked (an Alpaca record gets its ``input``), or a ``UserError`` about ``where``."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object with keys {FIELDS}")
    if "messages" in record:
        return {"messages": _check_messages(record["messages"], where)}
    fields = {"input": "", **{key: record[key] for key in FIELDS if key in record}}
    for key in FIELDS:
        if key not in fields:
            raise UserError(f"{where} has no {key!r} (an Alpaca record needs {FIELDS}, a chat record 'messages')")
        if not isinstance(fields[key], str):
            raise UserError(f"{where}: {key!r} is a {type(fields[key]).__name__}, expected a string")
    if not fields["output"].strip():
        raise UserError(f"{where} has an empty 'output' (nothing to learn)")
    return fields


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat record's turns as ``{"role", "content"}``; at least one assistant answer must have text."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {turn} needs a string 'content' (and a 'role')")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: message {turn} has role {message.get('role')!r}, expected one of {ROLES}")
        turns.append({"role": message["role"], "content": message["content"]})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise UserError(f"{where} has no assistant answer (nothing to learn)")
    return turns


def download_alpaca(destination: Path, url: str = ALPACA_URL, timeout: float = 60.0) -> None:
    """Download the Stanford Alpaca JSON to ``destination``; a partial download never appears there."""
    print(f"downloading {url} to {destination}")
    with atomic_path(Path(destination)) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (OSError, HTTPException) as err:
            raise UserError(f"could not download {url} ({err}); without network, fetch alpaca_data.json "
                            "elsewhere and pass --data_file PATH") from None


# --- tokenizing -----------------------------------------------------------------------------------------------

def tokenize_sample(record: dict, tokenizer: Tokenizer, max_seq_length: int, mask_prompt: bool = True,
                    style: PromptStyle = "alpaca") -> tuple[Sample, bool]:
    """``{"input_ids", "labels"}`` (int64) for one record in prompt ``style``, and whether it had to be truncated.

    Alpaca style: ``input_ids`` is BOS (where the tokenizer adds one), the tokens of prompt + response, and EOS.
    Chat style: the conversation in the model's chat template, whose end-of-turn token closes each answer.
    Each prompt is tokenized on its own, as the model gets it at generation time (where a token would span a
    prompt's end, what follows is tokenized separately). ``labels`` equals ``input_ids`` except that everything
    but the answers (and the closing EOS) is ``IGNORE_INDEX`` when ``mask_prompt``. A sample longer than
    ``max_seq_length`` loses the end of its answers and, where the prompt alone does not fit, the start of its
    prompt (BOS and the prompt's end stay) so that at least one answer token is learned. It always keeps its
    closing EOS / end-of-turn.
    """
    check_max_seq_length(max_seq_length)
    ids, learned = encode_segments(tokenizer, sample_segments(style, tokenizer, record))
    if style == "chat":
        ids, learned, closing = split_chat_closing(ids, learned, tokenizer)
    else:
        closing = [tokenizer.eos_id]
    lead = [tokenizer.bos_id] if adds_bos(style, tokenizer) else []
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
    """Token ids of the joined ``segments`` and, per token, whether its segment is learned.

    Each segment's tokens are those that tokenizing the text so far adds; where that would change the tokens
    before it (a token spanning the boundary), the segment is tokenized on its own.
    """
    ids, learned, text = [], [], ""
    for piece, learn in segments:
        text += piece
        so_far = tokenizer.encode(text, bos=False).tolist()
        new = so_far[len(ids):] if so_far[:len(ids)] == ids else tokenizer.encode(piece, bos=False).tolist()
        ids += new
        learned += [learn] * len(new)
    return ids, learned


def split_chat_closing(ids: list[int], learned: list[bool],
                       tokenizer: Tokenizer) -> tuple[list[int], list[bool], list[int]]:
    """A chat sample without its trailing turns that hold no answer, cut before its closing: the last answer's
    end-of-turn token and what the template writes after it (EOS where the answer has no stop token)."""
    answers = [i for i, learn in enumerate(learned) if learn]
    ids, learned = ids[:answers[-1] + 1], learned[:answers[-1] + 1]
    stops = [i for i in answers if ids[i] in tokenizer.stop_ids]
    end = stops[-1] if stops else len(ids)
    return ids[:end], learned[:end], ids[end:] or [tokenizer.eos_id]


def check_max_seq_length(max_seq_length: int) -> None:
    """Refuse a ``max_seq_length`` too short for BOS, one response token and EOS."""
    if max_seq_length < MIN_SEQ_LENGTH:
        raise UserError(f"max_seq_length must be at least {MIN_SEQ_LENGTH} (BOS, a response token, EOS), "
                        f"got {max_seq_length}")


# --- the prepared set -----------------------------------------------------------------------------------------

def prepare_alpaca(records: Sequence[dict], tokenizer: Tokenizer, destination_dir: Path,
                   val_size: int = 2000, seed: int = 42, max_seq_length: int = 512, mask_prompt: bool = True,
                   source: Optional[Path] = None, style: PromptStyle = "alpaca") -> dict[str, Any]:
    """Tokenize ``records`` in prompt ``style``, split them at random into ``train.pt`` and ``val.pt`` (``val_size``
    samples) in ``destination_dir`` with a ``prep_config.yaml`` describing them; print length statistics and return
    that config."""
    check_max_seq_length(max_seq_length)  # before tokenizing anything
    check_prompt_style(style)
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
    })
    print("tokens per sample: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    print(f"truncated {truncated} of {len(samples)} samples to max_seq_length={max_seq_length}")
    print(f"wrote {config['train_samples']} train and {val_size} val samples to {destination_dir}")
    return config


def write_prepared_set(destination_dir: Path, splits: dict[str, list[Sample]], description: dict[str, Any]) -> dict:
    """Write the split files, then ``prep_config.yaml``: ``description`` and the splits' fingerprints. Written last,
    it makes the set: readers accept only split files that match it. Returns what it wrote."""
    destination_dir = Path(destination_dir)
    for name in SPLITS:
        with atomic_path(destination_dir / f"{name}.pt") as tmp:
            torch.save(splits[name], tmp)
    config = {**description, "files": {f"{name}.pt": file_fingerprint(destination_dir / f"{name}.pt")
                                       for name in SPLITS}}
    with atomic_path(destination_dir / PREP_CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


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
    return {"path": str(tokenizer.path), "sha256": hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(),
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
