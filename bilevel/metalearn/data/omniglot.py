"""Omniglot (Lake et al. 2015) for few-shot learning, read from the official archives with Pillow.

Usage::

    data = load_omniglot("/data/omniglot", split="vinyals", seed=0)   # FewShotData
    data.train.n_classes   # 4800 = 1200 characters x 4 rotations
    data.test.n_classes    # 1692 = 423 characters x 4 rotations (test_rotations=True)
    data.split.save_json(run_dir / "split.json")

See `bilevel.metalearn.data.datasets` for the whole pipeline (tasks, models) and `TaskSampler` in
`bilevel.metalearn.tasks` for drawing tasks.

Images: the 105x105 1-bit drawings are converted to grayscale, resized to 28x28 (LANCZOS by
default) and inverted, so strokes are 1.0 and the background 0.0 once the sampler scales the
cached ``uint8`` to ``float32``.  All 32,460 drawings are decoded once into the cache.

Splits:

* ``"vinyals"`` (Vinyals et al. 2016, Finn et al. 2017): the 1623 character ids sorted, permuted with
  ``numpy.random.default_rng(seed)``; the first ``n_train`` (1200) are meta-training, of which the
  last ``n_val`` are held out for validation; the remaining 423 are for testing.  The test part does
  not depend on ``n_val``.
* ``"lake"``: background alphabets (964 characters) for meta-training (``n_val`` of them held out by
  a seeded permutation), evaluation alphabets (659 characters) for testing.

Every character rotated by 0, 90, 180 and 270 degrees gives four classes (``train_rotations``,
``test_rotations``; the test default follows Finn et al.'s released protocol).
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from .cache import load_image_collection
from .datasets import DatasetFormatError, DatasetNotFoundError, FewShotData, make_few_shot_data
from .locations import resolve_data_root
from .sources import ImageSource, Reader, Resample, file_reader, hash_json, list_class_folders, zip_reader
from .splits import ClassSplit, split_classes

__all__ = [
    "OMNIGLOT_HELP",
    "lake_split",
    "load_omniglot",
    "omniglot_class_ids",
    "omniglot_source",
    "vinyals_split",
]

#: The two image sets of the official release, also the first component of every class id.
SETS = ("images_background", "images_evaluation")

OMNIGLOT_HELP = (
    "Omniglot is expected in the data root (or in <root>/omniglot or <root>/omniglot-py) as the two official "
    "archives\n"
    "  images_background.zip  images_evaluation.zip\n"
    "or as their unpacked folders\n"
    "  images_background/<Alphabet>/<characterNN>/<IIII>_<DD>.png\n"
    "  images_evaluation/<Alphabet>/<characterNN>/<IIII>_<DD>.png\n"
    "Get them from https://github.com/brendenlake/omniglot (python/images_background.zip and "
    "python/images_evaluation.zip)."
)

_MEMBER = re.compile(r"^(images_background|images_evaluation)/([^/]+)/([^/]+)/([^/]+\.png)$", re.IGNORECASE)


def _candidates(root: Path) -> list[Path]:
    return [root, root / "omniglot", root / "omniglot-py"]


def _locate(root: Path) -> tuple[Path, dict[str, Path]]:
    """The directory holding both sets and, per set, its zip or folder."""
    for base in _candidates(root):
        found: dict[str, Path] = {}
        for s in SETS:
            if (base / f"{s}.zip").is_file():
                found[s] = base / f"{s}.zip"
            elif (base / s).is_dir():
                found[s] = base / s
        if len(found) == len(SETS):
            return base, found
    raise DatasetNotFoundError(
        f"Omniglot: images_background and images_evaluation (zip or folder) not found under {str(root)!r}.\n"
        + OMNIGLOT_HELP
    )


def _list_zip(path: Path, set_name: str) -> dict[str, list[tuple[str, int, int]]]:
    """class id -> [(member, crc, size)] of the PNGs of one archive."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetFormatError(
            f"Omniglot: {str(path)!r} is not a readable zip archive ({e}).\n" + OMNIGLOT_HELP
        ) from e
    classes: dict[str, list[tuple[str, int, int]]] = {}
    for info in infos:
        m = _MEMBER.match(info.filename)
        if info.is_dir() or m is None or m.group(1) != set_name or any(p.startswith(".") for p in m.groups()):
            continue
        classes.setdefault(f"{m.group(1)}/{m.group(2)}/{m.group(3)}", []).append(
            (info.filename, info.CRC, info.file_size)
        )
    if not classes:
        raise DatasetFormatError(
            f"Omniglot: archive {str(path)!r} holds no {set_name}/<Alphabet>/<character>/*.png.\n"
            + OMNIGLOT_HELP
        )
    return classes


def _list_folder(base: Path, set_name: str) -> dict[str, list[tuple[str, int, int]]]:
    """class id -> [(relative path, mtime_ns, size)] of the PNGs of one unpacked set."""
    classes: dict[str, list[tuple[str, int, int]]] = {}
    top = base / set_name
    for alphabet in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
        chars = list_class_folders(base, f"{set_name}/{alphabet.name}")
        for char, entries in chars.items():
            pngs = [e for e in entries if e[0].lower().endswith(".png")]
            if pngs:
                classes[f"{set_name}/{alphabet.name}/{char}"] = pngs
    if not classes:
        raise DatasetFormatError(
            f"Omniglot: folder {str(top)!r} holds no <Alphabet>/<character>/*.png.\n" + OMNIGLOT_HELP
        )
    return classes


def omniglot_source(data_root: str | os.PathLike[str] | None = None) -> ImageSource:
    """List every Omniglot drawing without decoding anything.

    Args:
        data_root: folder with the archives or folders (see `OMNIGLOT_HELP`); default
            ``$BILEVEL_DATA_ROOT``.

    Returns:
        ImageSource whose class ids (e.g. ``"images_background/Greek/character01"``) are sorted and
        whose drawings are sorted by file name within each character.

    Raises:
        DatasetNotFoundError: no data root, or the sets are not found.
        DatasetFormatError: an archive is damaged or holds no drawings in the expected layout.
    """
    root = resolve_data_root(data_root, dataset="Omniglot", help_text=OMNIGLOT_HELP)
    base, found = _locate(root)
    listing: dict[str, list[tuple[str, int, int]]] = {}
    factories: dict[str, Callable[[], contextlib.AbstractContextManager[Reader]]] = {}
    for s, path in found.items():
        if path.suffix == ".zip":
            listing.update(_list_zip(path, s))
            factories[s] = zip_reader({s: path}, OMNIGLOT_HELP)
        else:
            listing.update(_list_folder(base, s))
            factories[s] = file_reader(base)
    class_ids = tuple(sorted(listing))
    members = tuple(tuple(sorted(e[0] for e in listing[c])) for c in class_ids)
    fingerprint = hash_json([sorted(listing[c]) for c in class_ids])

    @contextlib.contextmanager
    def opener() -> Iterator[Reader]:
        with contextlib.ExitStack() as stack:
            reads = {s: stack.enter_context(f()) for s, f in factories.items()}
            yield lambda ref: reads[ref.split("/", 1)[0]](ref)

    return ImageSource("omniglot", class_ids, members, fingerprint, opener)


def omniglot_class_ids(data_root: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The sorted character ids (1623 for the full dataset), read from the archive listing only."""
    return omniglot_source(data_root).class_ids


def vinyals_split(
    class_ids: tuple[str, ...] | list[str], *, seed: int = 0, n_train: int = 1200, n_val: int = 0
) -> ClassSplit:
    """The Vinyals et al. character split: ``n_train`` for meta-training (``n_val`` of them for validation).

    Args:
        class_ids: all character ids (sorted here, so listing order does not matter).
        seed: permutation seed.
        n_train: characters for meta-training and validation together (1200 in the literature).
        n_val: how many of the ``n_train`` are held out for validation.

    Returns:
        ClassSplit with ``n_train - n_val`` / ``n_val`` / ``len(class_ids) - n_train`` characters.

    Raises:
        ValueError: ``n_train`` not in ``[1, len(class_ids) - 1]`` or ``n_val`` not in ``[0, n_train - 1]``.
    """
    n = len(class_ids)
    if not 1 <= n_train < n:
        raise ValueError(f"vinyals_split(n_train={n_train}): must be in [1, {n - 1}] for {n} characters")
    if not 0 <= n_val < n_train:
        raise ValueError(f"vinyals_split(n_val={n_val}): must be in [0, n_train - 1 = {n_train - 1}]")
    return split_classes(class_ids, (n_train - n_val, n_val, n - n_train), seed=seed, name="omniglot/vinyals")


def lake_split(class_ids: tuple[str, ...] | list[str], *, seed: int = 0, n_val: int = 0) -> ClassSplit:
    """Lake et al.'s split: background alphabets for meta-training, evaluation alphabets for testing.

    Args:
        class_ids: all character ids (``images_background/...`` and ``images_evaluation/...``).
        seed: seed of the permutation that picks the ``n_val`` validation characters.
        n_val: background characters held out for validation.

    Raises:
        ValueError: one of the two sets is empty or ``n_val`` leaves no training character.
    """
    bg = sorted(c for c in class_ids if c.startswith("images_background/"))
    ev = sorted(c for c in class_ids if c.startswith("images_evaluation/"))
    if not bg or not ev:
        raise ValueError("lake_split: needs characters from both images_background and images_evaluation")
    if not 0 <= n_val < len(bg):
        raise ValueError(f"lake_split(n_val={n_val}): must be in [0, {len(bg) - 1}]")
    part = split_classes(bg, (len(bg) - n_val, n_val, 0), seed=seed)
    return ClassSplit(part.train_classes, part.val_classes, tuple(ev), name="omniglot/lake", seed=seed)


def load_omniglot(
    data_root: str | os.PathLike[str] | None = None,
    *,
    split: Literal["vinyals", "lake"] | ClassSplit = "vinyals",
    seed: int = 0,
    n_train: int = 1200,
    n_val: int = 0,
    train_rotations: bool = True,
    test_rotations: bool = True,
    image_size: int = 28,
    resample: Resample = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> FewShotData:
    """Load Omniglot (decoded once, then memory-mapped from the cache) and split it.

    Args:
        data_root: see `omniglot_source`.
        split: ``"vinyals"``, ``"lake"`` or a saved `ClassSplit` (e.g. ``ClassSplit.load_json``).
        seed: split seed (ignored for a given `ClassSplit`).
        n_train: characters for meta-training + validation in the ``"vinyals"`` split.
        n_val: validation characters, carved out of the training part.
        train_rotations: each training character gives 4 classes (0/90/180/270 degrees).
        test_rotations: the same for validation and test characters.
        image_size: side of the square images (28 in the literature).
        resample: Pillow filter for the 105 -> ``image_size`` reduction.
        cache_dir: see `bilevel.metalearn.data.locations.resolve_cache_dir`.
        cache: ``False`` decodes into memory and writes nothing.
        workers: decoding threads.
        progress: tqdm progress bar during the one-time decode.

    Returns:
        FewShotData with images ``(32460, 1, image_size, image_size)`` ``uint8`` (strokes 255).

    Raises:
        DatasetNotFoundError: the data is missing (the message says where to get it).
        DatasetFormatError: an archive is damaged, or a given split names unknown characters.
        ValueError: bad split sizes.
    """
    root = resolve_data_root(data_root, dataset="Omniglot", help_text=OMNIGLOT_HELP)
    source = omniglot_source(root)
    if isinstance(split, ClassSplit):
        the_split = split
    elif split == "vinyals":
        the_split = vinyals_split(source.class_ids, seed=seed, n_train=n_train, n_val=n_val)
    elif split == "lake":
        the_split = lake_split(source.class_ids, seed=seed, n_val=n_val)
    else:
        raise ValueError(f"load_omniglot(split={split!r}): 'vinyals', 'lake' or a ClassSplit")
    collection = load_image_collection(
        source,
        size=(image_size, image_size),
        channels=1,
        resample=resample,
        invert=True,
        cache_dir=cache_dir,
        data_root=root,
        cache=cache,
        workers=workers,
        progress=progress,
    )
    rot = (0, 1, 2, 3)
    return make_few_shot_data(
        "omniglot",
        collection,
        the_split,
        train_rotations=rot if train_rotations else (0,),
        test_rotations=rot if test_rotations else (0,),
    )
