"""Locating, verifying and downloading the official dataset files.

Every file a loader reads is checked against its official md5 before it is parsed, so a truncated
download or a different build of the data set never trains silently. Failures raise
:class:`biograd.errors.DataError` with a one-line message that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from biograd.errors import DataError

#: Environment variable naming the default data directory (used when ``root`` is None).
DATA_DIR_ENV = "BIOGRAD_DATA_DIR"
#: Environment variable naming a mirror base URL tried before the official ones.
MIRROR_ENV = "BIOGRAD_DATA_MIRROR"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """The official files of one data set: name -> md5, and the base URLs that serve them."""

    files: dict[str, str]
    mirrors: tuple[str, ...]


def default_root() -> Path:
    """``$BIOGRAD_DATA_DIR`` if set, else ``~/.cache/biograd/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "biograd" / "data"


def md5sum(path: Path) -> str:
    """The hex md5 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fix_hint(filename: str, name: str) -> str:
    """The advice every missing-file message ends with."""
    return (
        f"pass --data-dir DIR (root=DIR in Python) with DIR or DIR/{name} holding {filename}, "
        "or --download (download=True)"
    )


def locate(root: Path, name: str, filename: str) -> Path | None:
    """The first of ``root/name/filename`` and ``root/filename`` that exists, else None."""
    for candidate in (root / name / filename, root / filename):
        if candidate.is_file():
            return candidate
    return None


def verify(path: Path, expected_md5: str, name: str) -> None:
    """Raise DataError unless ``path`` has the official md5."""
    actual = md5sum(path)
    if actual != expected_md5:
        raise DataError(
            f"{name}: {path} is corrupt, truncated or not the official file "
            f"(md5 {actual}, expected {expected_md5}); delete it and rerun with --download "
            "(download=True), or replace it with the official file"
        )


def mirrors(remote: Remote, mirror: str | None) -> list[str]:
    """Base URLs to try, in order: the ``mirror`` argument or ``$BIOGRAD_DATA_MIRROR``, then the
    official ones. Passing a mirror (argument or environment) tries only that mirror."""
    override = mirror or os.environ.get(MIRROR_ENV)
    if override:
        return [override.rstrip("/") + "/"]
    return [m.rstrip("/") + "/" for m in remote.mirrors]


def download(filename: str, dest_dir: Path, remote: Remote, name: str, mirror: str | None) -> Path:
    """Fetch ``filename`` into ``dest_dir`` from the first mirror that serves a file with the
    official md5; the file appears only once complete and verified (written to a temporary file,
    then renamed)."""
    expected = remote.files[filename]
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    failures: list[str] = []
    for base in mirrors(remote, mirror):
        url = base + filename
        try:
            got = _fetch(url, dest_dir)
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            continue
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        actual = md5sum(got)
        if actual != expected:
            got.unlink(missing_ok=True)
            failures.append(f"{url}: md5 {actual}, expected {expected}")
            continue
        os.replace(got, dest)
        return dest
    raise DataError(
        f"{name}: could not download {filename} ({'; '.join(failures)}); place the official "
        f"file at {dest} or set {MIRROR_ENV} to a mirror that serves it"
    )


def _fetch(url: str, dest_dir: Path) -> Path:
    """Stream ``url`` into a temporary file in ``dest_dir`` and return its path."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    path = Path(tmp)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=60) as response,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=url.rsplit("/", 1)[-1],
                disable=None,
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def fetch_verified(
    root: Path,
    name: str,
    filename: str,
    remote: Remote,
    *,
    download_missing: bool,
    mirror: str | None,
) -> Path:
    """The verified path of one official file: found under ``root`` (``root/name`` or ``root``)
    or, with ``download_missing``, downloaded to ``root/name``. A file present with the wrong md5
    is replaced when downloading is allowed and is an error otherwise."""
    path = locate(root, name, filename)
    if path is not None:
        if not download_missing:
            verify(path, remote.files[filename], name)
            return path
        if md5sum(path) == remote.files[filename]:
            return path
        return download(filename, path.parent, remote, name, mirror)
    if download_missing:
        return download(filename, root / name, remote, name, mirror)
    raise DataError(f"{name}: missing {root / name / filename}; {fix_hint(filename, name)}")
