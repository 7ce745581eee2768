"""The one-line error contract (docs/DESIGN.md 3): bad input or a failed write ends with ``error: <file>: <problem>``
and exit code 2, nothing overwritten; text from files others made is shown with control characters escaped."""

from __future__ import annotations

import errno
import os
import re


class InputError(Exception):
    """Bad user input: reported as one line naming the file and the problem, exit code 2."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    def __reduce__(self):  # picklable: an error raised in a worker process reaches the parent intact
        return (type(self), (self.path, self.problem))


# control characters (C0 but newline and tab, DEL, C1) and the bidirectional overrides: what model or bank text
# must not send to a terminal as is (escape sequences set the window title, write the clipboard, clear the screen)
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with every control character replaced by a visible escape (ESC -> ``\\x1b``, U+202E ->
    ``\\u202e``); newlines and tabs stay.  For text printed to a terminal."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                           text)


FS_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
              errno.EFBIG}


class WriteError(InputError):
    """A write that failed (read-only or full file system, permissions): one line naming the file."""


def write_failed(path: str | os.PathLike, e: OSError) -> WriteError:
    why = e.strerror or type(e).__name__
    return WriteError(path, f"cannot write ({why}); nothing was replaced")


_FS_MESSAGES = (("No space left on device", "No space left on device"), ("os error 28", "No space left on device"),
                ("Read-only file system", "Read-only file system"), ("os error 30", "Read-only file system"),
                ("Disk quota exceeded", "Disk quota exceeded"), ("PytorchStreamWriter failed", "write failed, disk full?"),
                ("file write failed", "write failed, disk full?"))


def as_write_error(e: BaseException, path: str | os.PathLike) -> WriteError | None:
    """A failed write from any library (OSError, safetensors' SafetensorError, torch's RuntimeError) as a
    WriteError naming ``path``; None when ``e`` is not a file-system fault."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno in FS_ERRNOS:
        return write_failed(getattr(e, "filename", None) or path, e)
    text = str(e)
    for needle, why in _FS_MESSAGES:
        if needle in text:
            return WriteError(path, f"cannot write ({why}); nothing was replaced")
    return None
