"""Memoised IOD look-ups for highdicom: a speed shim.

highdicom answers "may attribute X appear in the IOD of SOP class Y?" by walking the standard's
module tables on every call (several milliseconds each). Building the derived objects of the
realistic slab asks it thousands of times, once or more per referenced source image: about
half of the build time. The answer depends only on the arguments, so :func:`install` puts a
cached version in the highdicom modules that call it. The cached function returns exactly what
highdicom's does (``tests/test_derived.py`` checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import highdicom._standard_utils as standard_utils
import highdicom.base
import highdicom.sr.content

_ORIGINAL = standard_utils.is_attribute_in_iod
_CALLERS = (standard_utils, highdicom.base, highdicom.sr.content)


@functools.cache
def _cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return bool(_ORIGINAL(attribute, sop_class_uid,
                          None if exclude is None else list(exclude)))


def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                        exclude_path_elements: Sequence[str] | None = None) -> bool:
    """highdicom's ``is_attribute_in_iod``, memoised on its arguments."""
    exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _cached(str(attribute), str(sop_class_uid), exclude)


def install() -> None:
    """Use the memoised look-up wherever highdicom calls it (idempotent)."""
    for module in _CALLERS:
        if getattr(module, "is_attribute_in_iod", None) is _ORIGINAL:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]
