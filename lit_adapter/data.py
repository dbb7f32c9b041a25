"""The Alpaca data: reading and checking the JSON, tokenizing with loss masks, train/val files, length-aware
batching, collation, and the LightningDataModule that serves it."""

import hashlib
import itertools
import json
import math
import re
import shutil
import statistics
import urllib.request
from functools import partial
from http.client import HTTPException
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from lit_adapter.checkpoint import atomic_path, torch_load
from lit_adapter.config import read_yaml_mapping
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


# --- batching -------------------------------------------------------------------------------------------------

PAD_TO_MULTIPLE_OF = 8
"""Micro-batch lengths are rounded up to this: the 7B recipe ran 18.6k tokens/s with 8 and 15.4k with 1 (H200)."""

Step = tuple[list[list[int]], int]
"""One optimizer step on one rank: its micro-batches (sample indices) and the step's response tokens on all ranks."""


class StepPlan:
    """Which samples make each optimizer step, and how this rank cuts its share into micro-batches.

    All epochs form one stream of samples: epoch e is a permutation of all indices (generator seeded with
    ``seed + e``), cut into chunks of ``steps_per_chunk`` steps (64, near Hugging Face's mega-batches of 50: on
    Alpaca half the padding of 16), each chunk sorted by length and cut into
    step-sized blocks, the full blocks shuffled (the one holding the longest sample first, so an out-of-memory
    shows at once) and a partial block (the last chunk's shortest samples) last. Step k holds the stream's samples ``[k * step_size, (k + 1) *
    step_size)``: every step has exactly ``step_size`` samples, every sample is in each epoch once, and a step
    may straddle two epochs. Nothing of this depends on the number of ranks or on the micro-batch settings.

    Rank r takes every ``num_replicas``-th sample of the step, longest first, and cuts its share into
    micro-batches of at most ``micro_batch_size`` samples and (where given) ``micro_batch_tokens`` padded
    tokens; a sample longer than the token budget gets a micro-batch of its own.
    """

    def __init__(self, lengths: Sequence[int], response_tokens: Sequence[int], step_size: int,
                 micro_batch_size: Optional[int] = None, micro_batch_tokens: Optional[int] = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, steps_per_chunk: int = 64, pad_to_multiple_of: int = 1) -> None:
        if step_size < 1 or step_size % num_replicas or (micro_batch_size or 1) < 1 or (micro_batch_tokens or 1) < 1:
            raise UserError(f"the step size ({step_size}) must be a positive multiple of the {num_replicas} ranks, "
                            f"micro_batch_size ({micro_batch_size}) and micro_batch_tokens ({micro_batch_tokens}) "
                            "positive")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} must lie in [0, num_replicas={num_replicas})")
        self.lengths, self.response_tokens = list(lengths), list(response_tokens)
        self.step_size, self.seed = step_size, seed
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.num_replicas, self.rank = num_replicas, rank
        self.steps_per_chunk, self.pad_to_multiple_of = steps_per_chunk, pad_to_multiple_of
        self._orders: dict[int, list[int]] = {}

    def first_step(self, epoch: int) -> int:
        """The first step whose first sample lies in ``epoch``."""
        return -(-epoch * len(self.lengths) // self.step_size)

    def epoch_of(self, step: int) -> int:
        """The epoch of the step's first sample."""
        return step * self.step_size // len(self.lengths)

    def epoch_order(self, epoch: int) -> list[int]:
        """All indices in the order ``epoch`` serves them."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = self._grouped_order(epoch)
        return self._orders[epoch]

    def _grouped_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk_size, size = self.step_size * self.steps_per_chunk, self.step_size
        blocks = []
        for start in range(0, len(order), chunk_size):
            chunk = sorted(order[start:start + chunk_size], key=self.lengths.__getitem__)
            # cut from the long end: a partial block holds the last chunk's shortest samples, never the longest
            blocks += [chunk[max(0, end - size):end] for end in range(len(chunk), 0, -size)]
        partial = blocks.pop() if len(blocks[-1]) < size else []
        blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        if blocks:
            longest = max(range(len(blocks)), key=lambda i: self.lengths[blocks[i][-1]])
            blocks[0], blocks[longest] = blocks[longest], blocks[0]
        return [index for block in blocks for index in block] + partial

    def step_samples(self, step: int) -> list[int]:
        """The ``step_size`` samples of optimizer step ``step`` (counted from 0 over all epochs)."""
        start, samples = step * self.step_size, []
        while len(samples) < self.step_size:
            epoch, offset = divmod(start + len(samples), len(self.lengths))
            samples += self.epoch_order(epoch)[offset:offset + self.step_size - len(samples)]
        return samples

    def micro_batches(self, samples: Sequence[int]) -> list[list[int]]:
        """This rank's share of a step's ``samples``, longest first, cut into micro-batches.

        With a token budget, the cut is evened out: the smallest budget that needs no more micro-batches than
        ``micro_batch_tokens`` does is used, so no micro-batch is left nearly empty (a GPU idles on those).
        """
        mine = sorted(samples, key=self.lengths.__getitem__, reverse=True)[self.rank::self.num_replicas]
        batches = self._cut(mine, self.micro_batch_tokens)
        if self.micro_batch_tokens is None or len(batches) == 1:
            return batches
        low, high = 1, self.micro_batch_tokens  # invariant: the budget ``high`` needs at most len(batches)
        while low < high:
            middle = (low + high) // 2
            if len(self._cut(mine, middle)) <= len(batches):
                high = middle
            else:
                low = middle + 1
        return self._cut(mine, high)

    def _cut(self, samples: Sequence[int], budget: Optional[int]) -> list[list[int]]:
        """``samples`` (longest first) in order, in micro-batches of at most ``micro_batch_size`` samples and
        ``budget`` padded tokens (a longer sample alone)."""
        batches: list[list[int]] = []
        for index in samples:
            if batches and self._fits(batches[-1], budget):
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    def _fits(self, batch: list[int], budget: Optional[int]) -> bool:
        """Whether one more sample, no longer than the batch's first, may join ``batch``."""
        if self.micro_batch_size is not None and len(batch) >= self.micro_batch_size:
            return False
        width = math.ceil((self.lengths[batch[0]] - 1) / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return budget is None or (len(batch) + 1) * width <= budget

    def step(self, step: int) -> Step:
        """This rank's micro-batches of ``step`` and the response tokens of the whole step."""
        samples = self.step_samples(step)
        return self.micro_batches(samples), sum(self.response_tokens[i] for i in samples)


class StepSampler(Sampler[Step]):
    """This rank's optimizer steps from ``start_step`` on, without end (the Fabric loop)."""

    def __init__(self, plan: StepPlan, start_step: int = 0) -> None:
        super().__init__()
        self.plan, self.start_step = plan, start_step

    def __iter__(self) -> Iterator[Step]:
        step = self.start_step
        while True:
            yield self.plan.step(step)
            step += 1


class EpochMicroBatchSampler(Sampler[Step]):
    """The steps of one epoch (those whose first sample lies in it), one micro-batch at a time (the Trainer).

    Each item is ``([micro_batch], step_tokens)``. The epoch is set by ``set_epoch``; the epoch given to the
    constructor starts after this rank's first ``skip`` micro-batches (resuming). Needs a fixed micro-batch size
    (no ``micro_batch_tokens``): the Trainer accumulates a fixed number of micro-batches.
    """

    def __init__(self, plan: StepPlan, epoch: int = 0, skip: int = 0) -> None:
        super().__init__()
        self.plan, self.epoch, self._resume_at = plan, epoch, (epoch, skip)
        self.accumulate = micro_batches_per_step(plan.step_size, plan.micro_batch_size, plan.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.plan.first_step(self.epoch + 1) - self.plan.first_step(self.epoch)) * self.accumulate

    def __iter__(self) -> Iterator[Step]:
        resume_epoch, skip = self._resume_at
        skip = skip if self.epoch == resume_epoch else 0
        items = (([batch], tokens) for step in range(self.plan.first_step(self.epoch), self.plan.first_step(self.epoch + 1))
                 for batches, tokens in [self.plan.step(step)] for batch in batches)
        return itertools.islice(items, skip, None)


def micro_batches_per_step(step_size: int, micro_batch_size: int, replicas: int) -> int:
    """Micro-batches of ``micro_batch_size`` that each of ``replicas`` takes per optimizer step of ``step_size``
    samples (the gradient accumulation; a partial last one counts)."""
    return -(-step_size // (replicas * micro_batch_size))


def collate(samples: Sequence[Sample], pad_id: int = 0, ignore_index: int = IGNORE_INDEX,
            pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch as ``(input_ids, targets)``, both (batch, T) int64, shifted for next-token prediction.

    Row b holds ``input_ids[:-1]`` and ``labels[1:]`` of sample b: ``targets[b, t]`` is the token to predict
    after ``input_ids[b, :t + 1]``, so the loss is ``cross_entropy(logits.flatten(0, 1), targets.flatten(),
    ignore_index=ignore_index)``. Rows are right-padded (``pad_id`` / ``ignore_index``), which a causal model
    never attends to, to the longest row rounded up to ``pad_to_multiple_of``; T is thus at most
    ``max_seq_length - 1`` (or that rounded up).
    """
    width = max(len(s["input_ids"]) for s in samples) - 1
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), ignore_index, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"]) - 1
        input_ids[row, :n] = sample["input_ids"][:-1]
        targets[row, :n] = sample["labels"][1:]
    return input_ids, targets


def padding_fraction(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX) -> float:
    """The share of positions in ``collate``d micro-batches that are padding.

    A row's real part ends at its last learned target (its EOS, never masked), so this is exact.
    """
    real, total = 0, 0
    for _, targets in batches:
        positions = torch.arange(1, targets.size(1) + 1)
        real += ((targets != ignore_index) * positions).amax(dim=1).sum().item()
        total += targets.numel()
    return 1.0 - real / max(total, 1)


# --- Lightning ------------------------------------------------------------------------------------------------

class StepData:
    """The samples, served a step at a time: ``data[(micro_batches, tokens)]`` is ``([collated micro-batch...],
    tokens)`` (a DataLoader with ``batch_size=None`` and a step sampler calls it)."""

    def __init__(self, samples: Sequence[Sample], pad_to_multiple_of: int = 1) -> None:
        self.samples, self.pad_to_multiple_of = samples, pad_to_multiple_of

    def __getitem__(self, step: Step) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        batches, tokens = step
        return [collate([self.samples[i] for i in batch], pad_to_multiple_of=self.pad_to_multiple_of)
                for batch in batches], tokens


def response_token_count(sample: Sample, ignore_index: int = IGNORE_INDEX) -> int:
    """The sample's learned targets: its labels after the first (``collate`` shifts them by one)."""
    return int((sample["labels"][1:] != ignore_index).sum())


class AlpacaDataModule(L.LightningDataModule):
    """Train/val dataloaders over the files of ``scripts/prepare_alpaca.py``, length-grouped and padded per batch.

    Training serves optimizer steps of exactly ``global_batch_size`` samples (``StepPlan``). The rank and world
    size come from the trainer, else from an initialised ``torch.distributed`` (Fabric), else a single process.
    Batches are dealt out to ranks here, so a Trainer needs ``use_distributed_sampler=False``.
    """

    def __init__(self, data_dir: Path = Path("data/alpaca"), global_batch_size: int = 64,
                 micro_batch_size: Optional[int] = 4, micro_batch_tokens: Optional[int] = None, seed: int = 42,
                 num_workers: int = 0, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> None:
        """
        Args:
            data_dir: Prepared data (scripts/prepare_alpaca.py): train.pt, val.pt, prep_config.yaml.
            global_batch_size: Samples per optimizer step over all devices.
            micro_batch_size: Most samples per micro-batch on one device (None: no limit).
            micro_batch_tokens: Most padded tokens per micro-batch on one device (None: no limit).
            seed: Seed of the per-epoch shuffling.
            num_workers: DataLoader worker processes (0: load in the training process).
            pad_to_multiple_of: Pad each micro-batch's length up to a multiple of this (8 suits GPU kernels).
        """
        super().__init__()
        self.data_dir = Path(data_dir)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.seed = seed
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.splits: dict[str, list[Sample]] = {}
        self.prep_config: dict[str, Any] = {}
        self._resume_at = (0, 0)

    def setup(self, stage: str = "") -> None:
        """Load ``train.pt``, ``val.pt`` and ``prep_config.yaml`` (once)."""
        if self.splits:
            return
        for path in [self.data_dir / f"{name}.pt" for name in SPLITS] + [self.data_dir / PREP_CONFIG_FILE]:
            if not path.is_file():
                raise UserError(f"{path} not found: run scripts/prepare_alpaca.py first "
                                f"(with --destination_dir {self.data_dir})")
        prep_config = read_yaml_mapping(self.data_dir / PREP_CONFIG_FILE)
        check_prepared_set(self.data_dir, prep_config)
        self.splits = {name: torch_load(self.data_dir / f"{name}.pt") for name in SPLITS}
        self.prep_config = prep_config

    @property
    def prompt_style(self) -> PromptStyle:
        """The prompt style the data was prepared in (data from before styles existed: alpaca)."""
        return check_prompt_style(self.prep_config.get("prompt_style", "alpaca"))

    def plan(self, split: str = "train") -> StepPlan:
        """The step plan of ``split`` on this rank."""
        self.setup()
        samples = self.splits[split]
        num_replicas, rank = self._replicas()
        return StepPlan([len(s["input_ids"]) for s in samples], [response_token_count(s) for s in samples],
                        self.global_batch_size, self.micro_batch_size, self.micro_batch_tokens, self.seed,
                        num_replicas, rank, pad_to_multiple_of=self.pad_to_multiple_of)

    def train_steps(self, start_step: int = 0) -> DataLoader:
        """This rank's optimizer steps from ``start_step`` on, without end: ``([(input_ids, targets)...], tokens)``."""
        return self._loader(StepSampler(self.plan(), start_step))

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next ``train_dataloader()`` start ``epoch`` after this rank's first ``batches_done`` micro-batches."""
        self._resume_at = (epoch, batches_done)

    def train_dataloader(self) -> DataLoader:
        """The Trainer's epochs, a micro-batch at a time: ``([(input_ids, targets)], step_tokens)``."""
        epoch, skip = self._resume_at
        return self._loader(EpochMicroBatchSampler(self.plan(), epoch, skip))

    def val_dataloader(self) -> DataLoader:
        """All validation samples sorted by length in micro-batches, dealt out to ranks: ``(input_ids, targets)``."""
        plan = self.plan("val")
        plan.num_replicas, plan.rank = 1, 0
        batches = plan.micro_batches(range(len(plan.lengths)))
        num_replicas, rank = self._replicas()
        mine = batches[:len(batches) - len(batches) % num_replicas][rank::num_replicas]
        return DataLoader(self.splits["val"], batch_sampler=mine, num_workers=self.num_workers,
                          collate_fn=partial(collate, pad_to_multiple_of=self.pad_to_multiple_of),
                          pin_memory=torch.cuda.is_available())

    def _loader(self, sampler: Sampler[Step]) -> DataLoader:
        return DataLoader(StepData(self.splits["train"], self.pad_to_multiple_of), sampler=sampler, batch_size=None,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def _replicas(self) -> tuple[int, int]:
        """(world size, rank) of this process."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0
