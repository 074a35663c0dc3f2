"""The square's symmetries (flips and quarter turns), applied alike to images and feature maps.

Cheaper teacher targets (``steps.expand_views``, cached targets in ``data.views``) turn a
student view and its teacher map by the same element, which keeps them paired. Kept apart
from the data and step modules so both can use it without importing each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The 8 elements of the square's symmetry group as (mirror left-right first?, quarter turns), ordered so
# that the first K are as different as possible for small K (identity, half turn, mirror, quarter turn...).
DIHEDRAL: tuple[tuple[bool, int], ...] = (
    (False, 0), (False, 2), (True, 0), (False, 1), (True, 1), (False, 3), (True, 2), (True, 3)
)


def dihedral(x: Any, index: int, *, axes: tuple[int, int] = (1, 2)) -> Any:
    """Element ``index`` of ``DIHEDRAL`` applied to the (row, column) ``axes`` of a numpy or jax array.

    The same call turns an NHWC batch of images and an NHWC batch of feature maps
    alike, which is what keeps a student view paired with its teacher target.
    """
    mirror, turns = DIHEDRAL[index]
    if isinstance(x, np.ndarray):
        xp = np
    else:  # jax arrays and tracers; imported here so grain's workers, which see numpy only, never load jax
        import jax.numpy as xp
    if mirror:
        x = xp.flip(x, axis=axes[1])
    return xp.rot90(x, k=turns, axes=axes)
