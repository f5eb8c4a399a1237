"""Python logging for cmpt's command line and trainer: lines that never go silent (docs/architecture.md).

cmpt's modules log to loggers under ``"cmpt"`` (``cmpt.train``, ``cmpt.data``, ...). A library must
not configure logging behind its user's back, so :func:`configure_logging` runs only

* in the command line (``cmpt ...``, every subcommand; ``cmpt --log-level debug ...``), and
* from :class:`cmpt.train.Trainer` when nothing is configured at all — neither the ``"cmpt"`` logger
  nor the root logger has a handler (:func:`ensure_logging`). Without it, Python drops INFO lines
  (its last-resort handler prints warnings only) and a training run started from a script would
  print no step line once its progress bar is off or its output is not a terminal.

Off a terminal (a log file, a pipe, a batch job) the command line also switches off the progress
bars of transformers and huggingface_hub ("Loading weights", "Writing model shards"), which would
fill the log with carriage-return frames (:func:`quiet_progress_bars_off_tty`).

Rank 0 logs at the chosen level; other ranks log warnings and errors only (``RANK`` of ``torchrun``),
each line prefixed with the rank so interleaved output stays readable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["LOG_FORMAT", "configure_logging", "ensure_logging", "quiet_progress_bars_off_tty"]

#: Time, level (only when not INFO) and message: step lines stay short and greppable.
LOG_FORMAT = "%(asctime)s %(rankprefix)s%(levelprefix)s%(message)s"
_MARK = "_cmpt_handler"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


class _Formatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        record.rankprefix = f"[rank {self.rank}] " if self.rank else ""
        record.levelprefix = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (redirected or captured streams keep working)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> logging.Logger:
    """Send the ``"cmpt"`` loggers to ``stream`` (default: the current standard error) at ``level`` on rank 0,
    warnings elsewhere; idempotent (a second call updates the level, it adds no handler)."""
    if isinstance(level, str):
        if level.upper() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
        level = _LEVELS[level.upper()]
    log = logging.getLogger("cmpt")
    rank = _rank()
    handler = next((h for h in log.handlers if getattr(h, _MARK, False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
        setattr(handler, _MARK, True)
        log.addHandler(handler)
    handler.setFormatter(_Formatter(rank))
    log.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return log


def ensure_logging() -> None:
    """:func:`configure_logging` at INFO unless logging is already configured (any handler on the
    ``"cmpt"`` logger or on the root logger)."""
    if not logging.getLogger("cmpt").handlers and not logging.getLogger().handlers:
        configure_logging()


def quiet_progress_bars_off_tty() -> None:
    """Unless standard error is a terminal, switch huggingface_hub's and transformers' progress bars
    off (``HF_HUB_DISABLE_PROGRESS_BARS=1`` for later imports, their switches for done ones) — a
    ``HF_HUB_DISABLE_PROGRESS_BARS`` the user set wins."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:  # already imported (``import cmpt`` registers Auto classes)
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
