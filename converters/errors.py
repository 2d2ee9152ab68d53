class ConversionError(Exception):
    """Bad input or an impossible conversion. The message is one line naming the file, key or shape."""
