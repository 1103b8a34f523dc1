"""What kdjax tells the person at the terminal: a line per finished epoch of each run, notices of
long work (a first decode, a download) and progress bars while it runs.

One switch governs it, the level of the ``kdjax`` logger, which the command lines set from
``--quiet`` / ``--verbose`` (``kdjax.cli.flags.setup_logging``): above INFO (``--quiet``) these
lines and bars are off; left unset (kdjax used as a library) or at INFO and below they are on.
Only process 0 of a multi-process run speaks. Bars are drawn only on a terminal: a log file
gets the lines without the bars' carriage-return redraws.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

_LOGGER = logging.getLogger("kdjax")


def enabled() -> bool:
    """Whether progress lines are shown: on unless the ``kdjax`` logger is set above INFO, and
    only on process 0."""
    from kdjax import distributed

    level = _LOGGER.level
    return distributed.is_primary() and (level == logging.NOTSET or level <= logging.INFO)


def line(msg: str) -> None:
    """One line on stderr, above any progress bar."""
    if enabled():
        tqdm.write(msg, file=sys.stderr)


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr, drawn only when lines are shown and stderr is a terminal."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    # tqdm's disable=None: off where the stream is not a terminal
    return tqdm(iterable, disable=None if enabled() else True, **kwargs)
