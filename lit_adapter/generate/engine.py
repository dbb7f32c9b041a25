"""The batch engine: continuous batching on one base model, each request with its own adapter, sampling options,
stop tokens and length.

The KV cache has ``max_batch`` rows (slots) of ``max_seq_length`` positions. Each engine step admits waiting jobs
into free slots, prefills at most ``prefill_chunk`` prompt tokens of the jobs being admitted (a long prompt over
several steps, so running rows never wait for more than about one step), then decodes one token for every running
row; a row leaves as soon as its job ends, and its slot takes a new job at the next step. The decode step works on
the rows 0..b-1 and positions 0..L-1 of the cache, b and L rounded up to buckets, and on a GPU it is replayed as one
CUDA graph per bucket (``GraphDecode``). Sampling options and seeds live in device tensors, one value per row.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lit_adapter.adapter import AdapterLLaMA
from lit_adapter.generate.decode import DecodeFn, GraphDecode, decode_one_token
from lit_adapter.generate.sampling import check_token, sample, seeded_noise
from lit_adapter.model import CacheView, LLaMA

SEED_RANGE = 1 << 62
"""Seeds are reduced to this range (the hash multiplies them in int64)."""


class QueueFull(Exception):
    """The engine holds as many jobs as it may; the job was not taken."""


@dataclass
class Sampling:
    """How a job draws its tokens: greedy at temperature 0; ``seed`` makes the draws repeatable (None: random)."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None


@dataclass(eq=False)
class Job:
    """One request to the engine and what it has produced. ``on_token`` receives each new token id and
    ``on_finish`` the job once it has ended (both on the engine's thread); ``adapter`` None is the base model."""

    prompt: torch.Tensor
    max_new_tokens: int
    adapter: Optional[int] = None
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    on_token: Optional[Callable[[int], None]] = None
    on_finish: Optional[Callable[["Job"], None]] = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    """"stop" (a stop token came), "length", "cancelled" or "error"."""
    error: Optional[BaseException] = None
    submitted_at: float = 0.0
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    finished_step: Optional[int] = None
    cancelled: bool = False


class Engine:
    """Runs jobs in a continuously refilled batch: ``submit`` them (from any thread), then ``step`` (or ``run``)."""

    def __init__(self, model: LLaMA, max_batch: int, max_seq_length: int, decode_fn: Optional[DecodeFn] = None,
                 prefill_chunk: int = 512, length_bucket: int = 256, max_waiting: Optional[int] = None) -> None:
        self.model, self.max_batch, self.max_seq_length = model, max_batch, max_seq_length
        self.prefill_chunk, self.length_bucket, self.max_waiting = prefill_chunk, length_bucket, max_waiting
        self.device = model.embed.weight.device
        self.decode_fn = decode_fn or (GraphDecode() if self.device.type == "cuda" else decode_one_token)
        self.adapters = isinstance(model, AdapterLLaMA)
        model.set_kv_cache(max_batch, max_seq_length)
        self.slots: list[Optional[Job]] = [None] * max_batch
        self.prefilled = [0] * max_batch
        self.positions = [0] * max_batch  # the host's copy of ``position``: no wait for the device to read it
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.steps = 0
        self.pending: Optional[tuple[list[Optional[Job]], torch.Tensor, Any]] = None
        """The launched decoding step whose tokens are not handed out yet: see ``decode``."""
        self.generator = torch.Generator().manual_seed(int(torch.randint(SEED_RANGE, ()).item()))
        rows = (max_batch, 1)
        self.token = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.active = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.temperature = torch.zeros(rows, device=self.device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.top_p = torch.ones(rows, device=self.device)
        self.seeds = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.row_adapters: list[Optional[int]] = [None] * max_batch  # None: the base model

    # ---------------------------------------------------------------------------------------------- jobs

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` where ``max_waiting`` jobs already wait for a row beyond the free ones."""
        if job.prompt.numel() < 1 or job.max_new_tokens < 1:
            raise ValueError("a job needs a prompt of at least one token and max_new_tokens of at least 1")
        if job.prompt.numel() + job.max_new_tokens > self.max_seq_length:
            raise ValueError(f"prompt ({job.prompt.numel()} tokens) + max_new_tokens ({job.max_new_tokens}) exceed "
                             f"the engine's {self.max_seq_length} positions per request")
        with self.lock:
            beyond_free_rows = len(self.waiting) - self.slots.count(None)
            if self.max_waiting is not None and beyond_free_rows >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests wait for {self.max_batch} rows")
            job.submitted_at = time.perf_counter()
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """End ``job`` at the next step (its slot is freed); a finished job stays as it is."""
        job.cancelled = True
        with self.lock:
            self.lock.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(job is not None for job in self.slots)

    def run(self, stop: threading.Event) -> None:
        """Step while there is work, wait while there is none, until ``stop`` is set (then finish what runs)."""
        while True:
            with self.lock:
                while not self.busy and not stop.is_set():
                    self.lock.wait(timeout=0.5)
            if not self.busy and stop.is_set():
                return
            self.step()

    def run_until_done(self) -> None:
        """Step until every submitted job has ended."""
        while self.busy:
            self.step()
        self.pending = None

    # ---------------------------------------------------------------------------------------------- one step

    @torch.no_grad()
    def step(self) -> None:
        """Free the slots of cancelled jobs, admit waiting jobs, prefill, launch the decoding of one token per running
        row, then hand out the tokens of the step before: the device computes while the host does its part."""
        self.steps += 1
        for slot, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self.finish(slot, "cancelled")
        self.admit()
        rows = self.rows_to_prefill()
        try:
            if rows:
                self.prefill(rows)
        except Exception:  # prefilled one by one, so that only the job that fails ends
            for slot in rows:
                self.run_job_part(slot, lambda: self.prefill([slot]))
        launched = self.decode()
        if self.pending is not None:
            self.hand_out(*self.pending)
        self.pending = launched

    def rows_to_prefill(self) -> list[int]:
        """The adjacent rows, prefilled in one pass, around the row whose job has waited longest for its prefill."""
        admitting = [slot for slot in range(self.max_batch) if self.slots[slot] is not None and self.prefilling(slot)]
        if not admitting:
            return []
        first = last = min(admitting, key=lambda slot: self.slots[slot].submitted_at)
        while first - 1 in admitting:
            first -= 1
        while last + 1 in admitting:
            last += 1
        return list(range(first, last + 1))

    def admit(self) -> None:
        """Give waiting jobs the free slots, lowest first (the decode step then works on fewer rows)."""
        with self.lock:
            for slot in range(self.max_batch):
                if self.slots[slot] is None and self.waiting:
                    self.slots[slot], self.prefilled[slot] = self.waiting.popleft(), 0
                    if self.slots[slot].cancelled:
                        self.finish(slot, "cancelled")
                        continue
                    self.set_row(slot, self.slots[slot])

    def set_row(self, slot: int, job: Job) -> None:
        """The row's sampling options, seed and adapter; it does not decode until its prompt is prefilled."""
        s = job.sampling
        seed = s.seed if s.seed is not None else int(torch.randint(SEED_RANGE, (), generator=self.generator))
        self.temperature[slot], self.top_p[slot], self.seeds[slot] = s.temperature, s.top_p, seed % SEED_RANGE
        self.top_k[slot] = self.model.config.vocab_size if s.top_k is None else s.top_k
        self.row_adapters[slot] = job.adapter
        if self.adapters:  # the prompt keys/values are computed afresh by the next forward (a prefill)
            self.model.select_adapters(self.row_adapters)

    def prefilling(self, slot: int) -> bool:
        return self.prefilled[slot] < self.slots[slot].prompt.numel()

    def decoding(self, slot: int) -> bool:
        return self.slots[slot] is not None and not self.prefilling(slot)

    def prefill(self, rows: list[int]) -> None:
        """Prefill the next prompt tokens of the jobs in ``rows`` (adjacent), at most ``prefill_chunk`` in all, in one
        pass; a job whose prompt is then complete draws its first token. Rows are right-padded to the longest part:
        the padding's keys and values lie beyond each row's prompt, and are written over before anything attends to
        them."""
        starts = [self.prefilled[slot] for slot in rows]
        remaining = [self.slots[slot].prompt.numel() - start for slot, start in zip(rows, starts)]
        width = min(max(remaining), max(1, self.prefill_chunk // len(rows)))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (slot, start) in enumerate(zip(rows, starts)):
            part = self.slots[slot].prompt[start:start + width]
            ids[i, :part.numel()] = part
        positions = (torch.tensor(starts)[:, None] + torch.arange(width)).clamp_(max=self.max_seq_length - 1)
        lengths = [min(width, left) for left in remaining]
        done = [i for i, (length, left) in enumerate(zip(lengths, remaining)) if length == left]
        at = (torch.tensor(done, dtype=torch.long), torch.tensor([lengths[i] - 1 for i in done], dtype=torch.long))
        view = CacheView(rows[0], rows[-1] + 1, int(positions.max()) + 1)
        logits = self.model(ids.to(self.device), positions.to(self.device),
                            logits_at=tuple(t.to(self.device) for t in at), view=view)
        for slot, start, length in zip(rows, starts, lengths):
            self.prefilled[slot] = self.positions[slot] = start + length
            self.position[slot] = start + length  # a decode step over this row before it decodes writes here
        if done:
            self.first_tokens([rows[i] for i in done], logits)

    def first_tokens(self, slots: list[int], logits: torch.Tensor) -> None:
        """Draw the first token of each job in ``slots`` (their prompts prefilled) from its last prompt logits."""
        index = torch.tensor(slots, device=self.device)
        noise = seeded_noise(self.seeds[index], self.position[index], logits.size(-1))
        first = sample(logits, self.temperature[index], self.top_k[index], self.top_p[index], noise)
        self.token[index] = first
        self.active[index] = 1
        for slot, token in zip(slots, first[:, 0].tolist()):
            self.run_job_part(slot, lambda: self.accept(slot, token))

    def decode(self) -> Optional[tuple[list[Optional[Job]], torch.Tensor, Any]]:
        """Launch one token for every decoding row that needs one more (its job's last may still be in flight), in
        the smallest bucket of rows and positions that holds them; return the rows' jobs, the tokens' pinned host
        copy and the event that marks it done (None: nothing to decode)."""
        rows_needed = [slot for slot in range(self.max_batch) if self.decoding(slot) and
                       len(self.slots[slot].tokens) + self.in_flight(slot) < self.slots[slot].max_new_tokens]
        if not rows_needed:
            return None
        b = min(size for size in bucket_sizes(self.max_batch) if size > rows_needed[-1])
        longest = max(self.positions[:b]) + 1
        length = min(self.max_seq_length, -(-longest // self.length_bucket) * self.length_bucket)
        rows, jobs = slice(0, b), [self.slots[slot] if slot in rows_needed else None for slot in range(b)]
        decoding = [job for job in jobs if job is not None]
        greedy = all(job.sampling.temperature == 0 for job in decoding)
        filtering = any(job.sampling.top_k is not None or job.sampling.top_p < 1 for job in decoding)
        try:
            tokens = self.decode_fn(self.model, self.token[rows], self.position[rows],
                                    0.0 if greedy else self.temperature[rows],
                                    self.top_k[rows] if filtering else None, self.top_p[rows] if filtering else 1.0,
                                    None if greedy else self.seeds[rows], CacheView(0, b, length))
        except Exception as err:  # the step of all rows failed: their jobs end, the engine goes on
            for slot in rows_needed:
                self.finish(slot, "error", err)
            return None
        self.token[rows] = tokens
        self.position[rows] += self.active[rows]
        for slot in rows_needed:
            self.positions[slot] += 1
        host = torch.empty(tokens.shape, dtype=torch.long, pin_memory=self.device.type == "cuda")
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()
        return jobs, host, done

    def in_flight(self, slot: int) -> int:
        """Tokens of the job in ``slot`` computed by the launched step but not handed out yet (0 or 1)."""
        return int(self.pending is not None and slot < len(self.pending[0]) and
                   self.pending[0][slot] is self.slots[slot])

    def hand_out(self, jobs: list[Optional[Job]], host: torch.Tensor, done: Any) -> None:
        """Give each job of a finished decoding step its token (jobs that ended since are passed over)."""
        if done is not None:
            done.synchronize()
        for slot, token in enumerate(host[:, 0].tolist()):
            if jobs[slot] is not None and self.slots[slot] is jobs[slot]:
                self.run_job_part(slot, lambda: self.accept(slot, token))

    def accept(self, slot: int, token: int) -> None:
        """Give the job in ``slot`` its new token; end it at a stop token or its length."""
        job = self.slots[slot]
        job.first_token_at = job.first_token_at or time.perf_counter()
        if check_token(token) in job.stop_ids:
            self.finish(slot, "stop")
            return
        job.tokens.append(token)
        if job.on_token is not None:
            job.on_token(token)
        if len(job.tokens) == job.max_new_tokens:
            self.finish(slot, "length")

    def run_job_part(self, slot: int, part: Callable[[], None]) -> None:
        """Run one job's part of a step; if it fails, that job ends with the error and every other goes on."""
        try:
            part()
        except Exception as err:
            self.finish(slot, "error", err)

    def finish(self, slot: int, reason: str, error: Optional[BaseException] = None) -> None:
        """End the job in ``slot`` (if it has not ended) and free the slot."""
        job = self.slots[slot]
        if job is None:
            return
        self.slots[slot] = None
        self.active[slot], self.position[slot], self.positions[slot] = 0, 0, 0
        job.finish_reason, job.error = reason, error
        job.finished_at, job.finished_step = time.perf_counter(), self.steps
        if job.on_finish is not None:
            job.on_finish(job)


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes the decode step runs at: powers of two below ``max_batch``, and ``max_batch``."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]
