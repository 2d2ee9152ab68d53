import sys
from typing import Callable, Sequence


class ConversionError(Exception):
    """Bad input or an impossible conversion. The message is one line naming the file, key or shape."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one short line (its type name when it has none)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def quiet_unraisable(argv: Sequence[str]) -> Callable:
    """Silence Python's "Exception ignored" reports unless `--debug` is in `argv`; returns the hook in
    place before. orbax's asyncio threads print such tracebacks after a failed save, racing the one-line
    error an entry point prints on stderr."""
    previous = sys.unraisablehook
    if '--debug' not in argv:
        sys.unraisablehook = lambda unraisable: None
    return previous
