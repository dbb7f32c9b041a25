"""The Alpaca data: reading and checking the JSON, tokenizing with loss masks, train/val files, length-aware
batching, collation, and the LightningDataModule that serves it."""

import hashlib
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
from lit_adapter.prompts import alpaca_prompt
from lit_adapter.tokenizer import Tokenizer

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
IGNORE_INDEX = -100
"""Label of positions that do not count in the loss (``torch.nn.functional.cross_entropy``'s default)."""
MIN_SEQ_LENGTH = 3
"""BOS, one response token and EOS."""
FIELDS = ("instruction", "input", "output")
PREP_CONFIG_FILE = "prep_config.yaml"
SPLITS = ("train", "val")

_WHITESPACE = re.compile(r"\s*")

Sample = dict[str, torch.Tensor]


# --- reading the JSON -------------------------------------------------------------------------------------------

def load_alpaca_records(path: Path, skip_bad_records: bool = False) -> tuple[list[dict[str, str]], list[str]]:
    """The records of an Alpaca JSON list as ``{"instruction", "input", "output"}`` strings, and the problems skipped.

    A file that is not a JSON list, or a bad record (not an object, a field missing or not a string, an empty
    output) raises a ``UserError`` naming the file and the record; with ``skip_bad_records`` bad records are left
    out and described in the second return value instead. A missing ``input`` means no input.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected a list of records with keys {FIELDS}")
    records, problems = [], []
    for index, record in enumerate(data):
        try:
            records.append(_check_record(record, index))
        except UserError as err:
            if not skip_bad_records:
                hint = "fix it, or pass --skip_bad_records to leave bad records out"
                raise UserError(f"{path}: {err} ({hint})") from None
            problems.append(str(err))
    if not records:
        raise UserError(f"{path} has no usable records ({len(problems)} bad ones skipped)")
    return records, problems


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as UTF-8 text: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a complete value, then more: not a truncated file
            raise UserError(f"{path} holds several JSON values one after another (JSON Lines?), expected one JSON "
                            f"list of records (the second starts at line {err.lineno} column {err.colno})") from None
        index = _broken_record_index(text)
        where = f", in record {index}" if index is not None else ""
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}{where}); "
                        "is the file truncated?") from None


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


def _check_record(record: Any, index: int) -> dict[str, str]:
    """The record's fields as strings, or a ``UserError`` saying what is wrong with record ``index``."""
    if not isinstance(record, dict):
        raise UserError(f"record {index} is a JSON {type(record).__name__}, expected an object with keys {FIELDS}")
    fields = {"input": "", **{key: record[key] for key in FIELDS if key in record}}
    for key in FIELDS:
        if key not in fields:
            raise UserError(f"record {index} has no {key!r}")
        if not isinstance(fields[key], str):
            raise UserError(f"record {index}: {key!r} is a {type(fields[key]).__name__}, expected a string")
    if not fields["output"].strip():
        raise UserError(f"record {index} has an empty 'output' (nothing to learn)")
    return fields


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

def tokenize_sample(record: dict[str, str], tokenizer: Tokenizer, max_seq_length: int,
                    mask_prompt: bool = True) -> tuple[Sample, bool]:
    """``{"input_ids", "labels"}`` (int64) for one record, and whether it had to be truncated.

    ``input_ids`` is BOS, the tokens of prompt + response, and EOS. Its prompt part is the prompt tokenized on its
    own, as the model gets it at generation time (where a token would span the prompt's end, the response is
    tokenized separately). ``labels`` equals ``input_ids`` except that BOS and the prompt are ``IGNORE_INDEX``
    when ``mask_prompt``. A sample longer than ``max_seq_length`` loses the end of its response and, where the
    prompt alone does not fit, the start of its prompt (BOS and the "### Response:" marker at the prompt's end
    stay) so that at least one response token is learned. It always ends with EOS.
    """
    check_max_seq_length(max_seq_length)
    prompt_text = alpaca_prompt(record["instruction"], record.get("input", ""))
    prompt = tokenizer.encode(prompt_text, bos=False).tolist()
    full = tokenizer.encode(prompt_text + record["output"], bos=False).tolist()
    if full[:len(prompt)] != prompt:
        full = prompt + tokenizer.encode(record["output"], bos=False).tolist()
    response = full[len(prompt):]
    budget = max_seq_length - 2  # room left beside BOS and EOS
    truncated = len(prompt) + len(response) > budget
    if truncated:
        response = response[:max(budget - len(prompt), min(len(response), 1))]
        prompt_room = budget - len(response)  # <= len(prompt) here
        prompt = prompt[len(prompt) - prompt_room:]
    prompt = [tokenizer.bos_id] + prompt
    input_ids = prompt + response + [tokenizer.eos_id]
    labels = [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):] if mask_prompt else input_ids
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}, truncated


def check_max_seq_length(max_seq_length: int) -> None:
    """Refuse a ``max_seq_length`` too short for BOS, one response token and EOS."""
    if max_seq_length < MIN_SEQ_LENGTH:
        raise UserError(f"max_seq_length must be at least {MIN_SEQ_LENGTH} (BOS, a response token, EOS), "
                        f"got {max_seq_length}")


def prepare_alpaca(records: Sequence[dict[str, str]], tokenizer: Tokenizer, destination_dir: Path,
                   val_size: int = 2000, seed: int = 42, max_seq_length: int = 512, mask_prompt: bool = True,
                   source: Optional[Path] = None) -> dict[str, Any]:
    """Tokenize ``records``, split them at random into ``train.pt`` and ``val.pt`` (``val_size`` samples) in
    ``destination_dir`` with a ``prep_config.yaml`` describing them; print length statistics and return that config."""
    check_max_seq_length(max_seq_length)  # before tokenizing anything
    if not 0 <= val_size <= len(records) - 1:
        raise UserError(f"val_size={val_size} does not fit {source or 'the data'}: it has {len(records)} records, "
                        f"so val_size must lie in [0, {len(records) - 1}] (training needs at least one)")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, truncated = [], 0
    for index in tqdm(order, desc="tokenizing", unit=" samples"):
        sample, was_truncated = tokenize_sample(records[index], tokenizer, max_seq_length, mask_prompt)
        samples.append(sample)
        truncated += was_truncated
    destination_dir = Path(destination_dir)
    for name, split in zip(SPLITS, (samples[val_size:], samples[:val_size])):
        with atomic_path(destination_dir / f"{name}.pt") as tmp:
            torch.save(split, tmp)
    lengths = length_stats([len(s["input_ids"]) for s in samples])
    config = {
        "source": str(source) if source else None,
        "train_samples": len(samples) - val_size,
        "val_samples": val_size,
        "seed": seed,
        "max_seq_length": max_seq_length,
        "mask_prompt": mask_prompt,
        "ignore_index": IGNORE_INDEX,
        "tokenizer": _describe_tokenizer(tokenizer),
        "lengths": lengths,
        "truncated": truncated,
        "files": {f"{name}.pt": file_fingerprint(destination_dir / f"{name}.pt") for name in SPLITS},
    }
    # written last, it makes the set: readers accept only split files that match its fingerprints
    with atomic_path(destination_dir / PREP_CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    print("tokens per sample: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    print(f"truncated {truncated} of {len(samples)} samples to max_seq_length={max_seq_length}")
    print(f"wrote {config['train_samples']} train and {val_size} val samples to {destination_dir}")
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

class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices of similar length, in random order, every sample at most once per epoch.

    Each epoch shuffles all indices (generator seeded with ``seed + epoch``), cuts them into chunks of
    ``batches_per_chunk`` micro-batches, sorts each chunk by length and cuts it into micro-batches, shuffles the
    micro-batches and puts the one holding the longest sample first (an out-of-memory shows at the first step).
    Only one micro-batch per epoch can be smaller than ``batch_size``.

    Distributed: every rank builds the same list and takes micro-batches ``rank, rank + num_replicas, ...``.
    When their count is not a multiple of ``num_replicas`` the last ``count % num_replicas`` micro-batches
    (random ones, different each epoch) are dropped so that all ranks take the same number of steps; nothing
    is repeated. With one replica every sample is in exactly one micro-batch per epoch.

    Resuming: ``epoch`` and ``skip_batches`` make the iteration of ``epoch`` start after this rank's first
    ``skip_batches`` micro-batches; other epochs (see ``set_epoch``) start at their beginning. ``len()`` is
    always a whole epoch's count for this rank, as Lightning expects when it resumes mid-epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 batches_per_chunk: int = 64, epoch: int = 0, skip_batches: int = 0) -> None:
        if batch_size < 1 or batches_per_chunk < 1:
            raise UserError(f"batch_size ({batch_size}) and batches_per_chunk ({batches_per_chunk}) must be positive")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} must lie in [0, num_replicas={num_replicas})")
        super().__init__()
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.batches_per_chunk = batches_per_chunk
        self.epoch = epoch
        if not 0 <= skip_batches <= len(self):
            raise UserError(f"cannot skip {skip_batches} micro-batches: an epoch has {len(self)} on this rank")
        self._resume_at = (epoch, skip_batches)

    @property
    def sampler(self) -> "LengthGroupedBatchSampler":
        """This object: Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` each epoch."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next iteration for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        resume_epoch, skip = self._resume_at
        mine = self.epoch_batches(self.epoch)[self.rank::self.num_replicas]
        return iter(mine[skip if self.epoch == resume_epoch else 0:])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' micro-batches of ``epoch`` in order, before they are dealt out."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk_size = self.batch_size * self.batches_per_chunk
        batches = []
        for start in range(0, len(order), chunk_size):
            chunk = sorted(order[start:start + chunk_size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i][-1]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches[:len(batches) - len(batches) % self.num_replicas]


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


def padding_fraction(batch: tuple[torch.Tensor, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> float:
    """The share of positions in a ``collate``d batch that are padding.

    A row's real part ends at its last learned target (its EOS, never masked), so this is exact.
    """
    _, targets = batch
    positions = torch.arange(1, targets.size(1) + 1)
    real_lengths = ((targets != ignore_index) * positions).amax(dim=1)
    return 1.0 - real_lengths.sum().item() / max(targets.numel(), 1)


# --- Lightning ------------------------------------------------------------------------------------------------

class AlpacaDataModule(L.LightningDataModule):
    """Train/val dataloaders over the files of ``scripts/prepare_alpaca.py``, length-grouped and padded per batch.

    The rank and world size come from the trainer, else from an initialised ``torch.distributed`` (Fabric),
    else a single process. Batches are dealt out to ranks by the sampler itself, so a Trainer needs
    ``use_distributed_sampler=False`` (Fabric: ``setup_dataloaders(..., use_distributed_sampler=False)``).
    """

    def __init__(self, data_dir: Path = Path("data/alpaca"), micro_batch_size: int = 4, seed: int = 42,
                 num_workers: int = 0, pad_to_multiple_of: int = 1) -> None:
        """
        Args:
            data_dir: Prepared data (scripts/prepare_alpaca.py): train.pt, val.pt, prep_config.yaml.
            micro_batch_size: Samples per micro-batch on one device.
            seed: Seed of the per-epoch shuffling of the micro-batches.
            num_workers: DataLoader worker processes (0: load in the training process).
            pad_to_multiple_of: Pad each micro-batch's length up to a multiple of this (8 suits GPU kernels).
        """
        super().__init__()
        self.data_dir = Path(data_dir)
        self.micro_batch_size = micro_batch_size
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

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next ``train_dataloader()`` start ``epoch`` after this rank's first ``batches_done`` batches."""
        self._resume_at = (epoch, batches_done)

    def train_dataloader(self) -> DataLoader:
        epoch, skip = self._resume_at
        return self._dataloader("train", epoch=epoch, skip_batches=skip)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val")

    def _dataloader(self, split: str, epoch: int = 0, skip_batches: int = 0) -> DataLoader:
        self.setup()
        samples = self.splits[split]
        num_replicas, rank = self._replicas()
        sampler = LengthGroupedBatchSampler([len(s["input_ids"]) for s in samples], self.micro_batch_size, self.seed,
                                            num_replicas, rank, epoch=epoch, skip_batches=skip_batches)
        return DataLoader(samples, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(collate, pad_to_multiple_of=self.pad_to_multiple_of),
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def _replicas(self) -> tuple[int, int]:
        """(world size, rank) of this process."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0
