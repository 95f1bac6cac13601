"""Decoded images and the pools of classes that tasks are drawn from, and the size guard of an image file.

An `ImageCollection` holds every decoded image of a dataset as one class-major ``uint8`` array
(usually a memory map of the cache, see `bilevel.metalearn.data.cache`); a `ClassPool` selects the
(class, rotation) pairs of one part of a split.  Neither decodes or reads files.  `open_image`
opens one image file's bytes for decoding, after checking the size its header declares.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ClassPool", "ImageCollection", "max_image_pixels", "open_image"]


def max_image_pixels() -> int | None:
    """The most pixels an image file may declare: Pillow's ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by
    default, read at each call, so raising it there raises it here; ``None``: no limit)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def open_image(data: bytes) -> Any:
    """Open one image file's bytes with Pillow, refusing a file that declares too many pixels.

    Pillow reads only the header here; the caller decodes (``.load()``, ``.convert()``).  A file
    whose header claims a huge size (a damaged file, or a decompression bomb: a few kilobytes
    that decode to gigabytes) is refused before any pixel is decoded, where Pillow would raise its
    own ``DecompressionBombError`` (above twice the limit), or only warn and go on to allocate the
    image (between the limit and twice it).

    Args:
        data: the file's bytes.

    Returns:
        The opened ``PIL.Image.Image`` (use it as a context manager).

    Raises:
        ValueError: the header declares more than `max_image_pixels` pixels (the message gives
            the size and the limit; the caller adds the file's name).
        PIL.UnidentifiedImageError, OSError: Pillow cannot read the header.
    """
    from PIL import Image

    limit = max_image_pixels()
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        # above twice the limit Pillow refuses before the size can be read back
        raise ValueError(
            f"the file declares an image of more than twice the limit of {limit:,} pixels "
            f"(PIL.Image.MAX_IMAGE_PIXELS): a damaged file or a decompression bomb; remove it ({err})"
        ) from err
    width, height = im.size
    if limit is not None and width * height > limit:
        im.close()
        raise ValueError(
            f"the file declares a {width}x{height} image ({width * height:,} pixels), more than the "
            f"limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS): a damaged file or a decompression bomb; "
            "remove it (or raise PIL.Image.MAX_IMAGE_PIXELS if it is a genuine image)"
        )
    return im


@dataclasses.dataclass(frozen=True, eq=False)
class ImageCollection:
    """All decoded images of a dataset, class-major.

    Attributes:
        images: ``(N, C, H, W)`` ``uint8`` array (usually a read-only memory map).  For Omniglot
            strokes are 255 and the background 0.
        offsets: ``(n_classes + 1,)`` ``int64``; the images of class ``c`` are
            ``images[offsets[c]:offsets[c + 1]]``.
        class_ids: ``n_classes`` class ids, in the order of ``offsets``.
    """

    images: np.ndarray
    offsets: np.ndarray
    class_ids: tuple[str, ...]
    _index: dict[str, int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"ImageCollection: images must be uint8 (N, C, H, W), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        off = np.asarray(self.offsets, dtype=np.int64)
        if (
            off.ndim != 1
            or off.shape[0] != len(self.class_ids) + 1
            or off[0] != 0
            or off[-1] != self.images.shape[0]
            or np.any(np.diff(off) < 0)
        ):
            raise ValueError(
                "ImageCollection: offsets must run from 0 to N, non-decreasing, one per class + 1"
            )
        object.__setattr__(self, "offsets", off)
        object.__setattr__(self, "class_ids", tuple(self.class_ids))
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.class_ids)})
        if len(self._index) != len(self.class_ids):
            raise ValueError("ImageCollection: duplicate class ids")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def counts(self) -> np.ndarray:
        """Images per class, ``(n_classes,)`` ``int64``."""
        return np.diff(self.offsets)

    def class_index(self, class_id: str) -> int:
        """Position of ``class_id``.

        Raises:
            KeyError: unknown class id (e.g. a saved split from another dataset).
        """
        try:
            return self._index[class_id]
        except KeyError:
            raise KeyError(
                f"class id {class_id!r} is not in this dataset ({len(self.class_ids)} classes)"
            ) from None

    def class_images(self, class_id: str) -> np.ndarray:
        """The ``(n, C, H, W)`` ``uint8`` images of one class."""
        i = self.class_index(class_id)
        return self.images[self.offsets[i] : self.offsets[i + 1]]

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"ImageCollection({self.images.shape[0]:,} images of {c}x{h}x{w} {self.images.dtype}, "
            f"{len(self.class_ids):,} classes)"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ClassPool:
    """The classes tasks are drawn from: (class of a collection, rotation) pairs.

    A rotation by ``k`` quarter turns (counter-clockwise, ``numpy.rot90``) of a character makes a
    new class, the Omniglot protocol of Santoro et al. / Vinyals et al. / Finn et al.  Rotations are
    applied at sampling time, so the cache holds each drawing once.

    Attributes:
        collection: the decoded images.
        classes: ``(K,)`` ``int64`` class positions in ``collection``.
        rotations: ``(K,)`` ``int64`` quarter turns in {0, 1, 2, 3}.
        name: ``"train"``, ``"val"`` or ``"test"`` (used in messages).
    """

    collection: ImageCollection
    classes: np.ndarray
    rotations: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        cls_ = np.asarray(self.classes, dtype=np.int64)
        rot = np.asarray(self.rotations, dtype=np.int64)
        if cls_.ndim != 1 or rot.shape != cls_.shape:
            raise ValueError("ClassPool: classes and rotations must be 1-D of equal length")
        if cls_.size and (cls_.min() < 0 or cls_.max() >= len(self.collection.class_ids)):
            raise ValueError("ClassPool: class position out of range")
        if rot.size and (rot.min() < 0 or rot.max() > 3):
            raise ValueError("ClassPool: rotations must be quarter turns in {0, 1, 2, 3}")
        _, h, w = self.collection.image_shape
        if h != w and np.any(rot % 2 == 1):
            raise ValueError(f"ClassPool: 90/270 degree rotations need square images, got {h}x{w}")
        object.__setattr__(self, "classes", cls_)
        object.__setattr__(self, "rotations", rot)

    @classmethod
    def from_ids(
        cls,
        collection: ImageCollection,
        class_ids: Sequence[str],
        rotations: Sequence[int] = (0,),
        name: str = "",
    ) -> ClassPool:
        """Pool of every ``(class, rotation)`` pair, class-major: ``len(class_ids) * len(rotations)`` classes.

        Raises:
            KeyError: a class id is not in ``collection``.
            ValueError: ``rotations`` has duplicates or values outside {0, 1, 2, 3}.
        """
        rots = [int(r) for r in rotations]
        if not rots or len(set(rots)) != len(rots) or any(r not in (0, 1, 2, 3) for r in rots):
            raise ValueError(
                f"ClassPool.from_ids(rotations={tuple(rotations)!r}): distinct quarter turns in 0..3"
            )
        idx = np.array([collection.class_index(c) for c in class_ids], dtype=np.int64)
        return cls(
            collection, np.repeat(idx, len(rots)), np.tile(np.array(rots, dtype=np.int64), len(idx)), name
        )

    @property
    def n_classes(self) -> int:
        """Number of (class, rotation) pairs."""
        return int(self.classes.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return self.collection.image_shape

    @property
    def counts(self) -> np.ndarray:
        """Images per pool class, ``(n_classes,)`` ``int64``."""
        return self.collection.counts[self.classes]

    @property
    def class_ids(self) -> tuple[str, ...]:
        """Distinct underlying class ids (rotations dropped), in pool order."""
        return tuple(dict.fromkeys(self.collection.class_ids[int(i)] for i in self.classes))

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        n_rot = len(np.unique(self.rotations))
        rot = f" ({len(self.class_ids):,} x {n_rot} rotations)" if n_rot > 1 else ""
        return f"ClassPool({self.name!r}, {self.n_classes:,} classes{rot}, images {c}x{h}x{w})"

    def label(self, k: int) -> str:
        """Readable name of pool class ``k``, e.g. ``"images_background/Greek/character01@rot90"``."""
        base = self.collection.class_ids[int(self.classes[k])]
        r = int(self.rotations[k])
        return base if r == 0 else f"{base}@rot{90 * r}"
