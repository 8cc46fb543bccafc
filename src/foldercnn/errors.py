"""The one exception type users see: a clear message, never a traceback."""


class FolderCNNError(Exception):
    """A problem with the user's input (folders, images, model files, options)."""


class OptionError(FolderCNNError):
    """A bad value of a named option. The message names the option as Python callers spell it
    (`val_fraction`); the command line shows its flag (`--val-fraction`) instead."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem
