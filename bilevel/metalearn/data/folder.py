"""A generic few-shot image dataset: one folder per class (``--dataset folder --data-root PATH``).

Usage::

    data = load_image_folder("/data/my_classes", image_size=32, channels=3, sizes=(0.7, 0.1, 0.2))
    data.split.save_json(run_dir / "split.json")

Layout: ``<root>/<class>/<image>`` with any image size and any format Pillow reads (suffixes in
`bilevel.metalearn.data.sources.IMAGE_SUFFIXES`); hidden files and folders (``.name``) are skipped, so
a ``<root>/.bilevel_cache`` does not become a class.  Classes are split deterministically by
`bilevel.metalearn.data.splits.split_classes` (sorted names, seeded permutation).
"""

from __future__ import annotations

import os

from .cache import load_image_collection
from .datasets import DatasetFormatError, FewShotData, make_few_shot_data
from .locations import resolve_data_root
from .sources import ImageSource, Resample, file_reader, hash_json, list_class_folders
from .splits import ClassSplit, split_classes

__all__ = ["FOLDER_HELP", "classes_needed", "image_folder_source", "load_image_folder"]

FOLDER_HELP = (
    "An image-folder dataset is one sub-folder per class directly under the data root, each holding that "
    "class's images:\n  <root>/<class_a>/img001.png  <root>/<class_a>/img002.jpg  <root>/<class_b>/...\n"
    "Any size and any format Pillow reads; hidden entries are ignored."
)


def image_folder_source(
    data_root: str | os.PathLike[str] | None = None, *, min_images: int = 1
) -> ImageSource:
    """List a folder-per-class dataset without decoding it.

    Args:
        data_root: the folder holding the class folders; default ``$BILEVEL_DATA_ROOT``.
        min_images: every class must have at least this many images (e.g. shots + queries).

    Returns:
        ImageSource with sorted class names (the folder names) and sorted images.

    Raises:
        DatasetNotFoundError: ``data_root`` is missing.
        DatasetFormatError: no class folders, or a class with fewer than ``min_images`` images.
    """
    root = resolve_data_root(data_root, dataset="image folder", help_text=FOLDER_HELP)
    listing = list_class_folders(root, "")
    if not listing:
        raise DatasetFormatError(f"image folder {str(root)!r}: no class folders found.\n{FOLDER_HELP}")
    small = {c: len(e) for c, e in listing.items() if len(e) < max(1, min_images)}
    if small:
        shown = ", ".join(f"{c!r} ({n})" for c, n in sorted(small.items())[:5])
        raise DatasetFormatError(
            f"image folder {str(root)!r}: {len(small)} class folder(s) have fewer than {max(1, min_images)} "
            f"images: {shown}.\n{FOLDER_HELP}"
        )
    class_ids = tuple(sorted(listing))
    members = tuple(tuple(e[0] for e in listing[c]) for c in class_ids)
    fingerprint = hash_json([listing[c] for c in class_ids])
    return ImageSource("folder", class_ids, members, fingerprint, file_reader(root))


def classes_needed(sizes: tuple[int, int, int] | tuple[float, float, float]) -> int:
    """The fewest classes `split_classes` can split by ``sizes`` (each part asked for gets a class).

    Raises:
        ValueError: ``sizes`` that no number of classes satisfies (`split_classes`'s checks).
    """
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        need = max(1, sum(int(s) for s in sizes))
        split_classes([str(i) for i in range(need)], sizes)  # its checks of the counts
        return need
    for n in range(1, 10_001):
        try:
            split_classes([str(i) for i in range(n)], sizes)
        except ValueError:
            continue
        return n
    raise ValueError(f"load_image_folder(sizes={sizes!r}): no number of classes up to 10000 can be split so")


def _split(
    class_ids: tuple[str, ...],
    sizes: tuple[int, int, int] | tuple[float, float, float],
    seed: int,
    root: object,
) -> ClassSplit:
    """`split_classes` of the folder's classes, refusing a folder with too few for ``sizes``."""
    need = classes_needed(sizes)
    if len(class_ids) < need:
        raise DatasetFormatError(
            f"image folder {str(root)!r}: found {len(class_ids)} class folder(s), but the split "
            f"{sizes!r} (train, val, test) needs at least {need}: add class folders, or give other sizes"
        )
    return split_classes(class_ids, sizes, seed=seed, name="folder")


def load_image_folder(
    data_root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | tuple[int, int] = 28,
    channels: int = 1,
    sizes: tuple[int, int, int] | tuple[float, float, float] = (0.7, 0.1, 0.2),
    split: ClassSplit | None = None,
    seed: int = 0,
    min_images: int = 1,
    invert: bool = False,
    rotations: bool = False,
    resample: Resample = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> FewShotData:
    """Load a folder-per-class dataset, decoded once into the cache, and split its classes.

    Args:
        data_root: see `image_folder_source`.
        image_size: ``(H, W)`` or the side of square images; every image is resized to it.
        channels: 1 (grayscale) or 3 (RGB).
        sizes: ``(train, val, test)`` class counts or fractions (see `split_classes`).
        split: a saved split to use instead of ``sizes`` and ``seed``.
        seed: split seed.
        min_images: minimum images per class (pass shots + queries to fail early).
        invert: store ``255 - pixel`` (dark strokes on a light background become bright).
        rotations: make each class four classes (0/90/180/270 degrees) in every part; needs square images.
        resample: Pillow resize filter.
        cache_dir: see `bilevel.metalearn.data.locations.resolve_cache_dir`.
        cache: ``False`` decodes into memory and writes nothing.
        workers: decoding threads.
        progress: tqdm progress bar during the one-time decode.

    Returns:
        FewShotData with images ``(N, channels, H, W)`` ``uint8``.

    Raises:
        DatasetNotFoundError: the folder is missing.
        DatasetFormatError: bad layout, too few images in a class, fewer classes than ``sizes``
            needs (`classes_needed`), or an unreadable image.
        SplitMismatchError: ``split`` names classes the folder does not hold.
        ValueError: bad ``sizes``, ``image_size`` or ``channels``.
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder(channels={channels!r}): must be 1 or 3")
    if rotations and hw[0] != hw[1]:
        raise ValueError(
            f"load_image_folder(rotations=True): needs square images, got image_size={image_size!r}"
        )
    root = resolve_data_root(data_root, dataset="image folder", help_text=FOLDER_HELP)
    source = image_folder_source(root, min_images=min_images)
    the_split = split if split is not None else _split(source.class_ids, sizes, seed, root)
    collection = load_image_collection(
        source,
        size=hw,
        channels=channels,
        resample=resample,
        invert=invert,
        cache_dir=cache_dir,
        data_root=root,
        cache=cache,
        workers=workers,
        progress=progress,
    )
    rot = (0, 1, 2, 3) if rotations else (0,)
    return make_few_shot_data("folder", collection, the_split, train_rotations=rot, test_rotations=rot)
