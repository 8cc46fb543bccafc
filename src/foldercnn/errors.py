"""The one exception type users see: a clear message, never a traceback."""


class FolderCNNError(Exception):
    """A problem with the user's input (folders, images, model files, options)."""
