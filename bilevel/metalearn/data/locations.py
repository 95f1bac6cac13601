"""Where data and caches live: the data root and the decoded-image cache directory.

* the data root is the ``data_root`` argument, else the environment variable ``BILEVEL_DATA_ROOT``;
  each dataset also looks in a conventional sub-folder (``<root>/omniglot``, ``<root>/miniimagenet``);
* the cache directory is the ``cache_dir`` argument, else ``BILEVEL_CACHE``, else
  ``$XDG_CACHE_HOME/bilevel`` (``~/.cache/bilevel``), else ``<data root>/.bilevel_cache``; where none is
  writable the images are decoded into memory with a warning.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from ... import BilevelWarning
from .datasets import DatasetNotFoundError

__all__ = ["CACHE_ENV", "DATA_ROOT_ENV", "resolve_cache_dir", "resolve_data_root"]

#: Environment variable naming the data root when ``data_root`` is not given.
DATA_ROOT_ENV = "BILEVEL_DATA_ROOT"
#: Environment variable naming the cache directory when ``cache_dir`` is not given.
CACHE_ENV = "BILEVEL_CACHE"


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
