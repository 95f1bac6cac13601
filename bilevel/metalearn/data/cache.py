"""The decode-once image cache: a dataset's images as one memory-mapped ``uint8`` array.

`load_image_collection` decodes an `ImageSource` once with Pillow, stores the images as one ``uint8``
array ``(N, C, H, W)`` in a ``.npy`` file in the cache directory (`resolve_cache_dir`) and
memory-maps that file on every later load, so loading is fast after the first time and task
sampling never decodes an image.  The cache key covers the image list, each file's size and
modification time (or CRC inside a zip), the image size, channels and resampling filter, so a
changed dataset or setting is decoded afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ... import BilevelWarning
from .images import ImageCollection
from .locations import resolve_cache_dir
from .sources import RESAMPLE_NAMES, ImageSource, Resample, decode_source, hash_json

__all__ = ["load_image_collection"]

logger = logging.getLogger(__name__)

# Bump when the cache's content or layout changes, so old files are not reused.
_CACHE_FORMAT = 1


def load_image_collection(
    source: ImageSource,
    *,
    size: tuple[int, int],
    channels: int,
    resample: Resample = "lanczos",
    invert: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> ImageCollection:
    """Decode ``source`` once into a cached ``uint8`` array and memory-map it (shared by all loaders).

    The cache is two files in the cache directory: ``<name>-<H>x<W>x<C>-<key>.npy`` (the images)
    and ``.json`` (class ids, offsets, settings), written atomically (temporary file +
    ``os.replace``), so concurrent processes (e.g. distributed ranks) may build it at the same time.
    A cache whose metadata or shape does not match is rebuilt.

    Args:
        source: what to decode.
        size: ``(H, W)``.
        channels: 1 or 3.
        resample: Pillow filter used when resizing.
        invert: store ``255 - pixel``.
        cache_dir: see `resolve_cache_dir`.
        data_root: used only as the last-resort cache location.
        cache: ``False`` decodes into memory and writes nothing.
        workers: decoding threads (default: half the usable CPUs, at most 8).
        progress: show a tqdm progress bar while decoding (if tqdm is installed).

    Returns:
        ImageCollection with ``images`` of shape ``(N, channels, H, W)`` ``uint8``.

    Raises:
        DatasetFormatError: an image cannot be read or decoded.
        ValueError: bad ``size``, ``channels`` or ``resample``.
    """
    h, w = _checked_size(source, size, channels, resample)
    counts = [len(m) for m in source.members]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shape = (source.n_images, channels, h, w)
    settings = {
        "format": _CACHE_FORMAT,
        "name": source.name,
        "size": [h, w],
        "channels": channels,
        "resample": resample,
        "invert": invert,
        "fingerprint": source.fingerprint,
        "classes": hash_json([source.class_ids, source.members]),
    }
    key = hash_json(settings)[:16]

    def decode(out: np.ndarray) -> None:
        decode_source(
            out,
            source,
            size=(h, w),
            channels=channels,
            resample=resample,
            invert=invert,
            workers=workers,
            progress=progress,
        )

    cdir = resolve_cache_dir(cache_dir, data_root) if cache else None
    if cdir is None:
        images = np.empty(shape, dtype=np.uint8)
        decode(images)
        return ImageCollection(images, offsets, source.class_ids)

    stem = f"{source.name}-{h}x{w}x{channels}-{key}"
    npy, meta = cdir / f"{stem}.npy", cdir / f"{stem}.json"
    cached = _open_cache(npy, meta, key, shape, source.class_ids, offsets)
    if cached is not None:
        logger.debug("loaded %s from cache %s", source.name, npy)
        return ImageCollection(cached, offsets, source.class_ids)

    logger.info("decoding %d images of %s once into %s", source.n_images, source.name, npy)
    record = {
        "key": key,
        "settings": settings,
        "class_ids": list(source.class_ids),
        "offsets": offsets.tolist(),
        "shape": list(shape),
    }
    images = _write_cache(npy, meta, shape, decode, record)
    return ImageCollection(images, offsets, source.class_ids)


def _checked_size(
    source: ImageSource, size: tuple[int, int], channels: int, resample: Resample
) -> tuple[int, int]:
    """``(H, W)`` of `load_image_collection`'s ``size``, after checking its arguments."""
    h, w = (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"load_image_collection(size={size!r}): sizes must be >= 1")
    if channels not in (1, 3):
        raise ValueError(f"load_image_collection(channels={channels!r}): must be 1 or 3")
    if resample not in RESAMPLE_NAMES:
        raise ValueError(f"load_image_collection(resample={resample!r}): one of {RESAMPLE_NAMES}")
    if len(source.members) != len(source.class_ids):
        raise ValueError("ImageSource: one member list per class id")
    return h, w


def _write_cache(
    npy: Path,
    meta: Path,
    shape: tuple[int, ...],
    decode: Callable[[np.ndarray], None],
    record: dict[str, Any],
) -> np.ndarray:
    """Decode into the cache files ``npy`` (the images) and ``meta`` (``record`` as JSON), written
    atomically, and memory-map the images; where the cache cannot be written, decode into memory
    (with a warning)."""
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_npy, tmp_meta = npy.with_name(f"{npy.stem}{tag}.npy"), meta.with_name(f"{meta.stem}{tag}.json")
    try:
        try:
            out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as e:
            warnings.warn(
                f"cannot write cache {str(tmp_npy)!r} ({e}); decoding into memory",
                BilevelWarning,
                stacklevel=3,
            )
            mem = np.empty(shape, dtype=np.uint8)
            decode(mem)
            return mem
        decode(out)
        out.flush()
        del out
        tmp_meta.write_text(json.dumps(record), encoding="utf-8")
        # images first, metadata last: a cache is valid only once its .json exists
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)
    finally:
        for p in (tmp_npy, tmp_meta):
            with contextlib.suppress(OSError):
                p.unlink()
    return np.load(npy, mmap_mode="r")


def _open_cache(
    npy: Path, meta: Path, key: str, shape: tuple[int, ...], class_ids: tuple[str, ...], offsets: np.ndarray
) -> np.ndarray | None:
    """The memory-mapped cache if it exists and matches, else ``None`` (with a warning if it is damaged)."""
    if not (npy.exists() and meta.exists()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        images = np.load(npy, mmap_mode="r")
        ok = (
            info.get("key") == key
            and tuple(info.get("class_ids", ())) == class_ids
            and info.get("offsets") == offsets.tolist()
            and images.shape == shape
            and images.dtype == np.uint8
        )
    except (OSError, ValueError) as e:
        warnings.warn(f"damaged image cache {str(npy)!r} ({e}); rebuilding it", BilevelWarning, stacklevel=3)
        return None
    if not ok:
        warnings.warn(
            f"image cache {str(npy)!r} does not match its metadata; rebuilding it",
            BilevelWarning,
            stacklevel=3,
        )
        return None
    return images
