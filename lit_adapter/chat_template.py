"""A model's chat template (Jinja2, as Hugging Face transformers renders it), compiled once and rendered in a
sandbox with limits: a template from a downloaded checkpoint cannot reach Python objects, loop for ever or fill the
memory. What it cannot render is a one-line ``UserError``."""

import re
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Iterator, Optional

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_adapter.errors import UserError, one_line

MAX_OUTPUT = 16 * 2**20
"""Characters a rendering may write (a conversation's text, far beyond any context)."""
MAX_STEPS = 10**6
"""Loop iterations over ``range`` a rendering may take."""
MAX_SECONDS = 10.0
"""Seconds a rendering may take."""
WIDENING_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
WIDENING_FILTERS = ("center", "indent", "wordwrap", "format")
"""String methods and filters whose numbers (or format strings) can make a text of any size."""
FORMAT_SPECS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*([\d*]*(?:\.[\d*]*)?)|\{[^{}]*?:([^{}]*)\}")
"""The width and precision part of each field of a %-format or a {}-format string."""


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
            raise UserError(f"the chat template of {budget.what} cannot be rendered: {one_line(err)}") from None
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
    """Jinja2's sandbox with transformers' template options, where ``range`` counts steps, and ``*``, ``**``,
    formatting, padding and replacing refuse to make what no chat prompt needs (before they allocate it)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, what: str) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.what, self.rendering = what, threading.local()  # renderings in several threads keep own budgets
        self.globals["raise_exception"] = _raise_exception
        self.globals["range"] = lambda *args: _CountedRange(self.rendering.budget, *args)
        for name in WIDENING_FILTERS:
            self.filters[name] = self.bounded(self.filters[name])

    def bounded(self, function: Callable) -> Callable:
        """``function`` refusing widths and format fields larger than any chat prompt."""
        def call(*args: Any, **kwargs: Any) -> Any:
            self.check_sizes(*args, *kwargs.values())
            return function(*args, **kwargs)
        return call

    def check_sizes(self, *values: Any) -> None:
        """Refuse an int, or a width in a format string, above ``MAX_OUTPUT``."""
        sizes = [v for v in values if isinstance(v, int)]
        sizes += [int(n) for v in values if isinstance(v, str) for spec in FORMAT_SPECS.findall(v)
                  for n in re.findall(r"\d+", "".join(spec))]
        if any(size > MAX_OUTPUT for size in sizes):
            raise UserError(f"the chat template of {self.what} pads or formats to {max(sizes)} characters: refused")

    def wrap_str_format(self, value: Any) -> Optional[Callable[..., str]]:
        """Jinja's ``str.format`` and ``format_map`` for templates, with widths checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        self.check_sizes(value.__self__)  # the format string's own widths
        return self.bounded(wrapped)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's names)
        method = getattr(__obj, "__name__", None)
        if isinstance(getattr(__obj, "__self__", None), str):
            if method in WIDENING_METHODS:
                __self.check_sizes(__obj.__self__, *args, *kwargs.values())
            elif method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                text, old, new = __obj.__self__, args[0], args[1]
                grown = len(text) + (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0)
                if grown > MAX_OUTPUT:
                    raise UserError(f"the chat template of {__self.what} makes a text of {grown} characters: refused")
        return super().call(__context, __obj, *args, **kwargs)

    def start(self) -> _Budget:
        """A new rendering's budget (in this thread)."""
        self.rendering.budget = _Budget(self.what)
        return self.rendering.budget

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and isinstance(left, str):
            self.check_sizes(left, *(right if isinstance(right, tuple) else (right,)))
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

