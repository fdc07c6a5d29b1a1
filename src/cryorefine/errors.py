"""User-facing errors: one line naming the file and the fix; the CLI prints them without a traceback."""


class CryoInputError(Exception):
    """A problem with the user's input (file, flag, data) that the user can fix."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        text = message if self.path is None else f"{self.path}: {message}"
        super().__init__(text.replace("\n", " "))


class DistributedError(Exception):
    """Another rank of a torchrun job died, hung or was stopped: this rank stops too (resume with --continue)."""
