"""What a user's mistake looks like to the CLI, and the exit codes it documents.

A `UsageError` carries one line that names the thing and the fix; the CLI prints it as
`curate: LINE` and exits with EXIT_USAGE, never with a traceback (tracebacks are for our bugs).
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional

EXIT_OK = 0
EXIT_FAILED = 1  # a phase crashed: our bug or the machine's (its traceback says which)
EXIT_USAGE = 2  # a flag, a config key, an input or an output the user must change
EXIT_ACCOUNTING = 3  # the ledger does not account for every input row
EXIT_CEILING = 4  # the run finished but too many rows failed (or none was kept): outputs written, not trusted
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a phase failed (a bug or the machine: see its error)",
    EXIT_USAGE: "usage or config error: a flag, key, input or output to fix (one line says which)",
    EXIT_ACCOUNTING: "ACCOUNTING FAILED: the ledger does not account for every input row",
    EXIT_CEILING: "error ceiling: too many internal errors or download failures, or no sample kept "
                  "(outputs are written; the summary names the top reasons)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the same command resumes",
}


class UsageError(ValueError):
    """A user's mistake: `str(error)` is the one line to print."""


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.75) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    match = closest(word, choices, cutoff)
    return f" (did you mean {match}?)" if match else ""


def closest(word: str, choices: Iterable[str], cutoff: float = 0.75) -> Optional[str]:
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:  # a difference of case only
        return lowered[word.lower()]
    normalised = {c.lower().replace("-", "_"): c for c in choices}
    if word.lower().replace("-", "_") in normalised:
        return normalised[word.lower().replace("-", "_")]
    found = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return found[0] if found else None
