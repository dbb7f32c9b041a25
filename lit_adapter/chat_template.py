"""A model's chat template (Jinja2, as Hugging Face transformers renders it), compiled once and rendered in a
sandbox with limits: a template from a downloaded checkpoint cannot reach Python objects, loop for ever or fill the
memory. What it cannot render is a one-line ``UserError``."""

import threading
import time
from collections.abc import Sequence
from typing import Any, Iterator

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_adapter.errors import UserError

MAX_OUTPUT = 16 * 2**20
"""Characters a rendering may write (a conversation's text, far beyond any context)."""
MAX_STEPS = 10**6
"""Loop iterations over ``range`` a rendering may take."""
MAX_SECONDS = 10.0
"""Seconds a rendering may take."""


class ChatTemplate:
    """A chat template compiled from ``source`` (named ``what`` in messages)."""

    def __init__(self, source: Any, what: str) -> None:
        if not isinstance(source, str):
            raise UserError(f"the chat template of {what} is not text (a {type(source).__name__}): fix or remove it")
        self.environment = _BoundedSandbox(what)
        try:
            self.template = self.environment.from_string(source)
        except TemplateError as err:
            raise UserError(f"the chat template of {what} is not a valid Jinja2 template: {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
        """The conversation as the template writes it; ``raise_exception`` in it becomes a ``UserError``."""
        budget, written = self.environment.start(), []
        try:
            for chunk in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token):
                budget.write(len(chunk))
                written.append(chunk)
        except UserError:
            raise
        except (RecursionError, MemoryError):
            raise UserError(f"the chat template of {budget.what} recurses or grows without bound") from None
        except Exception as err:  # the template is code from the checkpoint: whatever it raises is its fault
            raise UserError(f"the chat template of {budget.what} cannot be rendered: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return "".join(written)


class _Budget:
    """What one rendering may still spend: time, ``range`` steps and characters written."""

    def __init__(self, what: str) -> None:
        self.what, self.deadline, self.steps, self.size = what, time.monotonic() + MAX_SECONDS, 0, 0

    def write(self, size: int) -> None:
        self.size += size
        if self.size > MAX_OUTPUT:
            raise UserError(f"the chat template of {self.what} writes more than {MAX_OUTPUT} characters: it cannot "
                            "be a chat prompt")
        self.check_time()

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise UserError(f"the chat template of {self.what} loops more than {MAX_STEPS} times: it cannot be a "
                            "chat prompt")
        if self.steps % 1024 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise UserError(f"the chat template of {self.what} takes more than {MAX_SECONDS:.0f} s to render: it "
                            "cannot be a chat prompt")


class _CountedRange(Sequence):
    """``range`` for templates: each step taken counts against the rendering's budget."""

    def __init__(self, budget: _Budget, *args: int) -> None:
        self.budget, self.range = budget, range(*args)

    def __len__(self) -> int:
        return len(self.range)

    def __getitem__(self, index: Any) -> Any:
        return self.range[index]

    def __iter__(self) -> Iterator[int]:
        for value in self.range:
            self.budget.step()
            yield value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's sandbox with transformers' template options, where ``range`` counts steps and ``*`` and ``**``
    refuse to make what no chat prompt needs."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, what: str) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.what, self.rendering = what, threading.local()  # renderings in several threads keep own budgets
        self.globals["raise_exception"] = _raise_exception
        self.globals["range"] = lambda *args: _CountedRange(self.rendering.budget, *args)

    def start(self) -> _Budget:
        """A new rendering's budget (in this thread)."""
        self.rendering.budget = _Budget(self.what)
        return self.rendering.budget

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise UserError(f"the chat template of {self.what} raises a number to the power {right}: refused")
        if operator == "*" and isinstance(left, int) and not isinstance(right, int):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) and \
                len(left) * right > MAX_OUTPUT:
            raise UserError(f"the chat template of {self.what} makes a sequence of {len(left) * right} items: "
                            "refused")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise UserError(f"chat template: {message}")

