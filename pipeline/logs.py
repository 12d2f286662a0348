"""Where messages go: the terminal shows our progress line, our warnings and our errors; Beam's
logs (its INFO chatter, its workers' output in multi_processing runs) go to OUTPUT/run/beam.log.

- Beam logs through the root logger as it is imported (`apitools not found ...`), and
  `logging.warning()` on a root logger without handlers installs a stderr handler for every later
  record. `silence_import_noise()` runs before Beam is imported, so that never happens.
- `configure(log_path)` sends every record to the log file and only our packages' warnings and
  errors to the terminal.
- `beam_output_to_log(log_path)` points file descriptor 2 at the log file while a pipeline runs:
  the DirectRunner's worker processes inherit it and write their logs straight to it. Our own
  progress line and messages keep the real terminal (`terminal()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import IO, Optional

OUR_LOGGERS = ("curate", "pipeline", "transforms", "schemas")
LOG_FILE_NAME = "beam.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_terminal: Optional[IO[str]] = None  # the real stderr while fd 2 points at the log file


def silence_import_noise() -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())


def terminal() -> IO[str]:
    """The stream our messages and progress go to (the real stderr, also while Beam's is redirected)."""
    return _terminal if _terminal is not None else sys.stderr


def log_path_for(output: str) -> Optional[str]:
    """OUTPUT/run/beam.log for a local output folder; None for a remote one (Beam's warnings then
    stay on the terminal: there is no local folder to put them in)."""
    if not output or "://" in output:
        return None
    return os.path.join(output, "run", LOG_FILE_NAME)


class _TerminalHandler(logging.Handler):
    def __init__(self, everything_from: int):
        super().__init__(logging.WARNING)
        self._everything_from = everything_from

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".", 1)[0] in OUR_LOGGERS
        return ours or record.levelno >= self._everything_from

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = terminal()
            stream.write(f"curate: {record.levelname.lower()}: {record.getMessage()}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed terminal must never fail a run
            pass


class _LazyFileHandler(logging.FileHandler):
    """Holds records back (a bounded number) until the output folder exists: a run that stops at
    a start-up check (the CLIP model cannot load, ...) must not leave a folder behind for a log."""

    HELD_RECORDS = 1000

    def __init__(self, path: str, output: str):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self._output = output
        self._held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not os.path.isdir(self._output):
            if len(self._held) < self.HELD_RECORDS:
                self._held.append(record)
            return
        if self.stream is None:
            os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        held, self._held = self._held, []
        for earlier in held:
            super().emit(earlier)
        super().emit(record)


def configure(log_path: Optional[str], output: str = "") -> None:
    """Route log records for this process (idempotent: `main` may run several times in one process)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_curate", False)]:
        root.removeHandler(handler)
        handler.close()
    # a library's logging.basicConfig() would print every record (Beam's INFO included) to stderr
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler
                    and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)]:
        root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if log_path:
        file_handler = _LazyFileHandler(log_path, output or os.path.dirname(os.path.dirname(log_path)))
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    # without a log file, Beam's own warnings stay visible; its INFO never reaches the terminal
    handlers.append(_TerminalHandler(everything_from=logging.CRITICAL + 1 if log_path else logging.WARNING))
    for handler in handlers:
        handler._curate = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if log_path else logging.WARNING)


@contextlib.contextmanager
def beam_output_to_log(log_path: Optional[str]):
    """While the block runs, file descriptor 2 (and so every process started meanwhile) writes to
    `log_path`; `terminal()` is the real stderr."""
    global _terminal
    if not log_path or _terminal is not None:
        yield
        return
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stderr.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    _terminal = os.fdopen(os.dup(saved), "w", encoding="utf-8", errors="backslashreplace", buffering=1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        stream, _terminal = _terminal, None
        stream.close()
