"""Image sources: a dataset's image list, how its files are read, and how an image is decoded.

A dataset module (`omniglot`, `miniimagenet`, `folder`) describes its images as an `ImageSource`
(class ids, per-class file references, a fingerprint of the files and a reader factory for plain
files or zip archives); `decode_source` decodes all of them into one ``uint8`` array, which
`bilevel.metalearn.data.cache` stores and memory-maps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .datasets import DatasetFormatError
from .images import open_image

__all__ = [
    "IMAGE_SUFFIXES",
    "RESAMPLE_NAMES",
    "ImageSource",
    "Reader",
    "Resample",
    "decode_image",
    "decode_source",
    "file_reader",
    "hash_json",
    "list_class_folders",
    "zip_reader",
]

Resample = Literal["lanczos", "bilinear", "bicubic", "nearest", "box"]
#: The Pillow filters `decode_image` accepts.
RESAMPLE_NAMES = ("lanczos", "bilinear", "bicubic", "nearest", "box")

#: ``read(ref) -> bytes`` for one image reference.
Reader = Callable[[str], bytes]


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """The image list of a dataset, before decoding.

    Attributes:
        name: dataset name, the prefix of the cache file.
        class_ids: class ids, in collection order.
        members: per class, the references of its images (in a fixed, sorted order).
        fingerprint: a string that changes when the files change (sizes, mtimes or CRCs); part of
            the cache key.
        open_reader: context-manager factory yielding ``read(ref) -> bytes``; it may hold archives
            open for the whole decode.
    """

    name: str
    class_ids: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]
    fingerprint: str
    open_reader: Callable[[], contextlib.AbstractContextManager[Reader]]

    @property
    def n_images(self) -> int:
        return sum(len(m) for m in self.members)


def file_reader(root: Path) -> Callable[[], contextlib.AbstractContextManager[Reader]]:
    """Reader factory for plain files; references are paths relative to ``root``."""

    def read(ref: str) -> bytes:
        try:
            return (root / ref).read_bytes()
        except OSError as e:
            raise DatasetFormatError(f"cannot read image {str(root / ref)!r}: {e}") from e

    return lambda: contextlib.nullcontext(read)


def zip_reader(
    archives: Mapping[str, Path], help_text: str = ""
) -> Callable[[], contextlib.AbstractContextManager[Reader]]:
    """Reader factory for zip archives; a reference ``"<prefix>/<rest>"`` is read from ``archives[prefix]``.

    The archives stay open while the reader is in use.  A damaged archive or member (bad CRC)
    raises `DatasetFormatError` naming the archive.
    """

    @contextlib.contextmanager
    def opener() -> Iterator[Reader]:
        with contextlib.ExitStack() as stack:
            zips: dict[str, zipfile.ZipFile] = {}
            for prefix, path in archives.items():
                try:
                    zips[prefix] = stack.enter_context(zipfile.ZipFile(path))
                except (zipfile.BadZipFile, OSError) as e:
                    raise DatasetFormatError(f"cannot open archive {str(path)!r}: {e}.\n{help_text}") from e

            def read(ref: str) -> bytes:
                prefix = ref.split("/", 1)[0]
                try:
                    return zips[prefix].read(ref)
                except (zipfile.BadZipFile, zlib.error, OSError, KeyError, EOFError) as e:
                    raise DatasetFormatError(
                        f"archive {str(archives[prefix])!r} is damaged at {ref!r}: {e}.\n{help_text}"
                    ) from e

            yield read

    return opener


def _pillow() -> Any:
    """The ``PIL`` package, or an ImportError that says how to install it."""
    try:
        import PIL.Image
    except ImportError as err:
        raise ImportError(
            "decoding the dataset's images needs Pillow, which is not installed: "
            "pip install 'bilevel[images]'"
        ) from err
    return PIL.Image


def _resample_filter(resample: str) -> int:
    Image = _pillow()

    table = {
        "lanczos": Image.Resampling.LANCZOS,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
        "box": Image.Resampling.BOX,
    }
    return int(table[resample])


def decode_image(
    data: bytes,
    *,
    size: tuple[int, int],
    channels: int,
    resample: Resample = "lanczos",
    invert: bool = False,
) -> np.ndarray:
    """Decode one image file and resize it.

    Bilevel (mode ``'1'``) images are converted to 8-bit grayscale *before* resizing: Pillow
    resizes mode ``'1'`` with nearest neighbour whatever filter is asked for, which aliases thin
    strokes (the 105 -> 28 Omniglot reduction).

    Args:
        data: the file's bytes (PNG, JPEG, ... anything Pillow reads).
        size: ``(H, W)`` of the result.
        channels: 1 (grayscale, ``'L'``) or 3 (``'RGB'``).
        resample: Pillow filter name.
        invert: return ``255 - pixel`` (Omniglot: black strokes on white become strokes = 255).

    Returns:
        ``(channels, H, W)`` ``uint8``.

    Raises:
        DatasetFormatError: Pillow cannot read the bytes.
        ImportError: Pillow is not installed (``pip install 'bilevel[images]'``).
    """
    _pillow()
    from PIL import UnidentifiedImageError

    try:
        with open_image(data) as raw:  # refuses a header that declares too many pixels
            raw.load()
            im = raw.convert("L" if channels == 1 else "RGB")
        h, w = size
        if im.size != (w, h):
            im = im.resize((w, h), resample=_resample_filter(resample))
        a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(f"cannot decode image: {e}") from e
    a = a[None] if channels == 1 else np.transpose(a, (2, 0, 1))
    if invert:
        a = 255 - a
    return np.ascontiguousarray(a)


def _default_workers() -> int:
    # Half the usable CPUs, at most 8: decoding threads only pay where Pillow releases the GIL
    # (resizing, JPEG decoding); on a shared 2-CPU machine extra threads did not speed up Omniglot.
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n // 2))


#: File suffixes (lower case) read as images by the folder layouts.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def list_class_folders(base: Path, top: str) -> dict[str, list[tuple[str, int, int]]]:
    """Images of a folder-per-class layout ``base/top/<class>/<image>``, hidden entries skipped.

    Args:
        base: the folder that references are relative to.
        top: the sub-folder holding the class folders (``""`` for ``base`` itself).

    Returns:
        class name -> sorted ``[(reference, mtime_ns, size)]``; a class folder without images maps to
        an empty list (the caller decides whether that is an error).
    """
    root = base / top if top else base
    classes: dict[str, list[tuple[str, int, int]]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries = []
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            st = f.stat()
            entries.append((f.relative_to(base).as_posix(), st.st_mtime_ns, st.st_size))
        classes[d.name] = entries
    return classes


def hash_json(obj: object) -> str:
    """SHA-256 hex digest of ``obj`` as canonical JSON (sorted keys): fingerprints and cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def decode_source(
    out: np.ndarray,
    source: ImageSource,
    *,
    size: tuple[int, int],
    channels: int,
    resample: Resample = "lanczos",
    invert: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> None:
    """Decode every image of ``source`` into ``out`` (N, C, H, W), in order (with `decode_image`).

    Files are read serially (archives are not shared between threads) and, if ``workers > 1``,
    decoded in a thread pool: Pillow releases the GIL in parts of decoding and resizing.  The result
    does not depend on ``workers``.

    Args:
        out: ``(source.n_images, channels, H, W)`` ``uint8`` array (or memory map) written in place.
        source: what to decode.
        size, channels, resample, invert: as in `decode_image`.
        workers: decoding threads (default: half the usable CPUs, at most 8).
        progress: show a tqdm progress bar (if tqdm is installed).

    Raises:
        DatasetFormatError: an image cannot be read or decoded (the message names it).
        ImportError: Pillow is not installed (``pip install 'bilevel[images]'``).
    """
    _pillow()  # before any work: say what to install, not a bare ModuleNotFoundError
    workers = max(1, workers if workers is not None else _default_workers())
    refs = [r for m in source.members for r in m]
    bar: Any = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(refs), desc=f"decoding {source.name}", unit="img")
        except ImportError:
            bar = None

    def work(item: tuple[str, bytes]) -> np.ndarray:
        ref, data = item
        try:
            return decode_image(data, size=size, channels=channels, resample=resample, invert=invert)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{source.name}: image {ref!r}: {e}") from e

    chunk = 512
    with contextlib.ExitStack() as stack:
        read = stack.enter_context(source.open_reader())
        pool = (
            stack.enter_context(concurrent.futures.ThreadPoolExecutor(max_workers=workers))
            if workers > 1
            else None
        )
        for start in range(0, len(refs), chunk):
            part = refs[start : start + chunk]
            blobs = [(r, read(r)) for r in part]
            arrays = pool.map(work, blobs) if pool is not None else map(work, blobs)
            for j, arr in enumerate(arrays):
                out[start + j] = arr
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
