"""What a run was trained on: its class split by class identity, the data listing and the version.

A run's checkpoint holds its `Provenance` (key ``provenance``, a JSON string).  ``--resume`` and
``eval`` rebuild the data on the saved split, never on a recomputed one: a split recomputed from
data that changed (a class folder added) permutes the classes anew, and a class the model was
meta-trained on could then be scored as a test class.  Where the data lacks classes of the saved
split, the run is refused (`bilevel.metalearn.data.datasets.SplitMismatchError`); where it only
holds more classes, the run goes on on its saved split and says so (`notes`).

A checkpoint written before provenance was recorded has none: its split is then read from the
``split.json`` beside it (which `train` has always written), and only where that is missing too is
the split recomputed, with a note that says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import CheckpointError
from ..data.datasets import FewShotData
from ..data.splits import ClassSplit

__all__ = ["Provenance", "saved_provenance"]


def _version() -> str:
    import bilevel  # the package's own version; imported here because bilevel imports this package

    return str(bilevel.__version__)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What a run was trained on.

    Attributes:
        version: ``bilevel.__version__`` of the code that trained it (``""``: not recorded).
        split: the class split (``None``: sinusoid tasks, or not recorded).
        fingerprint: `FewShotData.fingerprint` of the data listing it was trained on (``None``:
            sinusoid, or not recorded).
        n_classes: classes in that listing (``None`` where not recorded).
        source: where this record was read: ``"data"`` (built from the run's data),
            ``"checkpoint"``, or ``"split.json"`` (an older run's folder); for messages only.
    """

    version: str = ""
    split: ClassSplit | None = None
    fingerprint: str | None = None
    n_classes: int | None = None
    source: str = "data"

    @classmethod
    def of(cls, data: FewShotData | None) -> Provenance:
        """The provenance of a new run on ``data`` (``None``: generated sinusoid tasks)."""
        if data is None:
            return cls(version=_version())
        return cls(
            version=_version(),
            split=data.split,
            fingerprint=data.fingerprint,
            n_classes=len(data.collection.class_ids),
        )

    def to_json(self) -> str:
        """The record as a JSON object string (``source`` is not saved)."""
        return json.dumps(
            {
                "version": self.version,
                "split": None if self.split is None else self.split.to_dict(),
                "fingerprint": self.fingerprint,
                "n_classes": self.n_classes,
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: Any, where: str) -> Provenance:
        """Inverse of `to_json`.

        Args:
            text: the saved JSON string.
            where: the file it was read from, for messages.

        Raises:
            CheckpointError: not a JSON object of this form, or a split whose parts overlap.
        """
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
            split = None if d.get("split") is None else ClassSplit.from_dict(d["split"])
            n = d.get("n_classes")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
                raise ValueError(f"n_classes is {n!r}")
            return cls(
                version=str(d.get("version", "")),
                split=split,
                fingerprint=None if d.get("fingerprint") is None else str(d["fingerprint"]),
                n_classes=n,
                source="checkpoint",
            )
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: its 'provenance' is damaged ({err})") from err

    def notes(self, data: FewShotData) -> list[str]:
        """What differs between the data the run was trained on and ``data`` (built on this split).

        Returns:
            One line per difference, each saying what the run does about it; empty where the
            listing is the one trained on.
        """
        if self.split is None:
            return [
                f"no class split recorded with this run ({self.source}): the split was recomputed from the "
                f"data ({len(data.split.train_classes)} train / {len(data.split.test_classes)} test "
                "classes); it matches training only if the data has not changed since"
            ]
        if self.fingerprint is not None and self.fingerprint == data.fingerprint:
            return []
        said = []
        extra = data.unused_classes
        if extra:
            shown = ", ".join(repr(c) for c in extra[:3]) + (", ..." if len(extra) > 3 else "")
            said.append(
                f"the data holds {len(extra)} class(es) outside the run's saved split ({shown}): they are "
                "not used; the run keeps the split it was trained on"
            )
        if self.fingerprint is not None:
            said.append(
                f"the data listing differs from the one trained on (fingerprint {self.fingerprint[:12]}, "
                f"now {data.fingerprint[:12]}; {self.n_classes} classes then, "
                f"{len(data.collection.class_ids)} now): the saved split is used"
            )
        return said


def saved_provenance(ck: Mapping[str, Any], path: str | os.PathLike[str]) -> Provenance:
    """The provenance of a checkpoint (`load_checkpoint`), or of an older one, its folder's split.

    Args:
        ck: the checkpoint's dict.
        path: its file (the ``split.json`` of an older run is looked for beside it).

    Returns:
        The saved `Provenance`; for a checkpoint without one, a record of unknown version whose
        split is the ``split.json`` beside it (``source="split.json"``), or, without that file
        too, a record of nothing (``split=None``, ``source="an older checkpoint"``): the data is
        then split afresh, and `Provenance.notes` says so.

    Raises:
        CheckpointError: the saved provenance, or the ``split.json`` beside an older checkpoint, is
            damaged.
    """
    p = Path(path)
    if ck.get("provenance") is not None:
        return Provenance.from_json(ck["provenance"], str(p))
    beside = (p if p.is_dir() else p.parent) / "split.json"
    if beside.is_file():
        try:
            split = ClassSplit.load_json(beside)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{beside}: the class split of the run of {p} is damaged ({err}); the split is never "
                "recomputed for a trained run: restore the file"
            ) from err
        return Provenance(split=split, source="split.json")
    return Provenance(source="an older checkpoint")
