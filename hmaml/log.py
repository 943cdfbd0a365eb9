"""Human-facing output: the ``hmaml`` logger and when to draw progress bars.

Lines a person reads (the run header, one line per epoch, what a command did) go through the
``hmaml`` logger to stdout, written through tqdm so that a live bar is not torn; errors stay the
one ``error: ...`` line of :func:`hmaml.errors.one_line_errors`. The level comes from ``-v`` /
``-q`` of the ``hmaml`` command, else from ``HMAML_LOG_LEVEL`` (``DEBUG``, ``INFO``,
``WARNING``, ...), else INFO. Progress bars are drawn only on a terminal: in a SLURM log file a
bar's carriage-return redraws would pile up, and the per-epoch line says the same once.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

LOGGER = logging.getLogger("hmaml")
ENV_LEVEL = "HMAML_LOG_LEVEL"


class _TqdmHandler(logging.Handler):
    """Writes records with ``tqdm.write`` (to stdout), above any bar being drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed stream must not stop training
            self.handleError(record)


def level_for(verbosity: int = 0) -> int:
    """The level for ``verbosity`` (-1 quiet, 0 default, 1 verbose), else ``HMAML_LOG_LEVEL``."""
    if verbosity > 0:
        return logging.DEBUG
    if verbosity < 0:
        return logging.WARNING
    name = os.environ.get(ENV_LEVEL, "INFO").strip().upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def configure(verbosity: int = 0) -> None:
    """Give the ``hmaml`` logger its one handler and level (idempotent)."""
    LOGGER.setLevel(level_for(verbosity))
    if not any(isinstance(h, _TqdmHandler) for h in LOGGER.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False


configure()  # the default level at import; commands apply -v / -q on top


def show_bars(wanted: bool = True) -> bool:
    """Whether to draw progress bars: asked for, and stderr (where tqdm draws) is a terminal."""
    return wanted and sys.stderr.isatty()
