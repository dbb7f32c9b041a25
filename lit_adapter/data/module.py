"""The LightningDataModule: a prepared set's files, served in the step plans of ``batching``, and the checks of a
prepared set against the model it trains."""

from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from lit_adapter.config import Config
from lit_adapter.data.batching import (PAD_TO_MULTIPLE_OF, EpochMicroBatchSampler, Sample, Step, StepData, StepPlan,
                                       StepSampler, collate, response_token_count)
from lit_adapter.data.prepare import read_prepared_set, tokenizer_sha256
from lit_adapter.errors import UserError
from lit_adapter.prompts import get_style
from lit_adapter.tokenizer import Tokenizer


class InstructionDataModule(L.LightningDataModule):
    """Train/val dataloaders over the files of ``scripts/prepare_alpaca.py``, length-grouped and padded per batch.

    Training serves optimizer steps of exactly ``global_batch_size`` samples (``StepPlan``). The rank and world
    size come from the trainer, else from an initialised ``torch.distributed`` (Fabric), else a single process.
    Batches are dealt out to ranks here, so a Trainer needs ``use_distributed_sampler=False``.
    """

    def __init__(self, data_dir: Path = Path("data/alpaca"), global_batch_size: Optional[int] = None,
                 micro_batch_size: Optional[int] = 4, micro_batch_tokens: Optional[int] = None, seed: int = 42,
                 num_workers: int = 0, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
                 allow_other_tokenizer: bool = False) -> None:
        """
        Args:
            data_dir: Prepared data (scripts/prepare_alpaca.py): train.pt, val.pt, prep_config.yaml.
            global_batch_size: Samples per optimizer step over all devices (None: the training options set it from
                the data, ``train.args.with_defaults``).
            micro_batch_size: Most samples per micro-batch on one device (None: no limit).
            micro_batch_tokens: Most padded tokens per micro-batch on one device (None: no limit).
            seed: Seed of the per-epoch shuffling.
            num_workers: DataLoader worker processes (0: load in the training process).
            pad_to_multiple_of: Pad each micro-batch's length up to a multiple of this (8 suits GPU kernels).
            allow_other_tokenizer: Train on data prepared with another tokenizer file than the model's (of the same
                vocabulary size), which is otherwise refused: only where both tokenize alike (e.g. a re-saved copy).
        """
        super().__init__()
        self.data_dir = Path(data_dir)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.seed = seed
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.allow_other_tokenizer = allow_other_tokenizer
        self.splits: dict[str, list[Sample]] = {}
        self.prep_config: dict[str, Any] = {}
        self._resume_at = (0, 0)

    def setup(self, stage: str = "") -> None:
        """Load ``train.pt``, ``val.pt`` and ``prep_config.yaml`` (once)."""
        if not self.splits:
            self.splits, self.prep_config = read_prepared_set(self.data_dir)

    @property
    def prompt_style(self) -> str:
        """The name of the prompt style the data was prepared in (data from before styles: the legacy style)."""
        return get_style(self.prep_config.get("prompt_style")).name

    @property
    def sample_instruction(self) -> Optional[str]:
        """The first validation record's question, which evaluations ask (None for sets from older versions)."""
        return self.prep_config.get("sample_instruction")

    def check_fits(self, tokenizer: Tokenizer, config: Config, allow_option: str) -> None:
        """The data must come from this tokenizer (its file's hash, as recorded: unless ``allow_other_tokenizer``,
        the option ``allow_option``) and fit the model's context."""
        prepared = self.prep_config.get("tokenizer", {})
        if prepared.get("vocab_size") not in (None, tokenizer.vocab_size):
            raise UserError(f"{self.data_dir} was prepared with a tokenizer of {prepared['vocab_size']} tokens, but "
                            f"the model's has {tokenizer.vocab_size}: run scripts/prepare_alpaca.py with this "
                            "--checkpoint_dir")
        sha256 = tokenizer_sha256(tokenizer)
        if prepared.get("sha256") not in (None, sha256) and not self.allow_other_tokenizer:
            raise UserError(f"{self.data_dir} was prepared with the tokenizer {prepared.get('path')} (sha256 "
                            f"{prepared['sha256'][:12]}), not the model's {tokenizer.path} (sha256 {sha256[:12]}): "
                            "its token ids would stand for other text. Run scripts/prepare_alpaca.py with this "
                            f"--checkpoint_dir, or pass {allow_option} true if both tokenize alike")
        longest = max(len(s["input_ids"]) for split in self.splits.values() for s in split) - 1
        if longest > config.block_size:
            raise UserError(f"{self.data_dir} holds sequences of {longest} tokens, longer than the model's "
                            f"block_size {config.block_size}: prepare it with --max_seq_length {config.block_size}")

    def check_fills_a_step(self, option: str) -> None:
        """The training set must fill an optimizer step (else every step would repeat samples, and the Trainer's
        epochs would hold no step); ``option`` names the global batch size."""
        samples = len(self.splits["train"])
        if samples < self.global_batch_size:
            raise UserError(f"{self.data_dir} has {samples} training samples, fewer than one optimizer step of "
                            f"{self.global_batch_size} ({option}): lower it, or prepare more data")

    def plan(self, split: str = "train") -> StepPlan:
        """The step plan of ``split`` on this rank (validation: one step of all its samples, on one rank)."""
        self.setup()
        samples = self.splits[split]
        step_size, (num_replicas, rank) = ((self.global_batch_size, self._replicas()) if split == "train" else
                                           (max(1, len(samples)), (1, 0)))
        return StepPlan([len(s["input_ids"]) for s in samples], [response_token_count(s) for s in samples], step_size,
                        self.micro_batch_size, self.micro_batch_tokens, self.seed, num_replicas, rank,
                        pad_to_multiple_of=self.pad_to_multiple_of)

    def train_steps(self, start_step: int = 0) -> DataLoader:
        """This rank's optimizer steps from ``start_step`` on, without end: ``([(input_ids, targets)...], tokens)``."""
        return self._loader(StepSampler(self.plan(), start_step))

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next ``train_dataloader()`` start ``epoch`` after this rank's first ``batches_done``
        micro-batches."""
        self._resume_at = (epoch, batches_done)

    def train_dataloader(self) -> DataLoader:
        """The Trainer's epochs, a micro-batch at a time: ``([(input_ids, targets)], step_tokens)``."""
        epoch, skip = self._resume_at
        return self._loader(EpochMicroBatchSampler(self.plan(), epoch, skip))

    def val_dataloader(self) -> DataLoader:
        """All validation samples sorted by length in micro-batches, dealt out to ranks: ``(input_ids, targets)``.

        Every rank gets as many micro-batches, the last ranks an empty one where they do not divide evenly (one row
        of padding that counts for nothing, as in training's ``StepPlan.step``): all ranks run the same passes and
        together validate each sample once, as one process does.
        """
        plan = self.plan("val")
        batches = plan.micro_batches(range(len(plan.lengths)), rank=0)
        num_replicas, rank = self._replicas()
        mine = batches[rank::num_replicas]
        mine += [[] for _ in range(-(-len(batches) // num_replicas) - len(mine))]
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
