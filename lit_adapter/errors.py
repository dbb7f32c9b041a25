"""The one exception type for mistakes in what the user gave us (files, options, data)."""


class UserError(ValueError):
    """A problem with the user's input. Command-line tools print its message as one line, without a traceback."""
