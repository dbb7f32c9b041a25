"""Length-aware batching of a prepared set: which samples make each optimizer step and how each rank cuts its
share into micro-batches (``StepPlan``), the samplers that serve the steps, and collation into padded tensors."""

import itertools
import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from lit_adapter.errors import UserError

IGNORE_INDEX = -100
"""Label of positions that do not count in the loss (``torch.nn.functional.cross_entropy``'s default)."""
PAD_TO_MULTIPLE_OF = 8
"""Micro-batch lengths are rounded up to this, which GPU kernels run faster on (bench/RESULTS.md)."""

Sample = dict[str, torch.Tensor]
"""A tokenized sample: ``input_ids`` and ``labels`` (int64, ``IGNORE_INDEX`` where nothing is learned)."""

Step = tuple[list[list[int]], int]
"""One optimizer step on one rank: its micro-batches (sample indices) and the step's response tokens on all ranks."""


class StepPlan:
    """Which samples make each optimizer step, and how this rank cuts its share into micro-batches.

    All epochs form one stream of samples: epoch e is a permutation of all indices (generator seeded with
    ``seed + e``), cut into chunks of ``steps_per_chunk`` steps (64, near Hugging Face's mega-batches of 50: on
    Alpaca half the padding of 16), each chunk sorted by length and cut into step-sized blocks, the full blocks
    shuffled (the one holding the longest sample first, so an out-of-memory shows at once) and a partial block
    (the last chunk's shortest samples) last. Step k holds the stream's samples ``[k * step_size, (k + 1) *
    step_size)``: every step has exactly ``step_size`` samples, every sample is in each epoch once, and a step
    may straddle two epochs. Nothing of this depends on the number of ranks or on the micro-batch settings.

    Rank r takes every ``num_replicas``-th sample of the step, longest first, and cuts its share into
    micro-batches of at most ``micro_batch_size`` samples and (where given) ``micro_batch_tokens`` padded
    tokens; a sample longer than the token budget gets a micro-batch of its own. A rank whose share makes fewer
    micro-batches than another's gets empty ones too (``step``), so that every rank runs as many passes.
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

    def micro_batches(self, samples: Sequence[int], rank: int) -> list[list[int]]:
        """The share of ``rank`` of a step's ``samples``, longest first, cut into micro-batches.

        With a token budget, the cut is evened out: the smallest budget that needs no more micro-batches than
        ``micro_batch_tokens`` does is used, so no micro-batch is left nearly empty (a GPU idles on those).
        """
        mine = sorted(samples, key=self.lengths.__getitem__, reverse=True)[rank::self.num_replicas]
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
        """This rank's micro-batches of ``step`` and the response tokens of the whole step.

        Every rank gets as many micro-batches as the rank with the most: the others' are filled up with empty ones
        (``collate`` makes one row of padding of each, which counts for nothing). All ranks thus run the same
        forward and backward passes, and the collectives in them (FSDP gathers the weights in each): with uneven
        counts, a rank would wait for ever for one that has finished its step.
        """
        samples = self.step_samples(step)
        shares = [self.micro_batches(samples, rank) for rank in range(self.num_replicas)]
        mine = shares[self.rank] + [[] for _ in range(max(map(len, shares)) - len(shares[self.rank]))]
        return mine, sum(self.response_tokens[i] for i in samples)


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
        steps = range(self.plan.first_step(self.epoch), self.plan.first_step(self.epoch + 1))
        items = (([batch], tokens) for step in steps for batches, tokens in [self.plan.step(step)] for batch in batches)
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
    ``max_seq_length - 1`` (or that rounded up). No ``samples`` (a rank's filler, ``StepPlan.step``) give one row
    of padding whose targets are all ignored: it adds nothing to a loss, a token count or a gradient.
    """
    width = max((len(s["input_ids"]) for s in samples), default=2) - 1
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((max(len(samples), 1), width), pad_id, dtype=torch.long)
    targets = torch.full((max(len(samples), 1), width), ignore_index, dtype=torch.long)
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
