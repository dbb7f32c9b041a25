"""The batch engine behind the HTTP API: one thread steps the engine, requests become jobs, and each job's tokens
come back to the request's event loop as text. Model names, prompts in each model's style, and the per-request log
line live here too."""

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Optional

import torch

from lit_adapter.errors import UserError
from lit_adapter.generate.adapters import AdapterSet
from lit_adapter.generate.decode import TextStream
from lit_adapter.generate.engine import Engine, Job, QueueFull, Sampling
from lit_adapter.prompts import Message, chat_style_for, get_style
from lit_adapter.serve.api import APIError
from lit_adapter.tokenizer import Tokenizer

log = logging.getLogger("lit_adapter.serve")


class ModelServer:
    """Serves a base model (named ``base_name``) and its ``adapters`` (by their names) through one ``engine``."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, adapters: AdapterSet, base_name: str) -> None:
        self.engine, self.tokenizer, self.adapters, self.base_name = engine, tokenizer, adapters, base_name
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=engine.run, args=(self.stopping,), name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Let the engine finish what it runs, then end its thread."""
        self.stopping.set()
        self.thread.join()

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters.names]

    def adapter(self, model: str) -> Optional[int]:
        """The adapter that ``model`` names (None: the base model); an unknown name is a 404."""
        if model == self.base_name:
            return None
        if model not in self.adapters.names:
            raise APIError(404, f"The model {model!r} does not exist; served: {', '.join(self.model_names())}",
                           param="model", code="model_not_found")
        return self.adapters.index(model)

    def chat_prompt(self, model: str, messages: list[Message]) -> torch.Tensor:
        """The ids of ``messages`` in the prompt style of ``model``: an adapter's own, the base's chat template."""
        adapter = self.adapter(model)
        style = chat_style_for(self.tokenizer) if adapter is None else self.adapters.styles[adapter]
        try:
            return get_style(style).encode(self.tokenizer, messages)
        except UserError as err:
            raise APIError(400, str(err), param="messages") from None

    def text_prompt(self, text: str) -> torch.Tensor:
        """The ids of a text to continue as it is."""
        try:
            return self.tokenizer.encode(text)
        except UserError as err:
            raise APIError(400, str(err), param="prompt") from None

    def submit(self, model: str, prompt: torch.Tensor, max_tokens: Optional[int], sampling: Sampling,
               stop: list[str]) -> "Answer":
        """Queue a job for ``model``: 400 where it cannot fit the context, 429 where the queue is full."""
        room = self.engine.max_seq_length - prompt.numel()
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"This model's context holds {self.engine.max_seq_length} tokens; the prompt has "
                                f"{prompt.numel()} and max_tokens asks for {max_tokens or 'at least 1'} more",
                           param="messages", code="context_length_exceeded")
        answer = Answer(self, model, prompt, stop)
        answer.job = Job(prompt, max_tokens or room, self.adapter(model), sampling, self.tokenizer.stop_ids,
                         on_token=answer.receive, on_finish=lambda job: answer.receive(None))
        try:
            self.engine.submit(answer.job)
        except QueueFull as err:
            raise APIError(429, f"The server is busy ({err}); retry later", type="rate_limit_exceeded",
                           code="rate_limit_exceeded") from None
        return answer


class Answer:
    """A job's answer as text pieces on the submitting event loop. Leaving ``pieces`` early (a stop string, a client
    that disconnects) cancels the job, which frees its slot at the engine's next step."""

    def __init__(self, server: ModelServer, model: str, prompt: torch.Tensor, stop: list[str]) -> None:
        self.server, self.model, self.prompt_tokens = server, model, prompt.numel()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(server.tokenizer, stop)
        self.job: Job
        self.finish_reason = "length"
        self.outcome = "disconnected"
        """How the request ended, for the log: its finish reason, "error", or "disconnected" (the client left)."""

    def receive(self, token: Optional[int]) -> None:
        """A token (None: the end) from the engine's thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    @property
    def completion_tokens(self) -> int:
        return len(self.job.tokens)

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while (token := await self.queue.get()) is not None:
                piece = self.text.push(token)
                if piece:
                    yield piece
                if self.text.stopped:
                    break
            if self.job.finish_reason == "error":
                self.outcome = "error"
                log.error("request model=%s failed: %r", self.model, self.job.error)
                raise APIError(500, f"The request failed: {self.job.error}", type="server_error")
            piece = self.text.finish()
            if piece:
                yield piece
            self.finish_reason = "stop" if self.text.stopped or self.job.finish_reason == "stop" else "length"
            self.outcome = self.finish_reason
        finally:
            if self.job.finished_at is None:
                self.server.engine.cancel(self.job)
            self.log()

    def log(self) -> None:
        """One line for the request: model, tokens, time to first token, speed, how it ended, engine step."""
        job, engine = self.job, self.server.engine
        started, end = job.first_token_at, job.finished_at or time.perf_counter()
        first = started - job.submitted_at if started else float("nan")
        speed = self.completion_tokens / (end - started) if started and end > started else float("nan")
        log.info("request model=%s prompt_tokens=%d answer_tokens=%d first_token_s=%.3f tokens_per_s=%.1f "
                 "finish=%s step=%d", self.model, self.prompt_tokens, self.completion_tokens, first, speed,
                 self.outcome, job.finished_step or engine.steps)
