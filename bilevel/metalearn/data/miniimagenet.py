"""Mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

Usage::

    data = load_miniimagenet("/data/miniimagenet")   # FewShotData, images (60000, 3, 84, 84) uint8
    data.train.n_classes, data.val.n_classes, data.test.n_classes   # 64, 16, 20

Two layouts are read (see `MINIIMAGENET_HELP`); the split is the one the files define (the CSV
files, or the ``train/val/test`` folders), 64/16/20 classes of 600 images in the standard release.
Images are decoded once (RGB, resized to 84x84 with LANCZOS where they are not already that size)
into a cached ``uint8`` array stored channel-first, ``(N, 3, 84, 84)``, and memory-mapped afterwards.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .cache import load_image_collection
from .datasets import DatasetFormatError, DatasetNotFoundError, FewShotData, make_few_shot_data
from .locations import resolve_data_root
from .sources import ImageSource, Resample, file_reader, hash_json, list_class_folders
from .splits import ClassSplit

__all__ = ["MINIIMAGENET_HELP", "load_miniimagenet", "miniimagenet_source"]

PARTS = ("train", "val", "test")

MINIIMAGENET_HELP = (
    "Mini-ImageNet is expected in the data root (or in <root>/miniimagenet, <root>/mini-imagenet, "
    "<root>/mini_imagenet, <root>/miniImagenet) in one of two layouts:\n"
    "  (a) CSV split files (Ravi & Larochelle): train.csv, val.csv, test.csv, each with the header line\n"
    "      'filename,label', and an images/ folder holding every listed file (images/<filename>);\n"
    "  (b) one folder per class: train/<class>/*.jpg, val/<class>/*.jpg, test/<class>/*.jpg.\n"
    "The standard split has 64/16/20 classes of 600 images; the CSV files are in "
    "https://github.com/twitter/meta-learning-lstm (data/miniImagenet) and the images come from ImageNet "
    "(ILSVRC-2012)."
)


def _candidates(root: Path) -> list[Path]:
    return [root] + [root / n for n in ("miniimagenet", "mini-imagenet", "mini_imagenet", "miniImagenet")]


def _read_csv(path: Path) -> dict[str, list[str]]:
    """label -> file names, from one split file with header ``filename,label``."""
    classes: dict[str, list[str]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFormatError(
            f"Mini-ImageNet: cannot read {str(path)!r}: {e}.\n{MINIIMAGENET_HELP}"
        ) from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DatasetFormatError(
            f"Mini-ImageNet: {str(path)!r} must start with the header 'filename,label', "
            f"got {rows[0] if rows else 'an empty file'!r}.\n{MINIIMAGENET_HELP}"
        )
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetFormatError(
                f"Mini-ImageNet: {str(path)!r} line {i}: expected 'filename,label', got {row!r}"
            )
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    if not classes:
        raise DatasetFormatError(f"Mini-ImageNet: {str(path)!r} lists no images.\n{MINIIMAGENET_HELP}")
    return classes


def _csv_layout(base: Path) -> tuple[dict[str, dict[str, list[tuple[str, int, int]]]], str]:
    images = base / "images"
    if not images.is_dir():
        raise DatasetNotFoundError(
            f"Mini-ImageNet: found the CSV split files in {str(base)!r} but no images/ folder.\n"
            + MINIIMAGENET_HELP
        )
    parts: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
    for part in PARTS:
        listing = _read_csv(base / f"{part}.csv")
        entries: dict[str, list[tuple[str, int, int]]] = {}
        for label, files in listing.items():
            rows = []
            for name in sorted(set(files)):
                ref = f"images/{name}"
                try:
                    st = (base / ref).stat()
                except OSError:
                    raise DatasetFormatError(
                        f"Mini-ImageNet: {part}.csv lists {name!r} but {str(base / ref)!r} does not exist.\n"
                        + MINIIMAGENET_HELP
                    ) from None
                rows.append((ref, st.st_mtime_ns, st.st_size))
            entries[label] = rows
        parts[part] = entries
    return parts, "csv"


def _folder_layout(base: Path) -> tuple[dict[str, dict[str, list[tuple[str, int, int]]]], str]:
    parts: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
    for part in PARTS:
        listing = list_class_folders(base, part)
        if not listing:
            raise DatasetFormatError(
                f"Mini-ImageNet: {str(base / part)!r} has no class folders.\n{MINIIMAGENET_HELP}"
            )
        empty = [c for c, e in listing.items() if not e]
        if empty:
            raise DatasetFormatError(
                f"Mini-ImageNet: class folders without images in {str(base / part)!r}: {empty[:5]}.\n"
                + MINIIMAGENET_HELP
            )
        parts[part] = listing
    return parts, "folders"


def miniimagenet_source(data_root: str | os.PathLike[str] | None = None) -> tuple[ImageSource, ClassSplit]:
    """List Mini-ImageNet's images and read its split, without decoding anything.

    Args:
        data_root: folder holding one of the two layouts of `MINIIMAGENET_HELP`; default
            ``$BILEVEL_DATA_ROOT``.

    Returns:
        ``(source, split)``: class ids are the labels (WordNet ids in the standard release), train
        classes first, then val, then test, each sorted; images sorted by file name.

    Raises:
        DatasetNotFoundError: neither layout is found.
        DatasetFormatError: a malformed CSV, a listed file that does not exist, an empty class, or
            a class in two parts.
    """
    root = resolve_data_root(data_root, dataset="Mini-ImageNet", help_text=MINIIMAGENET_HELP)
    for base in _candidates(root):
        if all((base / f"{p}.csv").is_file() for p in PARTS):
            parts, layout = _csv_layout(base)
            break
        if all((base / p).is_dir() for p in PARTS):
            parts, layout = _folder_layout(base)
            break
    else:
        raise DatasetNotFoundError(
            f"Mini-ImageNet: neither train/val/test.csv nor train/val/test folders under {str(root)!r}.\n"
            + MINIIMAGENET_HELP
        )
    try:
        train, val, test = (tuple(sorted(parts[p])) for p in PARTS)
        split = ClassSplit(train, val, test, name=f"miniimagenet/ravi ({layout})")
    except ValueError as e:
        raise DatasetFormatError(f"Mini-ImageNet: {e}") from e
    class_ids = split.all_classes
    owner = {c: p for p in PARTS for c in parts[p]}
    members = tuple(tuple(e[0] for e in parts[owner[c]][c]) for c in class_ids)
    fingerprint = hash_json([layout, [parts[owner[c]][c] for c in class_ids]])
    return ImageSource("miniimagenet", class_ids, members, fingerprint, file_reader(base)), split


def load_miniimagenet(
    data_root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 84,
    split: ClassSplit | None = None,
    resample: Resample = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> FewShotData:
    """Load Mini-ImageNet (decoded once, then memory-mapped) with the split its files define.

    Args:
        data_root: see `miniimagenet_source`.
        image_size: side of the square images (84 in the literature).
        split: a saved split to use instead of the one the files define.
        resample: Pillow filter for images of another size.
        cache_dir: see `bilevel.metalearn.data.locations.resolve_cache_dir`.
        cache: ``False`` decodes into memory and writes nothing.
        workers: decoding threads.
        progress: tqdm progress bar during the one-time decode.

    Returns:
        FewShotData with images ``(N, 3, image_size, image_size)`` ``uint8`` and no rotations.

    Raises:
        DatasetNotFoundError: the data is missing (the message explains the expected layouts).
        DatasetFormatError: malformed files or an unreadable image.
    """
    root = resolve_data_root(data_root, dataset="Mini-ImageNet", help_text=MINIIMAGENET_HELP)
    source, files_split = miniimagenet_source(root)
    collection = load_image_collection(
        source,
        size=(image_size, image_size),
        channels=3,
        resample=resample,
        cache_dir=cache_dir,
        data_root=root,
        cache=cache,
        workers=workers,
        progress=progress,
    )
    return make_few_shot_data("miniimagenet", collection, files_split if split is None else split)
