"""Running a typed function as a command-line tool (jsonargparse), with user errors reported in one line."""

import sys
from typing import Any, Callable, Optional

from jsonargparse import CLI, set_parsing_settings

from lit_adapter.errors import UserError

# the strings under dataclass fields become their --help
set_parsing_settings(docstring_parse_attribute_docstrings=True)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def run_cli(function: Callable, args: Optional[list[str]] = None) -> Any:
    """Parse the command line into ``function``'s arguments (its docstring is the ``--help``) and call it."""
    try:
        return CLI(function, as_positional=False, args=args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
