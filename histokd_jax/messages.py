"""Progress lines for the person at the terminal, and reasons and short lists for error messages, log
lines and the rows of skipped_*.csv files."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from tqdm.auto import tqdm


def say(message: str) -> None:
    """A progress message for the person at the terminal (process 0 only, tqdm-safe)."""
    if jax.process_index() == 0:
        tqdm.write(message)


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing: a reason that fits one log line
    or one CSV cell (OpenSlide and PIL errors can run over several lines)."""
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def listed(items: Sequence[str], *, limit: int = 5) -> str:
    """``"a; b; and 3 more"``: the first ``limit`` of the things an error names, and how many it leaves out."""
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more
