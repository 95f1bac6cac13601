"""The seam between bilevel's core and its applications (`bilevel.metalearn`): helpers both use
that are not part of the user's API, imported from here rather than from the core's private
modules (Lineax and Optimistix keep the same seam in their ``internal``)."""

from __future__ import annotations

from ._settings import check_flag, check_int, check_positive

__all__ = ["check_flag", "check_int", "check_positive"]
