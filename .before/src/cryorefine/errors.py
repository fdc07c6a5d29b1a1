"""User-facing errors: one line naming the file and the fix; the CLI prints them without a traceback."""


class CryoInputError(Exception):
    """A problem with the user's input (file, flag, data) that the user can fix."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        text = message if self.path is None else f"{self.path}: {message}"
        super().__init__(_one_line(text))


def _one_line(text: str) -> str:
    """Line breaks as spaces, other unprintable characters (a damaged file's bytes in a name or value) escaped: one line
    on any terminal, which interprets none of them."""
    text = text.replace("\r\n", " ").replace("\n", " ")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class DistributedError(Exception):
    """Another rank of a torchrun job died, hung or was stopped: this rank stops too (resume with --continue)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside torchrun (``kill PID``, a batch system's stop): raised in the main thread as Ctrl-C is, so that
    the run ends as after Ctrl-C (the files being written finished, the output lock released); the CLI exits 143."""
