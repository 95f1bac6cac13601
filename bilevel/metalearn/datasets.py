"""Few-shot image data shared by every dataset: splits, class pools and the decode-once cache.

The dataset modules (`omniglot`, `miniimagenet`, `folder`) only *list* their images; this module
decodes them once with Pillow, stores them as one ``uint8`` array ``(N, C, H, W)`` in a ``.npy`` file
and memory-maps that file on every later load, so loading is fast after the first time and task
sampling never decodes an image.

Quick start (what a training loop needs)::

    from bilevel.metalearn.omniglot import load_omniglot
    from bilevel.metalearn.tasks import TaskSampler
    from bilevel.metalearn.models import default_model, make_functional

    data = load_omniglot(data_root, split="vinyals", seed=0, n_val=100)  # FewShotData
    data.split.save_json(run_dir / "split.json")                         # saved with the run
    train = TaskSampler(data.train, ways=5, shots=1, queries=15, seed=0)
    # (a) a meta-batch as stacked tensors on a device: support_x (B, ways*shots, 1, 28, 28) ...
    batch = train.meta_batch(step, range(16), device="cuda")
    #     rank r of R takes disjoint task indices and sees the tasks one process would see:
    batch = train.meta_batch(step, range(r, 16, R))
    # (b) the fixed evaluation tasks (task i depends only on (eval seed, i)):
    test = TaskSampler(data.test, ways=5, shots=1, queries=15, seed=0)
    for chunk in test.fixed_batches(600, batch_size=50, device="cuda"): ...
    # (c) the model's functional form and its parameters:
    fn, params = make_functional(default_model(data.image_shape, ways=5), torch.Generator().manual_seed(0))
    logits = torch.func.vmap(fn)(batched_params, batch.support_x)
    # sinusoid regression has the same sampler interface (support_x, support_y: (B, K, 1)):
    sine = SinusoidTasks(shots=10, queries=10, seed=0)           # bilevel.metalearn.tasks
    fn, params = make_functional(sinusoid_mlp(), torch.Generator().manual_seed(0))
    loss = mse(fn(params, x), y)   # models.mse, not F.mse_loss, under jvp(grad(...)) (torch #123996)

Where data and cache live:

* the data root is the ``data_root`` argument, else the environment variable ``BILEVEL_DATA_ROOT``;
  each dataset also looks in a conventional sub-folder (``<root>/omniglot``, ``<root>/miniimagenet``);
* the cache directory is the ``cache_dir`` argument, else ``BILEVEL_CACHE``, else
  ``$XDG_CACHE_HOME/bilevel`` (``~/.cache/bilevel``), else ``<data root>/.bilevel_cache``; where none is
  writable the images are decoded into memory with a warning.  The cache key covers the image list,
  each file's size and modification time (or CRC inside a zip), the image size, channels and
  resampling filter, so a changed dataset or setting is decoded afresh.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._errors import BilevelError, BilevelWarning

__all__ = [
    "CACHE_ENV",
    "DATA_ROOT_ENV",
    "IMAGE_SUFFIXES",
    "ClassPool",
    "ClassSplit",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FewShotData",
    "ImageCollection",
    "ImageSource",
    "Reader",
    "Resample",
    "decode_image",
    "file_reader",
    "list_class_folders",
    "load_image_collection",
    "make_few_shot_data",
    "resolve_cache_dir",
    "resolve_data_root",
    "split_classes",
    "zip_reader",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data root when ``data_root`` is not given.
DATA_ROOT_ENV = "BILEVEL_DATA_ROOT"
#: Environment variable naming the cache directory when ``cache_dir`` is not given.
CACHE_ENV = "BILEVEL_CACHE"

# Bump when the cache's content or layout changes, so old files are not reused.
_CACHE_FORMAT = 1

Resample = Literal["lanczos", "bilinear", "bicubic", "nearest", "box"]
_RESAMPLE_NAMES = ("lanczos", "bilinear", "bicubic", "nearest", "box")


# --------------------------------------------------------------------------------------------------
# Errors


class DatasetError(BilevelError):
    """Base class of the data errors: the dataset is missing, malformed or too small for a request."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not where they were looked for.  The message says where to get them."""


class DatasetFormatError(DatasetError, ValueError):
    """The dataset's files exist but are corrupt, unreadable, laid out wrongly or too small."""


# --------------------------------------------------------------------------------------------------
# Splits


def _str_tuple(value: object, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"ClassSplit({field}=...): expected a sequence of class ids, got {type(value).__name__}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"ClassSplit({field}=...): class ids must be str, got {item!r}")
    return items


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Which classes are used for meta-training, validation and testing.

    Class ids are dataset-specific strings, e.g. ``"images_background/Greek/character01"`` for
    Omniglot or ``"n01532829"`` for Mini-ImageNet.  The three parts are checked to be free of
    duplicates and pairwise disjoint at construction, so a saved split can never leak test classes
    into meta-training.

    Attributes:
        train_classes: meta-training classes.
        val_classes: validation classes (may be empty).
        test_classes: meta-test classes.
        name: where the split comes from, e.g. ``"omniglot/vinyals"``.
        seed: the seed of the permutation that produced it (``None`` for a fixed split).
    """

    train_classes: tuple[str, ...]
    val_classes: tuple[str, ...] = ()
    test_classes: tuple[str, ...] = ()
    name: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        parts = {}
        for field in ("train_classes", "val_classes", "test_classes"):
            items = _str_tuple(getattr(self, field), field)
            object.__setattr__(self, field, items)
            if len(set(items)) != len(items):
                dup = sorted({c for c in items if items.count(c) > 1})[:3]
                raise ValueError(f"ClassSplit({field}=...): duplicate class ids {dup}")
            parts[field] = set(items)
        for a, b in (
            ("train_classes", "val_classes"),
            ("train_classes", "test_classes"),
            ("val_classes", "test_classes"),
        ):
            common = parts[a] & parts[b]
            if common:
                raise ValueError(
                    f"ClassSplit: {a} and {b} share {len(common)} classes, e.g. {sorted(common)[:3]}; "
                    "the parts of a split must be disjoint"
                )

    @property
    def all_classes(self) -> tuple[str, ...]:
        """Train, then val, then test class ids."""
        return self.train_classes + self.val_classes + self.test_classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``name``, ``seed``, ``train_classes``, ``val_classes``, ``test_classes``."""
        return {
            "name": self.name,
            "seed": self.seed,
            "train_classes": list(self.train_classes),
            "val_classes": list(self.val_classes),
            "test_classes": list(self.test_classes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassSplit:
        """Inverse of `to_dict`; ``name``, ``seed`` and ``val_classes`` may be absent.

        Raises:
            ValueError: ``train_classes`` or ``test_classes`` is missing, or the parts overlap.
        """
        missing = [k for k in ("train_classes", "test_classes") if k not in d]
        if missing:
            raise ValueError(f"ClassSplit.from_dict: missing keys {missing}")
        return cls(
            train_classes=tuple(d["train_classes"]),
            val_classes=tuple(d.get("val_classes", ())),
            test_classes=tuple(d["test_classes"]),
            name=str(d.get("name", "")),
            seed=d.get("seed"),
        )

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (see `to_dict`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> ClassSplit:
        """Read a split written by `save_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def split_classes(
    class_ids: Sequence[str],
    sizes: tuple[int, int, int] | tuple[float, float, float],
    *,
    seed: int = 0,
    name: str = "",
) -> ClassSplit:
    """Deterministic random split of classes into train / val / test.

    The ids are sorted first and then permuted with ``numpy.random.default_rng(seed)``, so the
    split depends only on the set of ids, ``sizes`` and ``seed`` (never on file-system order).

    Args:
        class_ids: all class ids.
        sizes: ``(n_train, n_val, n_test)`` as counts (ints, sum <= number of classes), or as
            fractions (floats in [0, 1], sum <= 1; val and test are rounded, train gets
            ``round(f_train * n)`` capped by what is left).
        seed: permutation seed.
        name: recorded in the split.

    Returns:
        ClassSplit with each part sorted.

    Raises:
        ValueError: bad sizes, or a requested part that ends up empty.
    """
    ids = sorted(class_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("split_classes: duplicate class ids")
    if len(sizes) != 3:
        raise ValueError(f"split_classes(sizes={sizes!r}): expected (train, val, test)")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        counts = [int(s) for s in sizes]
        if min(counts) < 0 or sum(counts) > n:
            raise ValueError(f"split_classes(sizes={sizes!r}): counts must be >= 0 and sum to <= {n} classes")
    elif all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sizes):
        fr = [float(s) for s in sizes]
        if min(fr) < 0 or sum(fr) > 1 + 1e-9:
            raise ValueError(f"split_classes(sizes={sizes!r}): fractions must be >= 0 and sum to <= 1")
        n_val, n_test = round(fr[1] * n), round(fr[2] * n)
        n_train = min(round(fr[0] * n), n - n_val - n_test)
        counts = [n_train, n_val, n_test]
        for part, f, c in zip(("train", "val", "test"), fr, counts):
            if f > 0 and c <= 0:
                raise ValueError(
                    f"split_classes(sizes={sizes!r}): the {part} part gets no class out of {n}; "
                    "give counts or use more classes"
                )
    else:
        raise TypeError(f"split_classes(sizes={sizes!r}): sizes must be three ints or three floats")
    if counts[0] <= 0:
        raise ValueError(f"split_classes(sizes={sizes!r}): the train part is empty")
    perm = np.random.default_rng(seed).permutation(n)
    a, b = counts[0], counts[0] + counts[1]
    pick = [ids[i] for i in perm]
    return ClassSplit(
        train_classes=tuple(sorted(pick[:a])),
        val_classes=tuple(sorted(pick[a:b])),
        test_classes=tuple(sorted(pick[b : b + counts[2]])),
        name=name,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------------
# Decoded images, pools of classes and the bundle a loader returns


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

    def label(self, k: int) -> str:
        """Readable name of pool class ``k``, e.g. ``"images_background/Greek/character01@rot90"``."""
        base = self.collection.class_ids[int(self.classes[k])]
        r = int(self.rotations[k])
        return base if r == 0 else f"{base}@rot{90 * r}"


@dataclasses.dataclass(frozen=True, eq=False)
class FewShotData:
    """What every image loader returns.

    Attributes:
        name: dataset name (``"omniglot"``, ``"miniimagenet"``, ``"folder"``).
        collection: all decoded images.
        split: the class split (save it with the run: ``split.save_json(path)``).
        train: meta-training pool.
        val: validation pool, or ``None`` where the split has no validation classes.
        test: meta-test pool.
    """

    name: str
    collection: ImageCollection
    split: ClassSplit
    train: ClassPool
    val: ClassPool | None
    test: ClassPool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images tasks are made of."""
        return self.collection.image_shape


def make_few_shot_data(
    name: str,
    collection: ImageCollection,
    split: ClassSplit,
    *,
    train_rotations: Sequence[int] = (0,),
    test_rotations: Sequence[int] = (0,),
) -> FewShotData:
    """Build the three pools of ``split`` over ``collection`` (val and test use ``test_rotations``).

    Raises:
        DatasetFormatError: a class of the split is not in the collection.
    """
    try:
        train = ClassPool.from_ids(collection, split.train_classes, train_rotations, "train")
        val = (
            ClassPool.from_ids(collection, split.val_classes, test_rotations, "val")
            if split.val_classes
            else None
        )
        test = ClassPool.from_ids(collection, split.test_classes, test_rotations, "test")
    except KeyError as e:
        raise DatasetFormatError(
            f"{name}: the split {split.name!r} does not match the data: {e.args[0]}"
        ) from None
    return FewShotData(name, collection, split, train, val, test)


# --------------------------------------------------------------------------------------------------
# Locations


def resolve_data_root(data_root: str | os.PathLike[str] | None, *, dataset: str, help_text: str) -> Path:
    """``data_root`` if given, else ``$BILEVEL_DATA_ROOT``.

    Raises:
        DatasetNotFoundError: neither is set, or the folder does not exist (message: ``help_text``).
    """
    if data_root is None:
        env = os.environ.get(DATA_ROOT_ENV)
        if not env:
            raise DatasetNotFoundError(
                f"{dataset}: no data root given; pass data_root (--data-root) or set {DATA_ROOT_ENV}.\n"
                + help_text
            )
        data_root = env
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{dataset}: data root {str(root)!r} is not a directory.\n{help_text}")
    return root


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError:
        return False
    return True


def resolve_cache_dir(
    cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None
) -> Path | None:
    """The directory for decoded-image caches, created if needed, or ``None`` if none is writable.

    Order: ``cache_dir``; ``$BILEVEL_CACHE``; ``$XDG_CACHE_HOME/bilevel`` or ``~/.cache/bilevel``;
    ``<data_root>/.bilevel_cache``.  An explicitly requested directory (argument or environment)
    that is not writable gives a warning and no cache rather than a silent fallback elsewhere.
    """
    explicit = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if _writable_dir(p):
            return p
        warnings.warn(
            f"cache directory {str(p)!r} is not writable; decoding into memory", BilevelWarning, stacklevel=3
        )
        return None
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates = [Path(xdg) / "bilevel" if xdg else Path.home() / ".cache" / "bilevel"]
    if data_root is not None:
        candidates.append(Path(data_root) / ".bilevel_cache")
    for p in candidates:
        if _writable_dir(p):
            return p
    warnings.warn(
        f"no writable cache directory among {[str(p) for p in candidates]}; set {CACHE_ENV}. "
        "Decoding into memory",
        BilevelWarning,
        stacklevel=3,
    )
    return None


# --------------------------------------------------------------------------------------------------
# Reading and decoding

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


def _resample_filter(resample: str) -> int:
    from PIL import Image

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
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as raw:
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


def _hash_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _decode_into(
    out: np.ndarray,
    source: ImageSource,
    *,
    size: tuple[int, int],
    channels: int,
    resample: Resample,
    invert: bool,
    workers: int,
    progress: bool,
) -> None:
    """Decode every image of ``source`` into ``out`` (N, C, H, W), in order.

    Files are read serially (archives are not shared between threads) and, if ``workers > 1``,
    decoded in a thread pool: Pillow releases the GIL in parts of decoding and resizing.  The result
    does not depend on ``workers``.
    """
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
    h, w = (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"load_image_collection(size={size!r}): sizes must be >= 1")
    if channels not in (1, 3):
        raise ValueError(f"load_image_collection(channels={channels!r}): must be 1 or 3")
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"load_image_collection(resample={resample!r}): one of {_RESAMPLE_NAMES}")
    if len(source.members) != len(source.class_ids):
        raise ValueError("ImageSource: one member list per class id")
    n = source.n_images
    counts = [len(m) for m in source.members]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shape = (n, channels, h, w)
    workers = workers if workers is not None else _default_workers()
    settings = {
        "format": _CACHE_FORMAT,
        "name": source.name,
        "size": [h, w],
        "channels": channels,
        "resample": resample,
        "invert": invert,
        "fingerprint": source.fingerprint,
        "classes": _hash_json([source.class_ids, source.members]),
    }
    key = _hash_json(settings)[:16]
    decode_kw: dict[str, Any] = dict(
        size=(h, w),
        channels=channels,
        resample=resample,
        invert=invert,
        workers=max(1, workers),
        progress=progress,
    )

    cdir = resolve_cache_dir(cache_dir, data_root) if cache else None
    if cdir is None:
        out = np.empty(shape, dtype=np.uint8)
        _decode_into(out, source, **decode_kw)
        return ImageCollection(out, offsets, source.class_ids)

    stem = f"{source.name}-{h}x{w}x{channels}-{key}"
    npy, meta = cdir / f"{stem}.npy", cdir / f"{stem}.json"
    cached = _open_cache(npy, meta, key, shape, source.class_ids, offsets)
    if cached is not None:
        logger.debug("loaded %s from cache %s", source.name, npy)
        return ImageCollection(cached, offsets, source.class_ids)

    logger.info("decoding %d images of %s once into %s", n, source.name, npy)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_npy, tmp_meta = cdir / f"{stem}{tag}.npy", cdir / f"{stem}{tag}.json"
    try:
        try:
            out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as e:
            warnings.warn(
                f"cannot write cache {str(tmp_npy)!r} ({e}); decoding into memory",
                BilevelWarning,
                stacklevel=2,
            )
            mem = np.empty(shape, dtype=np.uint8)
            _decode_into(mem, source, **decode_kw)
            return ImageCollection(mem, offsets, source.class_ids)
        _decode_into(out, source, **decode_kw)
        out.flush()
        del out
        tmp_meta.write_text(
            json.dumps(
                {
                    "key": key,
                    "settings": settings,
                    "class_ids": list(source.class_ids),
                    "offsets": offsets.tolist(),
                    "shape": list(shape),
                }
            ),
            encoding="utf-8",
        )
        # images first, metadata last: a cache is valid only once its .json exists
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)
    finally:
        for p in (tmp_npy, tmp_meta):
            with contextlib.suppress(OSError):
                p.unlink()
    images = np.load(npy, mmap_mode="r")
    return ImageCollection(images, offsets, source.class_ids)


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
