class ConversionError(Exception):
    """Bad input or an impossible conversion. The message is one line naming the file, key or shape."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one short line (its type name when it has none)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
