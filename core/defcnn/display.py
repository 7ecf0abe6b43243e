"""How numbers are shown to people: the console, report.md, summary.md.

One place decides what a missing value looks like, so no `None`, `nan` or dict text
reaches a reader. Torch-free: the reports and the CLI use it.
"""

from __future__ import annotations

import math

MISSING = "-"  # a number that does not exist (an empty subset, nothing measured)
NO_SUCCESS = "n/a (no success)"  # queries to succeed when no image was fooled
NONE_FOUND = "n/a (none found)"  # a closest adversarial when none was found


def number(value: float | int | None, *, missing: str = MISSING, digits: int = 3) -> str:
    """`value` rounded for reading: ints as they are, floats to `digits` decimals (none
    past 100); None and NaN as `missing`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.0f}"


def queries(value: float | None) -> str:
    """Mean or median queries to succeed; `NO_SUCCESS` when no image succeeded."""
    return number(value, missing=NO_SUCCESS, digits=1)


def distance(value: float | None) -> str:
    """An L2 distance of the closest adversarial; `NONE_FOUND` when none was found."""
    return number(value, missing=NONE_FOUND, digits=3)
