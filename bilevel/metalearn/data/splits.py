"""Class splits: which classes are for meta-training, validation and testing.

A split is saved with every run (``split.json``) and checked to be disjoint at construction, so a
saved split can never leak test classes into meta-training.  `split_classes` makes a deterministic
random split from a set of class ids; the fixed splits of Omniglot and Mini-ImageNet are built in
their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ClassSplit", "split_classes"]


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

    def __repr__(self) -> str:
        # The class ids themselves run to thousands of strings: counts only (see `to_dict`).
        return (
            f"ClassSplit({self.name!r}, {len(self.train_classes):,} train / {len(self.val_classes):,} val / "
            f"{len(self.test_classes):,} test classes, seed={self.seed})"
        )

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
