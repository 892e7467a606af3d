"""Progress bars on a terminal only.

When the output is not a terminal (a log file, CI, a cluster job, nohup), a tqdm bar writes
every frame into the log: one epoch becomes a single line of thousands of characters. There the
bars are off and the callers print one line per epoch (or per stage) instead.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether progress bars can redraw in place (standard error is a terminal)."""
    return sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar that is shown only when ``enabled`` and standard error is a terminal."""
    return tqdm(total=total, desc=desc, disable=not (enabled and interactive()), **kwargs)
