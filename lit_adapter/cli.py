"""Running a typed function as a command-line tool (jsonargparse): user errors reported in one line, the shell's exit
statuses, and stop requests (Ctrl-C, SIGTERM) that a long run honours at a safe point."""

import json
import os
import re
import signal
import sys
from argparse import ArgumentError
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NoReturn, Optional

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, get_loader, set_loader, set_parsing_settings
from tqdm import tqdm

from lit_adapter.errors import UserError, message_line
from lit_adapter.files import NESTED_TOO_DEEPLY

# the strings under dataclass fields become their --help
set_parsing_settings(docstring_parse_attribute_docstrings=True)


JSONARGPARSE_YAML_LOAD = get_loader("yaml")


def yaml_load_within_depth(text: str) -> Any:
    """jsonargparse's YAML loading (config files and option values), after PyYAML's Python parser has read
    ``text``: nested thousands deep, it raises a RecursionError, reported as a YAML error in one line, where the C
    parser that jsonargparse uses would crash the process (a segmentation fault)."""
    try:
        yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError(NESTED_TOO_DEEPLY) from None
    except yaml.YAMLError:
        pass  # jsonargparse's loader says what is wrong, as before
    return JSONARGPARSE_YAML_LOAD(text)


set_loader("yaml", yaml_load_within_depth, exceptions=(yaml.YAMLError,))

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


MAX_SEED = 2**32 - 1
"""Seeds run from 0 to this (NumPy's range, which Lightning's seeding shares)."""


def check_seed(seed: int, option: str = "--seed") -> None:
    """A one-line ``UserError`` for a seed outside 0..``MAX_SEED``."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} must be a whole number from 0 to {MAX_SEED}, got {seed}")


def out_of_memory_hint(model_prefix: str = "--") -> str:
    """What to change when the GPU memory runs out; the training options are named with ``model_prefix`` ("--" for
    finetune/adapter.py, "--model." for the Trainer route, whose own options are --trainer.*)."""
    trainer = "--" if model_prefix == "--" else "--trainer."
    return (f"lower {model_prefix}train.micro_batch_size (the global batch stays the same), or use {trainer}precision "
            f"bf16-true, {model_prefix}activation_checkpointing true, or {trainer}strategy fsdp over more devices; "
            "for generation, use a shorter prompt or fewer --max_new_tokens")


PEER_ENDED = ("Connection closed by peer", "Connection reset by peer")
"""What a collective says on a process whose peer has ended (gloo)."""


@contextmanager
def exit_on_user_error(hint: Optional[str] = None) -> Iterator[None]:
    """End the program with one ``error: ...`` line (exit 1) on a user error or out-of-memory, 130 on Ctrl-C.

    Of a multi-process run, only the first process prints: a later one whose collective fails because another
    process ended (on an error it reports itself, e.g. a full disk where only the first writes) exits 1 quietly.
    """
    try:
        yield
    except UserError as err:
        fail(str(err))
    except ArgumentError as err:  # an option mistake: one line, not the usage (that is --help's)
        fail(option_error_line(str(err)) + "; see --help")
    except torch.OutOfMemoryError as err:
        fail(out_of_memory_message(err, hint or out_of_memory_hint()))
    except RuntimeError as err:  # after OutOfMemoryError, which is one
        if process_rank() == 0 or not any(message in str(err) for message in PEER_ENDED):
            raise
        end_process(EXIT_USER_ERROR)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        fail("the output was closed before it ended (e.g. by | head); stopped")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def run_cli(function: Callable, args: Optional[list[str]] = None, list_options: tuple[str, ...] = (),
            skip: tuple[str, ...] = (), defaults: Optional[dict[str, Any]] = None,
            description: Optional[str] = None) -> Any:
    """Parse the command line into ``function``'s arguments (its docstring is the ``--help``, ``description`` its
    first line if given) and call it; ``skip`` names parameters the command line does not offer, ``defaults`` other
    defaults than the function's.

    Each of ``list_options`` (e.g. ``--adapter_path``) may be followed by several values, which become one list.
    """
    args = sys.argv[1:] if args is None else args
    for option in list_options:
        args = gather_values(args, option)
    with exit_on_user_error():
        parser = ArgumentParser(exit_on_error=False, description=description)
        parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of options (--print_config writes "
                                                                       "one).")
        parser.add_function_arguments(function, as_group=False, as_positional=False, skip=set(skip), sub_configs=True)
        parser.description = parser.description or (function.__doc__ or "").split("\n\n")[0]
        parser.set_defaults(defaults or {})
        options = parser.instantiate(parser.parse_args(args))
        options.pop("config", None)
        return function(**options)


def option_error_line(message: str) -> str:
    """The parser's message about an option on one line, with the option named as it is typed (a long value it
    quotes is cut short)."""
    line = " ".join(message.split())
    line = re.sub(r'Parser key "([^"]+)":', r"--\1:", line)
    line = re.sub(r"a typing\.Literal\[([^]]*)\]", lambda m: "one of " + m[1].replace("'", ""), line)
    line = re.sub(r"'([^']{80})[^']{20,}'", r"'\1...'", line)
    return re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", line)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (once: on the first process of a multi-process run) and exit with status 1."""
    if process_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    end_process(EXIT_USER_ERROR)


def end_process(status: int) -> NoReturn:
    """Exit with ``status``. A process of a multi-process run leaves at once (its output flushed): the teardown of
    its process group can abort with "terminate called without an active exception" once a peer has gone, a line
    that would follow the first process's one error line."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def progress(items: Iterable, total: Optional[int], what: str, unit: str = "it") -> Iterable:
    """``items`` with a progress bar on stderr (rate and time left; the first process only) that goes when done."""
    return tqdm(items, total=total, desc=what, unit=unit, leave=False, dynamic_ncols=True,
                disable=process_rank() != 0)


def process_rank() -> int:
    """This process's global rank as Lightning knows it (0 where Lightning is not in use)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")  # not imported here: it is slow to load
    return getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None) or 0


def gather_values(args: list[str], option: str) -> list[str]:
    """``option a b c`` (values up to the next ``--`` option) as ``option ["a", "b", "c"]``, a list to the parser
    (also of one value; one that is a JSON list already stays as it is)."""
    if option not in args:
        return args
    start = args.index(option) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    if end == start or (end == start + 1 and args[start].startswith("[")):
        return args
    return args[:start] + [json.dumps(args[start:end])] + args[end:]


def out_of_memory_message(err: BaseException, hint: str) -> str:
    """One line for a device out-of-memory error: what ran out, and ``hint`` on what to change."""
    detail = message_line(err).split(". Of the allocated")[0]
    return f"out of GPU memory ({detail}): {hint}"


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag that the loop checks after each optimizer step (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
