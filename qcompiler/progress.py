"""Progress bars for long stages (calibration over samples, quantizing many tensors).

A thin wrapper over tqdm, imported only when a bar is shown; bars go to stderr and vanish when done, so output and
reports stay clean. The CLI turns them on when stderr is a terminal (``--progress``/``--no-progress`` override).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["track"]

T = TypeVar("T")


def track(items: Iterable[T], *, enabled: bool, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Yield ``items``, showing a progress bar while ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, unit=unit, leave=False) as bar:
        yield from bar
