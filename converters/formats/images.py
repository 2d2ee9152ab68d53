"""Image files (predict's input, a training folder's images): the size an image's header declares is checked
against the file's bytes before Pillow decodes it (decoding allocates the whole declared image first).

No image format packs more than ~8,256 decoded bytes into one byte of file: deflate (PNG) expands at most
1032:1 and a 1-bit PNG decodes to 8 bytes per stored byte; GIF's LZW reaches ~2,700 pixels per byte; JPEG's
sparsest blocks ~770 bytes per byte. So a header declaring more than MAX_RATIO x the file's bytes (beyond a
MIN_BYTES floor that any small image fits in) lies about its size, and is refused before anything is decoded.
"""
import os

from ..errors import ConversionError

MAX_RATIO = 8256
MIN_BYTES = 4 << 20


def check_declared_size(img, path: str, size: int = None) -> None:
    """Raise ConversionError when an opened (not yet decoded) Pillow image declares more decoded bytes
    (width x height x bands) than MAX_RATIO x the file's bytes + MIN_BYTES. `size`: the encoded bytes' length
    when the image comes from memory (a packed record, a Parquet row) rather than from the file at `path`."""
    declared = img.width * img.height * max(len(img.getbands()), 1)
    size = os.path.getsize(path) if size is None else size
    if declared > MAX_RATIO * size + MIN_BYTES:
        raise ConversionError(f'{path}: declares a {img.width}x{img.height} image ({declared:,} bytes decoded) in '
                              f'{size:,} bytes of file: more than any image format packs (corrupt header?)')
