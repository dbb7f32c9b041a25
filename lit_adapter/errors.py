"""The one exception type for mistakes in what the user gave us (files, options, data), and exceptions in one line."""


class UserError(ValueError):
    """A problem with the user's input. Command-line tools print its message as one line, without a traceback."""


def message_line(err: BaseException) -> str:
    """The first line of an exception's message ("" where it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def one_line(err: BaseException) -> str:
    """An exception in one line: its type and its message's first line (a ``UserError`` says enough alone)."""
    return message_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {message_line(err)}"
