"""Image folders of small images, decoded once into a cached uint8 tensor.

A folder ``split/<class>/<image>`` whose images all share one size (CIFAR-10 as JPEGs, a user's
32x32 crops) is decoded with Pillow once, stored as ``{"x": uint8 (N, C, H, W), "y": int64 (N,),
"classes": [...]}`` in a ``torch.save`` file under the cache directory, and afterwards loaded in
a fraction of a second: training then runs at the speed of an in-memory data set. The cache file
is named by a fingerprint of the folder (every image's relative path, size and modification
time), so adding, removing, replacing or touching an image makes a new one. A ``.tar.gz`` of that
layout is read the same way without unpacking it (fingerprint: the archive's path, size and
mtime).

The cache directory is ``$BIOGRAD_CACHE_DIR``, else ``~/.cache/biograd/decoded``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from biograd.data.imagefolder import EXTENSIONS
from biograd.errors import DataError

CACHE_DIR_ENV = "BIOGRAD_CACHE_DIR"
_VERSION = "decoded-v1"


def cache_dir() -> Path:
    """Where decoded tensors are kept (``$BIOGRAD_CACHE_DIR`` or ``~/.cache/biograd/decoded``)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "biograd" / "decoded"


def _image_files(folder: Path) -> list[tuple[str, str]]:
    """(class name, path) of every image under ``folder/<class>/``, sorted."""
    out: list[tuple[str, str]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            out.extend(
                (entry.name, f.path)
                for f in sorted(os.scandir(entry.path), key=lambda f: f.name)
                if f.is_file() and os.path.splitext(f.name)[1].lower() in EXTENSIONS
            )
    return out


def fingerprint(folder: Path) -> str:
    """A digest of the images under ``folder/<class>/``: relative path, size and mtime of each."""
    h = hashlib.sha256(_VERSION.encode())
    for _, path in _image_files(folder):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(items: Iterable[tuple[str, str, bytes | None]], where: str) -> dict[str, object]:
    """Stack (class, name, encoded bytes or None to read ``name`` from disk) into the cache dict."""
    images: list[np.ndarray] = []
    labels: list[str] = []
    for cls, name, data in items:
        try:
            with Image.open(io.BytesIO(data) if data is not None else name) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"{where}: cannot decode {name} ({type(exc).__name__}: {exc})"
            ) from None
        if images and pixels.shape != images[0].shape:
            raise DataError(
                f"{where}: {name} is {pixels.shape[1]}x{pixels.shape[0]}, the first image "
                f"{images[0].shape[1]}x{images[0].shape[0]}; the decoded cache needs images of one "
                "size (use data name 'imagefolder' to stream and resize mixed sizes)"
            )
        images.append(pixels)
        labels.append(cls)
    if not images:
        raise DataError(f"{where}: no images ({', '.join(sorted(EXTENSIONS))}) in <class>/ folders")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([index[c] for c in labels], dtype=torch.int64)
    return {"x": x, "y": y, "classes": classes}


def _cached(key: str, label: str, build: Iterator[dict[str, object]]) -> dict[str, object]:
    """The cache entry ``key``: loaded when present, else built by ``next(build)`` and saved
    atomically (parallel processes may both build it; the last rename wins, with equal data)."""
    path = cache_dir() / f"{label}-{key[:24]}.pt"
    if path.is_file():
        try:
            data: dict[str, object] = torch.load(path, weights_only=True)
            return data
        except (OSError, RuntimeError, EOFError, zlib.error):
            pass  # a damaged cache file is rebuilt
    data = next(build)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def decoded_folder(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
    """(uint8 images (N, C, H, W), int64 labels (N,), class names) of ``folder/<class>/<image>``,
    decoded once and cached (class indices follow the sorted class names)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")

    def build() -> Iterator[dict[str, object]]:
        yield _decode(((c, p, None) for c, p in _image_files(folder)), str(folder))

    data = _cached(fingerprint(folder), folder.name, build())
    return data["x"], data["y"], list(data["classes"])  # type: ignore[return-value,call-overload]


def decoded_archive(
    archive: Path, split: str, sha256: str | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Like :func:`decoded_folder` for the members ``<split>/<class>/<image>`` of a ``.tar.gz``
    read in place; ``sha256`` (checked before the first decode) guards against a wrong file."""
    st = archive.stat()
    key = hashlib.sha256(
        f"{_VERSION}\0{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{split}".encode()
    ).hexdigest()

    def build() -> Iterator[dict[str, object]]:
        if sha256 is not None:
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != sha256:
                raise DataError(
                    f"{archive}: sha256 {digest[:12]}... is not the expected {sha256[:12]}...; "
                    "replace it with the original archive"
                )
        yield _decode(_members(archive, split), str(archive))

    data = _cached(key, f"{archive.name.split('.')[0]}-{split}", build())
    return data["x"], data["y"], list(data["classes"])  # type: ignore[return-value,call-overload]


def _members(archive: Path, split: str) -> Iterator[tuple[str, str, bytes | None]]:
    """(class, member name, bytes) of the images under ``split/<class>/`` in ``archive``, sorted."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            found = []
            for m in tar:
                parts = m.name.split("/")
                if (
                    m.isfile()
                    and len(parts) == 3
                    and parts[0] == split
                    and os.path.splitext(parts[2])[1].lower() in EXTENSIONS
                ):
                    f = tar.extractfile(m)
                    assert f is not None
                    found.append((parts[1], m.name, f.read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {archive} ({exc}); replace it") from None
    yield from sorted(found, key=lambda t: t[1])
