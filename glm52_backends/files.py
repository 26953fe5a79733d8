"""Writing files all or nothing: every file the package writes (checkpoints, reports, plans).

A file is written under a temporary name in its own folder and renamed over the target once it is
complete (`os.replace`, atomic on POSIX and Windows within one file system): a full disk, a crash or
Ctrl-C part way leaves the previous file as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(file: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name beside `file`; on success it is renamed to `file` (atomic), on
    failure (any exception, Ctrl-C too) removed: a reader never sees a half-written file."""
    file = os.fspath(file)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file) or ".", prefix="." + os.path.basename(file) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(file: str | os.PathLike, text: str, *, make_parents: bool = True) -> None:
    """`text` into `file` (UTF-8), atomically: the file is replaced whole or left as it was."""
    file = os.fspath(file)
    if make_parents:
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    with atomic_path(file) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())           # on disk before the rename makes it the file


def regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (following links). Reading a FIFO, a socket or a device would block or
    never end, so readers check this before they open a path a user gave."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
