"""Opening a file that someone else named, without letting it hang the reader.

Opening a FIFO for reading blocks until a writer comes, reading a terminal blocks until
someone types, and a device can be read forever. `open_regular` opens a path only if it is
a regular file (after following symlinks), checks that again on the descriptor it got
(the path may have been swapped between the two), and never blocks in `open` itself.
Used by the score job for every image path and by contract/trust.py for signature
bundles.
"""

import os
import stat
from typing import BinaryIO

KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotRegularFile(OSError):
    """The path is there but is not a regular file (a folder, a FIFO, a socket, a device)."""

    def __init__(self, path: str, mode: int) -> None:
        kind = KINDS.get(stat.S_IFMT(mode), "not a file")
        super().__init__(f"not a regular file: {kind}")
        self.filename = path
        self.strerror = f"not a regular file ({kind})"


def open_regular(path: str | os.PathLike) -> tuple[BinaryIO, int]:
    """`path` opened for reading, and its size; NotRegularFile unless it is a regular
    file, OSError as `open` raises it otherwise (ELOOP for a symlink loop, ENOENT for a
    dangling link, EACCES)."""
    mode = os.stat(path).st_mode  # follows symlinks, as open does
    if not stat.S_ISREG(mode):
        raise NotRegularFile(os.fspath(path), mode)  # never opened: a device's open may act
    # O_NONBLOCK: should the path have become a FIFO since the stat, open returns at once
    # instead of waiting for a writer (it changes nothing for a regular file's reads).
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(os.fspath(path), info.st_mode)
        return os.fdopen(descriptor, "rb"), info.st_size
    except BaseException:
        os.close(descriptor)
        raise
