"""Files written whole or not at all, and file digests: the plumbing every command that writes shares.

Every output of asft-lightning goes through one of three writers. Each builds the new file or directory under a
temporary name in the same folder and renames it into place, so a crash or Ctrl-C leaves the old output or the new
one, never half of one, and removes its temporary on the way out:

* :func:`atomic_write_file`: any file, written by a function given the temporary path (safetensors, plots);
* :func:`atomic_write_bytes` / :func:`atomic_write_text`: bytes or UTF-8 text;
* :func:`atomic_replace_dir`: a whole directory (adapters, model directories).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_replace_dir", "atomic_write_bytes", "atomic_write_file", "atomic_write_text", "sha256_file"]


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same directory, then rename it into place.

    The directory is created if needed; the file gets the permissions of an ordinary ``open`` (``tempfile`` makes
    it private). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes through a temporary file in the same directory, then rename it into place."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_replace_dir(build: Callable[[Path], object], target: str | os.PathLike) -> Path:
    """Build a directory with ``build(tmp_dir)`` next to ``target``, then swap it into place.

    A crash leaves either the old directory or the new one at ``target``, never a half-written one: an existing
    ``target`` is moved aside, put back if the swap fails, and deleted after it. The new directory gets the
    permissions of an ordinary ``mkdir`` (``tempfile`` makes it private).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if not target.exists():
            os.replace(tmp, target)
            return target
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
