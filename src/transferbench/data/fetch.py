"""Downloading and mirroring raw data with checksums.

Every remote file an adapter needs is a ``RemoteFile`` (official URL + checksum). Fetching
prefers ``$TRANSFERBENCH_DATA_MIRROR/<dataset>/<file name>`` and falls back to the URL; either
way the bytes are checked against the pinned checksum before anything is extracted, and
a failed download is a ``DataError`` that says how to provide a mirror.
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from transferbench import atomic
from transferbench.errors import DataError
from transferbench.paths import MIRROR_ENV
from transferbench.progress import progress

BLOCK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: where it lives, its checksum (``md5:<hex>`` or ``sha256:<hex>``)."""

    url: str
    filename: str
    checksum: str | None


def file_digest(path: Path, algorithm: str = "sha256", *, desc: str | None = None) -> str:
    """The hex digest of ``path``; with ``desc``, a progress bar in bytes (in a terminal)."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle, progress(desc=desc or "", total=path.stat().st_size, bytes=True,
                                             disable=desc is None) as bar:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_checksum(path: Path, checksum: str | None) -> None:
    """Raise ``DataError`` naming the file when its content does not match ``checksum``."""
    if checksum is None:
        return
    algorithm, _, expected = checksum.partition(":")
    actual = file_digest(path, algorithm, desc=f"checksum {path.name}")
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: expected {algorithm} {expected}, got {actual}; "
                        f"the file is corrupt or not the pinned version (delete it and fetch again)")


def mirror_hint(dataset: str, files: list[str]) -> str:
    return (f"no internet? provide an offline mirror: put {', '.join(files)} under "
            f"${MIRROR_ENV}/{dataset}/ (the upstream files, unchanged), set {MIRROR_ENV} to that "
            f"mirror's root and rerun `transferbench fetch`")


def _copy_stream(response: BinaryIO, handle: BinaryIO, *, desc: str) -> None:
    """``shutil.copyfileobj`` with a progress bar in bytes (size from Content-Length, when given)."""
    length = getattr(response, "headers", {}).get("Content-Length")
    with progress(desc=desc, total=int(length) if length and length.isdigit() else None, bytes=True) as bar:
        for block in iter(lambda: response.read(BLOCK), b""):
            handle.write(block)
            bar.update(len(block))


def obtain(remote: RemoteFile, dest_dir: Path, *, dataset: str, mirror: Path | None) -> Path:
    """The verified local copy of ``remote`` in ``dest_dir``: reused, copied from the mirror or downloaded."""
    target = dest_dir / remote.filename
    if target.is_file():
        try:
            verify_checksum(target, remote.checksum)
            return target
        except DataError:
            target.unlink()
    source = mirror / dataset / remote.filename if mirror is not None else None
    if source is not None and source.is_file():
        atomic.copy_file(source, target)
    else:
        if source is not None:
            where = f"not in the mirror ({source}) and "
        else:
            where = ""
        try:
            with atomic.atomic_path(target) as tmp, urllib.request.urlopen(remote.url, timeout=60) as response, \
                    tmp.open("wb") as handle:
                _copy_stream(response, handle, desc=f"download {remote.filename}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(f"{dataset}: {remote.filename} is {where}could not be downloaded from {remote.url} "
                            f"({exc}); {mirror_hint(dataset, [remote.filename])}") from None
    verify_checksum(target, remote.checksum)
    return target


def extract(archive: Path, dest: Path, *, members: str | None = None) -> None:
    """Extract a .tar/.tgz/.zip into ``dest`` (tar with the safe 'data' filter)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if members is None or members in n]
                zf.extractall(dest, members=names)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"cannot extract {archive}: {exc}") from None


def fetch_files(dataset: str, dest: Path, files: tuple[RemoteFile, ...], *, mirror: Path | None,
                nested: tuple[str, ...] = ()) -> None:
    """Obtain every file (mirror first, checksums verified), extract archives into ``dest``, copy the rest.

    ``nested`` names archives inside an extracted archive that must be extracted too
    (Caltech101's zip holds a .tar.gz). Archives are staged in a temporary directory, so
    ``dest`` only ever receives verified content.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"{dataset}-fetch-") as tmp:
        staged = [obtain(remote, Path(tmp), dataset=dataset, mirror=mirror) for remote in files]
        dest.mkdir(parents=True, exist_ok=True)
        for path in staged:
            if path.suffix in (".tgz", ".tar", ".zip") or path.name.endswith(".tar.gz"):
                extract(path, Path(tmp) / "x" if nested else dest)
            else:
                atomic.copy_file(path, dest / path.name)
        for name in nested:
            matches = list((Path(tmp) / "x").rglob(name))
            if not matches:
                raise DataError(f"{dataset}: archive lacks {name}")
            extract(matches[0], dest)
