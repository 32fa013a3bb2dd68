"""Files only livesplice's own user may write: the journal, the service's store and cache.

root's livesplice reads these files back and acts on them (undo writes what the journal
says; the agent applies what the store lists), so a local user must not be able to plant or
change one: directories are created 0700 and accepted only when owned by us, not writable by
others and not symlinks; files are written atomically (temporary file, fsync, rename) and
read with ``O_NOFOLLOW``, accepted only when regular, ours and not too large.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class PrivateFileError(OSError):
    """A private directory or file is missing, not ours, or not what it should be."""


def private_dir(path: Path, *, create: bool) -> Path:
    """``path`` as a directory owned by us, not writable by others, not a symlink."""
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PrivateFileError(f"{path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateFileError(f"{path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PrivateFileError(f"{path} is not private to uid {os.geteuid()}")
    return path


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` (in a private directory) with ``data``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


def read_private(path: Path, limit: int) -> bytes:
    """The bytes of a private file: regular, ours, at most ``limit`` bytes.

    :raises FileNotFoundError: it does not exist.
    :raises PrivateFileError: it is a symlink, another user's, or too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symlink
            raise PrivateFileError(f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise PrivateFileError(f"{path} is not a regular file of uid {os.geteuid()}")
        if st.st_size > limit:
            raise PrivateFileError(f"{path} is larger than {limit} bytes")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise PrivateFileError(f"{path} is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)
